"""
The layout of an sslshare session id, and of a virtual service's session id
context.

A session id names its owner so that any node can ask the right peer for the
state behind it, before it answers the ClientHello.  OpenSSL uses the same
32 bytes for a TLS 1.2 session id and for the identity of a TLS 1.3 stateful
ticket, so one layout serves both:

    offset  size  field
    0       1     format, always 1
    1       8     owner tag: the first 8 bytes of
                  SHA-256("sslshare node\\0" || cluster || "\\0" || node id)
    9       23    random bytes from the operating system's CSPRNG

OpenSSL's own uniqueness check (C{SSL_has_matching_session_id}) consults
only its internal cache, which sslshare switches off; uniqueness rests on the
184 random bits instead (a collision among 2**40 sessions of one node has
odds below 2**-100).

This module does no I/O and knows nothing of OpenSSL.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

SESSION_ID_LENGTH = 32
FORMAT = 1
OWNER_TAG_LENGTH = 8
RANDOM_LENGTH = SESSION_ID_LENGTH - 1 - OWNER_TAG_LENGTH
ID_CONTEXT_LENGTH = 32


def owner_tag(cluster: str, node_id: str) -> bytes:
    """
    The tag that session ids made by C{node_id} of C{cluster} carry.
    """
    material = b"sslshare node\0" + cluster.encode("utf-8") + b"\0" \
        + node_id.encode("utf-8")
    return hashlib.sha256(material).digest()[:OWNER_TAG_LENGTH]


def session_id_maker(tag: bytes) -> Callable[[], bytes]:
    """
    A function that makes fresh session ids owned by the node whose tag is
    C{tag}: what a TLS context calls for every new session, with the tag
    checked once rather than every time.
    """
    if len(tag) != OWNER_TAG_LENGTH:
        raise ValueError(f"owner tag must be {OWNER_TAG_LENGTH} bytes, "
                         f"not {len(tag)}")
    prefix = bytes((FORMAT,)) + tag

    def new() -> bytes:
        # os.urandom is the CSPRNG that the secrets module draws from.
        return prefix + os.urandom(RANDOM_LENGTH)

    return new


def new_session_id(tag: bytes) -> bytes:
    """
    A fresh session id owned by the node whose tag is C{tag}.
    """
    return session_id_maker(tag)()


def is_session_id(candidate: bytes) -> bool:
    """
    Whether C{candidate} has the layout of an sslshare session id.
    """
    return len(candidate) == SESSION_ID_LENGTH and candidate[0] == FORMAT


def owner_of(session_id: bytes) -> bytes:
    """
    The owner tag inside C{session_id}.

    @raise ValueError: C{session_id} is not an sslshare session id.
    """
    if not is_session_id(session_id):
        raise ValueError(
            f"not an sslshare session id ({len(session_id)} bytes, "
            f"format {session_id[:1].hex() or 'none'})")
    return session_id[1:1 + OWNER_TAG_LENGTH]


def service_id_context(cluster: str, service: str) -> bytes:
    """
    The session id context of one virtual service: the same on every node
    of C{cluster}, different for every other service or cluster, so that a
    session never resumes where it was not made (OpenSSL keeps the context
    inside the session and treats a mismatch as a cache miss).
    """
    material = b"sslshare service\0" + cluster.encode("utf-8") + b"\0" \
        + service.encode("utf-8")
    return hashlib.sha256(material).digest()[:ID_CONTEXT_LENGTH]


def describe(session_id: bytes) -> str:
    """
    A short, loggable name for a session id: its first 6 bytes in hex.  The
    id is not a secret, but a short prefix is all a reader needs.
    """
    return session_id[:6].hex() + ("…" if len(session_id) > 6 else "")
