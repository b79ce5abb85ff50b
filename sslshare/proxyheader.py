"""
The PROXY protocol header a node writes to its backend before the
plaintext (C{backend_proxy_protocol}), as HAProxy's specification defines
it (proxy-protocol.txt): version 1, one text line, or version 2, binary,
which also carries what the TLS handshake settled in the standard type
and length values:

    PP2_TYPE_ALPN (0x01)       the ALPN protocol agreed, when there is one
    PP2_TYPE_AUTHORITY (0x02)  the server name the client asked for (SNI)
    PP2_TYPE_SSL (0x20)        client flags (PP2_CLIENT_SSL), verify 0, and
        PP2_SUBTYPE_SSL_VERSION (0x21)  "TLSv1.2" or "TLSv1.3"
        PP2_SUBTYPE_SSL_CIPHER (0x23)   the cipher suite's OpenSSL name
    PP2_TYPE_SSLSHARE_RESUMED (0xE0, in the range the specification keeps
        for custom types)        how the session was found: "full" (no
        resumption), "local", "peer" or "repository"

No I/O: the headers are bytes made from plain values.
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

VERSIONS = ("v1", "v2")

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_PROXY_COMMAND = 0x21  # version 2, PROXY
_LOCAL_COMMAND = 0x20  # version 2, LOCAL: no addresses
_TCP4, _TCP6, _UNSPEC = 0x11, 0x21, 0x00

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01
PP2_TYPE_SSLSHARE_RESUMED = 0xE0


@attrs.frozen
class Connection:
    """
    What a header says of one client connection: both ends as (IP address,
    port), or C{None} when an end is not an IP socket (a unix: listener);
    and what its TLS handshake settled.
    """

    client: tuple[str, int] | None
    server: tuple[str, int] | None
    tls_version: str
    cipher: str | None
    server_name: str | None
    alpn: bytes | None
    resumed: str


def header(version: str, connection: Connection) -> bytes:
    """
    The header of C{version} (L{VERSIONS}) for C{connection}.

    @raise ValueError: an unknown version.
    """
    if version == "v1":
        return v1(connection)
    if version == "v2":
        return v2(connection)
    raise ValueError(f"PROXY protocol version {version!r} is not one of "
                     f"{', '.join(VERSIONS)}")


def _families(connection: Connection
              ) -> tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address,
                         ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    if connection.client is None or connection.server is None:
        return None
    client = ipaddress.ip_address(connection.client[0])
    server = ipaddress.ip_address(connection.server[0])
    if client.version != server.version:
        # An IPv4 client on an IPv6 socket: both as IPv6.
        client = (ipaddress.IPv6Address(f"::ffff:{client}")
                  if client.version == 4 else client)
        server = (ipaddress.IPv6Address(f"::ffff:{server}")
                  if server.version == 4 else server)
    return client.version, client, server


def v1(connection: Connection) -> bytes:
    """
    C{PROXY TCP4|TCP6 <client> <server> <client port> <server port>\\r\\n},
    or C{PROXY UNKNOWN\\r\\n} when an end is not an IP socket.
    """
    families = _families(connection)
    if families is None:
        return b"PROXY UNKNOWN\r\n"
    family, client, server = families
    assert connection.client is not None and connection.server is not None
    return (f"PROXY TCP{family} {client} {server} {connection.client[1]} "
            f"{connection.server[1]}\r\n").encode("ascii")


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def v2(connection: Connection) -> bytes:
    """
    The binary header: the addresses (or LOCAL when an end is not an IP
    socket) and the TLVs of the module docstring.
    """
    families = _families(connection)
    if families is None:
        command, protocol, addresses = _LOCAL_COMMAND, _UNSPEC, b""
    else:
        family, client, server = families
        assert connection.client is not None and connection.server is not None
        command = _PROXY_COMMAND
        protocol = _TCP4 if family == 4 else _TCP6
        addresses = (client.packed + server.packed
                     + struct.pack("!HH", connection.client[1],
                                   connection.server[1]))
    ssl = struct.pack("!BI", PP2_CLIENT_SSL, 0) + _tlv(
        PP2_SUBTYPE_SSL_VERSION, connection.tls_version.encode("ascii"))
    if connection.cipher:
        ssl += _tlv(PP2_SUBTYPE_SSL_CIPHER, connection.cipher.encode("ascii"))
    tlvs = b""
    if connection.alpn:
        tlvs += _tlv(PP2_TYPE_ALPN, connection.alpn)
    if connection.server_name:
        tlvs += _tlv(PP2_TYPE_AUTHORITY,
                     connection.server_name.encode("ascii"))
    tlvs += _tlv(PP2_TYPE_SSL, ssl)
    tlvs += _tlv(PP2_TYPE_SSLSHARE_RESUMED, connection.resumed.encode("ascii"))
    body = addresses + tlvs
    return SIGNATURE + struct.pack("!BBH", command, protocol, len(body)) + body
