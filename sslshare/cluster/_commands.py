"""
The channel's AMP commands, what they carry, and the checks of their
arguments and answers that both ends make.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.protocols import amp
from zope.interface import Interface

from sslshare import identity, sessionid
from sslshare.cluster._errors import BadRequest, KeyMismatch, NotAuthorized
from sslshare.state import KEY_ID_LENGTH, MAX_ID_CONTEXT_LENGTH, MAX_KEYS
from sslshare.state import MAX_SEALED_LENGTH as MAX_SEALED
from sslshare.state import (
    PROOF_LENGTH,
    PROTOCOLS,
    StateKeys,
    checkpoint_problem,
)

MAX_BOX_KEYS = 16
"""The most keys a box on the channel may have; a command uses 5 at most."""

MAX_BOX_BYTES = 128 * 1024
"""
The most bytes a box may take on the wire: room for one value of AMP's
largest (64 KiB), so that an oversized argument is a bad request, not a
dropped connection.
"""

FETCH_STATUSES = ("found", "redirect", "missing", "refused")

# The commands.  Every one answers the same two errors; anything else a
# responder raises reaches the asker as AMP's UNKNOWN error and is logged
# on the answering side.

_ERRORS: dict[type[Exception], bytes] = {
    NotAuthorized: b"NOT_AUTHORIZED",
    BadRequest: b"BAD_REQUEST",
}


class FetchSession(amp.Command):
    """
    Give me the session C{session_id} (and forget it): C{found} with the
    sealed state, C{redirect} to the C{holder} that took it, C{missing}, or
    C{refused} when the session cannot resume the handshake that asks: of
    another C{protocol} or C{id_context}, or sealable under none of the
    asker's C{key_ids} (4 bytes each).  Those three come together
    (L{FetchTerms}), or not at all: nothing is checked then.
    """

    arguments = [
        (b"session_id", amp.String()),
        (b"protocol", amp.Unicode(optional=True)),
        (b"id_context", amp.String(optional=True)),
        (b"key_ids", amp.String(optional=True)),
    ]
    response = [
        (b"status", amp.Unicode()),
        (b"sealed", amp.String(optional=True)),
        (b"holder", amp.Unicode(optional=True)),
    ]
    errors = _ERRORS


class Checkpoint(amp.Command):
    """
    The record digest of C{session_id} after C{seq} records.
    """

    arguments = [
        (b"session_id", amp.String()),
        (b"seq", amp.Integer()),
        (b"digest", amp.String()),
    ]
    response = [(b"accepted", amp.Boolean())]
    errors = _ERRORS


class Backup(amp.Command):
    """
    Keep this sealed copy of C{session_id}: the sender holds the session,
    and the receiver is its backup node, asked when the holder is gone.
    """

    arguments = [(b"session_id", amp.String()), (b"sealed", amp.String())]
    response = [(b"kept", amp.Boolean())]
    errors = _ERRORS


class Purge(amp.Command):
    """
    Forget the session C{session_id}, which C{holder} holds now (the
    sender, when absent): whoever asks here later is sent there.
    """

    arguments = [(b"session_id", amp.String()),
                 (b"holder", amp.Unicode(optional=True))]
    response = [(b"removed", amp.Boolean())]
    errors = _ERRORS


class Stats(amp.Command):
    """
    The node's counters, as a JSON object of name -> number.
    """

    arguments = []
    response = [(b"counters", amp.Unicode())]
    errors = _ERRORS


class KeyCheck(amp.Command):
    """
    I seal with the state key C{key_id}, and C{proof} shows that I hold it
    (see the module's "Link setup"); the answer is the same from the
    server.  Any peer that may connect may send it.
    """

    arguments = [(b"key_id", amp.String()), (b"proof", amp.String())]
    response = [(b"key_id", amp.String()), (b"proof", amp.String())]
    errors = {**_ERRORS, KeyMismatch: b"KEY_MISMATCH"}


class Deliver(amp.Command):
    """
    Run these items in order, each as the command it names would run:
    sealed copies to keep (L{Backup}), checkpoints (L{Checkpoint}),
    sessions to forget (L{Purge}), packed by L{pack_item}; C{outcomes} has
    one byte per item (L{OUTCOMES}).  The channel's cost is per command,
    not per item, so a node sends what it has for one peer in one command
    (see L{sslshare.cluster._links.Outbox}).  Authorization is per item,
    by the command it names; any peer may send the command itself.
    """

    arguments = [(b"items", amp.String())]
    response = [(b"outcomes", amp.String())]
    errors = _ERRORS


COMMANDS: dict[str, type[amp.Command]] = {
    command.__name__: command
    for command in (FetchSession, Backup, Checkpoint, Purge, Stats)
}
"""The channel's commands by name: the names authorization uses."""

_EVERY_COMMAND: tuple[type[amp.Command], ...] = (
    *COMMANDS.values(), KeyCheck, Deliver)
BY_WIRE_NAME: dict[bytes, type[amp.Command]] = {
    command.commandName: command for command in _EVERY_COMMAND
}
"""Every command a peer may send, by the name a box carries."""

# The exporter label (RFC 5705) of the value a key check is bound to.
_KEY_CHECK_LABEL = b"EXPORTER-sslshare-key-check"


def key_check_message(connection: SSL.Connection, role: bytes, cluster: str,
                      client: str, server: str) -> bytes:
    """
    What a L{KeyCheck} proof of C{role} (C{b"client"} or C{b"server"})
    covers on C{connection}.  The role keeps a server from handing the
    client's own proof back; node ids never hold a NUL.
    """
    binding = connection.export_keying_material(_KEY_CHECK_LABEL, 32)
    return b"\0".join((b"sslshare key check v1", role, cluster.encode(),
                       client.encode(), server.encode(), binding))


def _key_ids(keys: StateKeys) -> str:
    return ", ".join(key_id.hex() for key_id in keys.key_ids)


def key_problem(keys: StateKeys, peer: str, node_id: str, key_id: bytes,
                message: bytes, proof: bytes) -> str | None:
    """
    Why C{peer}'s key check fails at C{node_id}, or C{None}.
    """
    if len(key_id) != KEY_ID_LENGTH or len(proof) != PROOF_LENGTH:
        return (f"{peer} sent a key check of a {len(key_id)}-byte key id and "
                f"a {len(proof)}-byte proof ({KEY_ID_LENGTH} and "
                f"{PROOF_LENGTH} expected)")
    if not keys.holds(key_id):
        return (f"{peer} seals with state key id {key_id.hex()}, which "
                f"{node_id} does not hold (it holds {_key_ids(keys)})")
    if not keys.proven(key_id, message, proof):
        return (f"{peer} names state key id {key_id.hex()} but does not "
                f"prove that it holds it")
    return None


@attrs.frozen
class FetchTerms:
    """
    What the handshake that asks for a session can resume: the session's
    TLS version (one of L{sslshare.state.PROTOCOLS}) and session id
    context, and the ids of the state keys the asker opens with.
    """

    protocol: str
    id_context: bytes
    key_ids: tuple[bytes, ...]

    def arguments(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "id_context": self.id_context,
                "key_ids": b"".join(self.key_ids)}


def fetch_terms(protocol: str | None, id_context: bytes | None,
                key_ids: bytes | None) -> FetchTerms | None:
    """
    The terms of a FetchSession's arguments, C{None} when it has none.

    @raise BadRequest: some but not all, or one out of its bounds.
    """
    if protocol is None and id_context is None and key_ids is None:
        return None
    if protocol is None or id_context is None or key_ids is None:
        raise BadRequest("protocol, id_context and key_ids come together")
    if protocol not in PROTOCOLS:
        raise BadRequest(f"protocol {protocol[:16]!r} is not one of "
                         f"{', '.join(PROTOCOLS)}")
    if not 0 < len(id_context) <= MAX_ID_CONTEXT_LENGTH:
        raise BadRequest(f"id_context of {len(id_context)} bytes "
                         f"(1..{MAX_ID_CONTEXT_LENGTH} expected)")
    if (len(key_ids) % KEY_ID_LENGTH
            or not 0 < len(key_ids) <= MAX_KEYS * KEY_ID_LENGTH):
        raise BadRequest(f"key_ids of {len(key_ids)} bytes (1 to {MAX_KEYS} "
                         f"ids of {KEY_ID_LENGTH} expected)")
    return FetchTerms(protocol, id_context, tuple(
        key_ids[at:at + KEY_ID_LENGTH]
        for at in range(0, len(key_ids), KEY_ID_LENGTH)))


@attrs.frozen
class FetchAnswer:
    """
    What a node answers to L{FetchSession}.

    @ivar status: one of L{FETCH_STATUSES}.
    @ivar sealed: with C{found} only: the sealed state (L{sslshare.state}),
        at most L{MAX_SEALED} bytes.
    @ivar holder: with C{redirect} only: the node id that holds it now.
    """

    status: str
    sealed: bytes | None = attrs.field(default=None, repr=False)
    holder: str | None = None


class ICommandHandler(Interface):
    """
    What the node behind the channel does with its peers' commands.  The
    C{requester} is the node id from the peer's verified certificate, and
    it was allowed to run the command.  Each method may return its value or
    a L{Deferred} that fires with it.
    """

    def fetch_session(session_id: bytes, requester: str,
                      terms: FetchTerms | None) -> FetchAnswer | Deferred[FetchAnswer]:
        """
        Take the session away from this node for C{requester}, if it can
        resume under C{terms} (C{None}: the requester set none).
        """

    def checkpoint(session_id: bytes, seq: int, digest: bytes,
                   requester: str) -> bool | Deferred[bool]:
        """
        Record a digest checkpoint; whether it was newer than the last one.
        """

    def purge(session_id: bytes, requester: str,
              holder: str | None = None) -> bool | Deferred[bool]:
        """
        Forget a session that C{holder} (C{None}: C{requester}) holds now;
        whether there was one.
        """

    def backup(session_id: bytes, sealed: bytes,
               requester: str) -> bool | Deferred[bool]:
        """
        Keep a sealed copy of a session C{requester} holds; whether it was
        kept.
        """

    def stats() -> dict[str, int | float]:
        """
        The node's counters.
        """


# Checks shared by both ends.

def fetch_answer_problem(status: object, sealed: object,
                         holder: object) -> str | None:
    if status not in FETCH_STATUSES:
        return f"status {status!r} is not one of {', '.join(FETCH_STATUSES)}"
    if status == "found":
        if not isinstance(sealed, bytes) or not 0 < len(sealed) <= MAX_SEALED:
            size = len(sealed) if isinstance(sealed, bytes) else "no"
            return f"found with {size} sealed bytes (1..{MAX_SEALED} expected)"
    elif sealed is not None:
        return f"{status} with a sealed state"
    if status == "redirect":
        if not identity.is_name(holder):
            return f"redirect to {holder!r}, which is not a node id"
    elif holder is not None:
        return f"{status} with a holder"
    return None


def counters_problem(counters: object) -> str | None:
    if not isinstance(counters, dict):
        return "counters are not an object"
    for name, value in counters.items():
        if not isinstance(name, str) or isinstance(value, bool) \
                or not isinstance(value, int | float) \
                or (isinstance(value, float) and not math.isfinite(value)):
            return f"counter {name!r} is {value!r}, not a number"
    return None


def check_session_id(session_id: bytes) -> None:
    if not sessionid.is_session_id(session_id):
        raise BadRequest(f"session id of {len(session_id)} bytes is not an "
                         f"sslshare session id")


def _fetch_session_arguments(session_id: bytes, protocol: str | None = None,
                             id_context: bytes | None = None,
                             key_ids: bytes | None = None) -> dict[str, Any]:
    check_session_id(session_id)
    return {"session_id": session_id,
            "terms": fetch_terms(protocol, id_context, key_ids)}


def _checkpoint_arguments(session_id: bytes, seq: int,
                          digest: bytes) -> dict[str, Any]:
    check_session_id(session_id)
    problem = checkpoint_problem(seq, digest)
    if problem is not None:
        raise BadRequest(problem)
    return {"session_id": session_id, "seq": seq, "digest": digest}


def _backup_arguments(session_id: bytes, sealed: bytes) -> dict[str, Any]:
    check_session_id(session_id)
    if not 0 < len(sealed) <= MAX_SEALED:
        raise BadRequest(f"sealed state of {len(sealed)} bytes "
                         f"(1..{MAX_SEALED} expected)")
    return {"session_id": session_id, "sealed": sealed}


def _purge_arguments(session_id: bytes,
                     holder: str | None = None) -> dict[str, Any]:
    check_session_id(session_id)
    if holder is not None and not identity.is_name(holder):
        raise BadRequest(f"holder {holder!r:.80} is not a node id: "
                         f"{identity.NAME_RULE}")
    return {"session_id": session_id, "holder": holder}


def _as_parsed(**arguments: Any) -> dict[str, Any]:
    return arguments


# Delivered items.  Each is a kind byte, the session id (a length byte and
# its bytes), then what the kind carries: a Backup the sealed state (a
# 2-byte length and its bytes), a Checkpoint the seq (8 bytes) and the
# digest (a length byte and its bytes), a Purge its holder's node id (a
# length byte and its ASCII, none for the sender).  Integers are big-endian.

ITEM_COMMANDS: dict[bytes, type[amp.Command]] = {
    b"B": Backup, b"C": Checkpoint, b"P": Purge}
"""The commands an item may name, by its kind byte."""
_ITEM_KINDS = {command: kind for kind, command in ITEM_COMMANDS.items()}

MAX_ITEMS = 256
"""The most items one L{Deliver} carries."""

MAX_ITEMS_BYTES = 0xFFFF
"""The most bytes of packed items one L{Deliver} carries: one AMP value."""

OUTCOMES: dict[bool | str, bytes] = {False: b"\x00", True: b"\x01", "refused": b"R", "failed": b"F"}
"""
An item's outcome: the boolean its command would answer; C{R}, not
authorized; C{F}, this node's handler failed (logged where it ran).
"""

_SEQ = struct.Struct("!Q")
_LENGTH = struct.Struct("!H")


def pack_item(command: type[amp.Command], arguments: dict[str, Any]) -> bytes:
    """
    One item for L{Deliver}: C{command} (L{Backup}, L{Checkpoint} or
    L{Purge}) with C{arguments} as its L{ARGUMENT_CHECKS} take them.

    @raise BadRequest: an argument is out of its command's bounds; nothing
        out of them is ever sent.
    """
    checked = ARGUMENT_CHECKS[command](**arguments)
    session_id = checked["session_id"]
    head = _ITEM_KINDS[command] + bytes((len(session_id),)) + session_id
    if command is Backup:
        return head + _LENGTH.pack(len(checked["sealed"])) + checked["sealed"]
    if command is Checkpoint:
        digest = checked["digest"]
        return head + _SEQ.pack(checked["seq"]) + bytes((len(digest),)) + digest
    holder = (checked["holder"] or "").encode("ascii")
    return head + bytes((len(holder),)) + holder


def _take(data: bytes, at: int, length: int, what: str) -> tuple[bytes, int]:
    end = at + length
    if end > len(data):
        raise BadRequest(f"{what} runs past the end of the items "
                         f"({length} bytes at offset {at} of {len(data)})")
    return data[at:end], end


def unpack_items(items: bytes) -> list[tuple[type[amp.Command], dict[str, Any]]]:
    """
    The items of a L{Deliver}, each its command and its checked arguments.

    @raise BadRequest: any item is malformed or out of its command's
        bounds, or there are more than L{MAX_ITEMS}: then none is run.
    """
    found: list[tuple[type[amp.Command], dict[str, Any]]] = []
    at = 0
    while at < len(items):
        if len(found) == MAX_ITEMS:
            raise BadRequest(f"more than {MAX_ITEMS} items")
        where = f"item {len(found) + 1}"
        kind, at = _take(items, at, 1, where)
        command = ITEM_COMMANDS.get(kind)
        if command is None:
            raise BadRequest(f"{where} is of unknown kind {kind!r}")
        length, at = _take(items, at, 1, f"{where}'s session id length")
        session_id, at = _take(items, at, length[0], f"{where}'s session id")
        arguments: dict[str, Any] = {"session_id": session_id}
        if command is Backup:
            size, at = _take(items, at, _LENGTH.size, f"{where}'s length")
            arguments["sealed"], at = _take(
                items, at, _LENGTH.unpack(size)[0], f"{where}'s sealed state")
        elif command is Checkpoint:
            seq, at = _take(items, at, _SEQ.size, f"{where}'s seq")
            arguments["seq"] = _SEQ.unpack(seq)[0]
            length, at = _take(items, at, 1, f"{where}'s digest length")
            arguments["digest"], at = _take(items, at, length[0],
                                            f"{where}'s digest")
        else:
            length, at = _take(items, at, 1, f"{where}'s holder length")
            holder, at = _take(items, at, length[0], f"{where}'s holder")
            if holder:
                # The name rule is ASCII: whatever is not fails it.
                arguments["holder"] = holder.decode("ascii", "replace")
        try:
            found.append((command, ARGUMENT_CHECKS[command](**arguments)))
        except BadRequest as e:
            raise BadRequest(f"{where} ({command.__name__}): {e}") from None
    if not found:
        raise BadRequest("no items")
    return found


def _deliver_arguments(items: bytes) -> dict[str, Any]:
    return {"items": unpack_items(items)}


ARGUMENT_CHECKS: dict[type[amp.Command], Callable[..., dict[str, Any]]] = {
    FetchSession: _fetch_session_arguments,
    Checkpoint: _checkpoint_arguments,
    Backup: _backup_arguments,
    Purge: _purge_arguments,
    Deliver: _deliver_arguments,
    Stats: _as_parsed,
    # Its lengths are part of the proof's check (key_problem), which says
    # more than a bad request would.
    KeyCheck: _as_parsed,
}
"""
For each command, its arguments as AMP parsed them -> what its responder
takes, once they are checked against the command's bounds (session ids
are sslshare ids, digests 0 or 32 bytes, sealed states at most
L{MAX_SEALED} bytes, fetch terms all or none).

@raise BadRequest: an argument is out of its bounds.
"""
