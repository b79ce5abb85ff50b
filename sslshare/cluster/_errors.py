"""
The errors of the cluster channel.
"""

from __future__ import annotations

from sslshare.errors import CertificateKeyMismatch, FileError


class NotAuthorized(Exception):
    """
    The peer may not run this command (AMP error C{NOT_AUTHORIZED}).
    """


class BadRequest(Exception):
    """
    A command's arguments are out of bounds (AMP error C{BAD_REQUEST}).
    """


class PeerUnavailable(Exception):
    """
    A peer cannot be asked right now: not connected, or the connection
    ended while the question was out.

    @ivar peer: the peer's node id.
    @ivar reason: why, in words.
    """

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"peer {peer}: {reason}")
        self.peer = peer
        self.reason = reason


class PeerProtocolError(Exception):
    """
    A peer answered something that breaks the protocol (a status that does
    not exist, a missing or oversized field).
    """


class PeerIdentityError(Exception):
    """
    A certificate does not name an acceptable node, or does not chain to the
    cluster CA.  The message names the certificate and the reason.
    """


class NodeRefused(PeerIdentityError):
    """
    A certificate names a node of the cluster that may not connect now.

    @ivar counter: the counter of the server it is counted in.
    """

    def __init__(self, counter: str, reason: str) -> None:
        super().__init__(reason)
        self.counter = counter


class KeyMismatch(Exception):
    """
    The two ends of a link cannot open what the other seals (AMP error
    C{KEY_MISMATCH}): another state key, or no proof of holding it.
    """


class HandlerFault(Exception):
    """
    This node's own L{ICommandHandler} answered what the channel cannot
    carry (a fetch answer that breaks the protocol, counters that are not
    numbers): this node's fault, not the asker's.  It is logged where it
    happens, and the asker gets AMP's unknown error.
    """


class ClusterTLSError(FileError):
    """
    A node's own CA, certificate or key file is unusable.
    """


class ClusterKeyMismatch(CertificateKeyMismatch, ClusterTLSError):
    """
    A node's key file does not hold the key of its certificate.
    """
