"""
What the TLS engine (L{sslshare.tls}) hands the layers above, as plain
data: the session a paused handshake waits for, and the direction of a
record.  The recovery chain and the record digest use these without the
engine, so that importing them (as C{sslshare digest verify} does) loads
no libssl.
"""

from __future__ import annotations

import attrs

# Directions of a record, as the running digest numbers them.
CLIENT_TO_SERVER = 0
SERVER_TO_CLIENT = 1


@attrs.frozen
class LookupRequest:
    """
    A session a client offered, which the handshake waits for.

    @ivar session_id: the 32-byte sslshare session id (TLS 1.2 session id or
        TLS 1.3 PSK identity).
    @ivar protocol: C{"TLSv1.2"} or C{"TLSv1.3"}: the version the session
        must have.
    @ivar service: the name of the virtual service the client reached.
    @ivar client: the client's address (its IP address, for TCP), which
        the engine does not know: the protocol on top fills it in, for
        the bound on lookups per client.  C{None} when unknown.
    """

    session_id: bytes
    protocol: str
    service: str
    client: str | None = None
