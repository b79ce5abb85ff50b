"""
A host and port as an operator writes them in a configuration file:
C{host}, C{host:port}, C{[IPv6 address]} or C{[IPv6 address]:port}.  No
I/O: nothing is resolved here.
"""

from __future__ import annotations


class AddressError(ValueError):
    """
    Text that is not a host and port; the message says why.
    """


def host_port(text: str, default_port: int) -> tuple[str, int]:
    """
    C{host}, C{host:port}, C{[v6 address]} or C{[v6 address]:port}.

    @raise AddressError: no host, or a port that is not one.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise AddressError(f"{text!r} is not [address]:port")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_found = text.rpartition(":")
        if not colon:
            host, port_text = text, None
        else:
            port_text = port_text_found
    if not host:
        raise AddressError(f"{text!r} names no host")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AddressError(f"{text!r}: the port is not from 1 to 65535")
    return host, int(port_text)
