"""
Sessions as the tests make them: session ids, valid states, Hypothesis
strategies for any of either, and what a lookup finds.
"""

from __future__ import annotations

import os

import attrs
from hypothesis import strategies as st

from sslshare import sessionid, state
from sslshare.state import SessionState


def session_id_of(owner: str = "node1", cluster: str = "test") -> bytes:
    """
    A new session id that names C{owner} of C{cluster} as its owner.
    """
    return sessionid.new_session_id(sessionid.owner_tag(cluster, owner))


@attrs.frozen
class Found:
    """
    A session a lookup found: its DER, and where it came from.
    """

    der: bytes = attrs.field(repr=False)
    source: str = "test"


def found_in(sessions, session_id, take=dict.get):
    """
    What a lookup in the dict C{sessions} finds, as the TLS protocol
    expects it.
    """
    der = take(sessions, session_id, None)
    return None if der is None else Found(der)


def session_state(**fields: object) -> SessionState:
    """
    A valid L{sslshare.state.SessionState} of a fresh session of node1,
    created at time 0 and expiring at 100, with C{fields} overriding any
    field.
    """
    values = dict(
        session_id=session_id_of("node1"),
        id_context=sessionid.service_id_context("test", "web"),
        der=os.urandom(135),
        holder="node1",
        created=0.0,
        expires=100.0,
    )
    values.update(fields)
    return SessionState(**values)


# Hypothesis strategies: any sslshare session id, any valid state.
session_ids = st.binary(min_size=31, max_size=31).map(lambda b: b"\x01" + b)
_times = st.floats(allow_nan=False, allow_infinity=False)
session_states = st.builds(
    lambda session_id, id_context, der, holder, created_expires, seq, digest,
    moves:
        SessionState(session_id=session_id, id_context=id_context, der=der,
                     holder=holder, created=min(created_expires),
                     expires=max(created_expires), seq=seq, digest=digest,
                     moves=moves),
    session_id=session_ids,
    id_context=st.binary(min_size=1, max_size=state.MAX_ID_CONTEXT_LENGTH),
    der=st.binary(min_size=1, max_size=state.MAX_DER_LENGTH),
    holder=st.text(st.characters(exclude_categories=("C", "Zl", "Zp")),
                   min_size=1, max_size=state.MAX_HOLDER_CHARACTERS)
    .filter(str.isprintable),
    created_expires=st.tuples(_times, _times),
    seq=st.integers(0, state.MAX_SEQ),
    digest=st.one_of(st.just(b""), st.binary(min_size=32, max_size=32)),
    moves=st.integers(0, state.MAX_MOVES),
)
