"""
The node-to-node channel: AMP over mutual TLS, with node identity from
certificates and authorization per command.

Every node listens for its peers (L{PeerServerFactory}, wrapped in Twisted's
L{TLSMemoryBIOFactory} with L{ClusterTLS.server_options}) and keeps one
reconnecting client per peer (L{PeerLink}, gathered in L{Peers}).  These
commands cross the channel: L{FetchSession} (move a sealed session to the
asker), L{Backup} (keep a copy of a session its sender holds),
L{Checkpoint} (a session's record digest), L{Purge} (forget a session) and
L{Stats} (the node's counters); L{KeyCheck} sets a link up.  A node sends
its Backups, Checkpoints and Purges as the items of L{Deliver} commands,
gathered per peer by the link's L{Outbox}: the channel's cost is per
command (AMP's parsing, dispatch, Deferreds, a TLS record each way), so a
busy node sends many items in one.  The server runs an item as it runs
the command it names, which it still answers alone too, as nodes of the
release before Deliver send it.  What a node does with them is not this
package's business: the server calls an L{ICommandHandler}.

The package's modules, each of one concern: C{_errors} (what goes wrong,
and whose fault it is), C{_commands} (the commands, what they carry, and
the checks of arguments and answers both ends make), C{_tls} (identity
from certificates and the channel's TLS), C{_framing} (the handshake
deadline and bounded boxes, both ends), C{_server} (authorization and
argument checks in one responder locator, then the handler) and C{_links}
(the reconnecting links and the checked calls).  Callers import from
C{sslshare.cluster} only.

Identity.  Both ends present a certificate from the cluster CA whose SAN
URI is C{sslshare://<cluster>/<node id>} (L{sslshare.identity.node_uri}).
OpenSSL verifies the chain (trust root: the CA file only; extended key
usage: clientAuth for the side that dials, serverAuth for the side that
answers); a per-connection verify callback then reads the URI of the leaf:
the client accepts only the one peer it dialled; the server accepts its
configured peers and itself (C{sslshare stats} asks with the node's own
certificate), counting any other node of the cluster (a decommissioned
one, say) in C{refused_nodes}, and refuses a second connection for a node
id that is connected from another host already (two nodes given the same
id), counted in C{duplicate_nodes}.  Anything else fails the handshake with
an alert to the peer, and the callback keeps a L{PeerIdentityError} saying
why for the protocol on top, which logs the refusal with its reason.  A
peer's node id is only ever read from its verified certificate, never from
anything it sends.

Link setup.  Right after the handshake, a link sends L{KeyCheck}: the id of
the state key it seals with, and a proof that it holds that key
(L{sslshare.state.StateKeys.prove}) over both node ids and a value both
ends derive from this TLS connection, so that the proof is worth nothing
on another connection.  The server checks that it holds that key (it can
open what the peer seals) and the proof, and answers the same for its own
key; the link checks the answer likewise, and is up only then.  A node
with another state key is refused with a line naming the peer and both key
ids, counted in C{key_mismatches}, instead of failing every session it
gets.  During a key rotation this asks for the order the rotation needs
anyway: every node holds a new key before any node seals with it.  The
check guards against mistakes, not attackers: a peer's certificate is what
authenticates it.

Why not C{service_identity.URI_ID}: service_identity matches a URI-ID on
scheme and host only (RFC 6125 6.5.2).  C{URI_ID("sslshare://demo/node1")}
raises C{ValueError("Invalid DNS-ID")}, and its C{URIPattern} keeps
C{"//demo/node1"}, lowercased, as a DNS pattern.  The node id lives in the
path, so this package reads the SAN URIs with C{cryptography} (which is what
service_identity's own C{extract_patterns} does) and compares exact strings;
chain verification stays with OpenSSL.

Authorization.  Every question a peer asks reaches the handler through one
responder locator (the seam AMP offers between dispatch and responders),
which asks C{allowed(command, node id)} before anything else; a refusal
answers C{NOT_AUTHORIZED}, is logged with
the peer and the command, counted in C{counters["refused_commands"]}, and
the handler is never called.  Arguments are checked next (session ids are
sslshare ids of 32 bytes, digests 0 or 32 bytes, sealed blobs at most
L{MAX_SEALED} bytes), and so is what AMP parses them from (a missing
argument, an integer that is not one): C{BAD_REQUEST}, counted in
C{bad_requests}.  An unknown command gets AMP's C{UNHANDLED}, counted in
C{unknown_commands}.  A box AMP itself cannot take (a key over 255 bytes,
an answer to a question this side never asked, a command that asks for no
answer) ends the connection, counted in C{protocol_errors}.  The server
also checks what its handler answers (an answer the channel cannot carry
is a L{HandlerFault}, this node's fault), and L{fetch_from} checks what a
peer answers: garbage becomes L{PeerProtocolError}.

Connections that fail the handshake (no certificate, another CA, another
cluster, a timeout) get no data; they are logged and counted in
C{counters["refused_connections"]} (timeouts in C{handshake_timeouts}).

Bounds.  AMP keeps a box until its end and takes any number of keys, so a
box of more than L{MAX_BOX_KEYS} keys or L{MAX_BOX_BYTES} bytes ends the
connection as it arrives (a protocol error), on both ends.  The server
stops reading from a peer (and parsing what it has read) while the answers
it wrote are not taken: the connection is its transport's producer, paused
while the transport's write buffer is over its bound (Twisted's 64 KiB),
counted in C{reading_paused}.  Whatever a remote can repeat is logged at a
bounded rate, one L{RateLimitedWarning} per kind, and counted in full.

Availability.  L{PeerLink.call} never waits for a connection: the recovery
chain has a budget of tens of milliseconds, so a peer that is not connected
right now fails the call at once with L{PeerUnavailable}; the link keeps
reconnecting in the background (Twisted's L{ClientService}, exponential
backoff that also grows while handshakes keep failing).  Nor does a call
wait for ever for an answer: a command other than L{FetchSession} (whose
asker bounds it with its own budget) that the peer has not answered within
the link's call timeout fails with L{PeerUnavailable} too, counted in
C{counters["call_timeouts"]}.

Reload.  L{Peers.reconfigure} starts and stops links to match a new peer
list, leaving the others up; L{ClusterTLS.adopt} gives the connections made
from then on, in both directions, a new certificate and key.

Discovery.  Instead of a list, the peers may be what DNS names
(L{PeerDiscovery}, module C{_discovery}: SRV records, or A and AAAA records
with a port), looked up again as their TTL runs out; each address's node
id is read from the certificate it presents (L{identify}), never from DNS.
The server then admits any node of the cluster (C{peers=None}).

This package never speaks TLS to clients, never reads configuration files
other than the PEM files it is given, and never sees a session in clear: it
carries sealed blobs.
"""

from __future__ import annotations

from sslshare.cluster._commands import (
    COMMANDS,
    FETCH_STATUSES,
    MAX_BOX_BYTES,
    MAX_BOX_KEYS,
    MAX_ITEMS,
    MAX_ITEMS_BYTES,
    MAX_SEALED,
    OUTCOMES,
    Backup,
    Checkpoint,
    Deliver,
    FetchAnswer,
    FetchSession,
    FetchTerms,
    ICommandHandler,
    KeyCheck,
    Purge,
    Stats,
)
from sslshare.cluster._discovery import (
    PeerDiscovery,
    PeerSource,
    identify,
    peer_source,
)
from sslshare.cluster._errors import (
    BadRequest,
    ClusterTLSError,
    HandlerFault,
    KeyMismatch,
    NodeRefused,
    NotAuthorized,
    PeerIdentityError,
    PeerProtocolError,
    PeerUnavailable,
)
from sslshare.cluster._framing import DEFAULT_HANDSHAKE_TIMEOUT
from sslshare.cluster._links import (
    BATCH_WINDOW,
    DEFAULT_CALL_TIMEOUT,
    PURGE_CONNECT_ATTEMPTS,
    Outbox,
    PeerLink,
    Peers,
    default_retry_policy,
    fetch_from,
    purge_on,
    stats_from,
)
from sslshare.cluster._server import PeerServerFactory
from sslshare.cluster._tls import ClusterTLS, certificate_uris, node_identity

__all__ = [
    "BATCH_WINDOW",
    "Backup",
    "BadRequest",
    "COMMANDS",
    "Checkpoint",
    "ClusterTLS",
    "ClusterTLSError",
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "Deliver",
    "FETCH_STATUSES",
    "FetchAnswer",
    "FetchSession",
    "FetchTerms",
    "HandlerFault",
    "ICommandHandler",
    "KeyCheck",
    "KeyMismatch",
    "MAX_BOX_BYTES",
    "MAX_BOX_KEYS",
    "MAX_ITEMS",
    "MAX_ITEMS_BYTES",
    "MAX_SEALED",
    "NodeRefused",
    "NotAuthorized",
    "OUTCOMES",
    "Outbox",
    "PURGE_CONNECT_ATTEMPTS",
    "PeerDiscovery",
    "PeerIdentityError",
    "PeerLink",
    "PeerProtocolError",
    "PeerServerFactory",
    "PeerSource",
    "PeerUnavailable",
    "Peers",
    "Purge",
    "Stats",
    "certificate_uris",
    "default_retry_policy",
    "fetch_from",
    "identify",
    "node_identity",
    "peer_source",
    "purge_on",
    "stats_from",
]
