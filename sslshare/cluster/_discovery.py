"""
Peers found in DNS instead of listed: the SRV records of a name
(C{dns-srv:_sslshare._tcp.cluster.example}), or its A and AAAA records
with the port of every node's cluster listener (C{dns:peers.example:9440},
as a Kubernetes headless Service gives).

DNS says where nodes listen, never who they are: each address is dialled
once with the channel's TLS, accepting any node of the cluster, and the
node id is read from the certificate it presents (L{identify}); only then
is there a link to it.  An address whose node is already linked (or is
this node) is not dialled again; one whose link is down is, since another
node may answer there now.  The records are asked for again when their TTL runs out,
bounded below and above (L{PeerDiscovery}); a lookup that fails keeps the
peers as they are and is tried again at the lower bound.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
)
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from sslshare.addresses import AddressError, host_port
from sslshare.cluster._errors import PeerIdentityError
from sslshare.cluster._tls import ClusterTLS, node_identity
from sslshare.logs import RateLimitedWarning

_log = Logger()

SCHEMES = ("dns-srv", "dns")
DEFAULT_REFRESH = (5.0, 300.0)
"""Seconds between lookups, at least and at most, whatever the TTL says."""

IDENTIFY_TIMEOUT = 5.0
"""Seconds an address has to finish the TLS handshake that names its node."""

IDENTIFY_AT_ONCE = 16
"""Addresses dialled at once to learn their node ids."""

COUNTERS = ("lookups", "lookup_failures", "identified", "identify_failures")
"""Every counter of L{PeerDiscovery.counters}: the stats show each, zero
included."""


@attrs.frozen
class PeerSource:
    """
    Where the peers are found: the SRV records of C{name}, or its A and
    AAAA records with C{port}.
    """

    kind: str
    name: str
    port: int | None = None

    def __str__(self) -> str:
        return (f"{self.kind}:{self.name}" if self.port is None
                else f"{self.kind}:{self.name}:{self.port}")


def peer_source(text: str) -> PeerSource:
    """
    C{dns-srv:NAME} or C{dns:NAME:PORT}.

    @raise AddressError: neither, and why.
    """
    kind, colon, rest = text.partition(":")
    if not colon or kind not in SCHEMES:
        raise AddressError(f"{text!r} is not dns-srv:NAME or dns:NAME:PORT")
    if kind == "dns-srv":
        if not rest or ":" in rest:
            raise AddressError(f"{text!r}: dns-srv takes a name only, the "
                               f"records give the ports")
        return PeerSource(kind, rest.rstrip("."))
    name, port = host_port(rest, 0)
    if port == 0:
        raise AddressError(f"{text!r}: dns takes NAME:PORT, the port of the "
                           f"nodes' cluster listener")
    return PeerSource(kind, name.rstrip("."), port)


async def resolve(resolver: ResolverBase, source: PeerSource
                  ) -> tuple[list[tuple[str, int]], int]:
    """
    The (host, port) pairs C{source}'s records name, sorted, and their
    smallest TTL.

    @raise Exception: the resolver's error (no such name, a timeout...).
    """
    if source.kind == "dns-srv":
        answers, _, additional = await resolver.lookupService(source.name)
        services = [record for record in answers
                    if record.type == dns.SRV]
        found: set[tuple[str, int]] = set()
        ttls = [record.ttl for record in services]
        for record in services:
            target = str(record.payload.target)
            for address, ttl in await _addresses(resolver, target):
                found.add((address, record.payload.port))
                ttls.append(ttl)
        return sorted(found), min(ttls, default=0)
    assert source.port is not None
    pairs = await _addresses(resolver, source.name)
    return (sorted({(address, source.port) for address, _ in pairs}),
            min((ttl for _, ttl in pairs), default=0))


async def _addresses(resolver: ResolverBase, name: str
                     ) -> list[tuple[str, int]]:
    """
    The A and AAAA addresses of C{name}, with their TTLs; a name with only
    one of the two kinds is not an error.
    """
    found: list[tuple[str, int]] = []
    failures: list[Failure] = []
    for lookup, kind in ((resolver.lookupAddress, dns.A),
                         (resolver.lookupIPV6Address, dns.AAAA)):
        try:
            answers, _, _ = await lookup(name)
        except Exception:
            failures.append(Failure())
            continue
        found.extend((record.payload.dottedQuad() if kind == dns.A
                      else socket.inet_ntop(socket.AF_INET6,
                                            record.payload.address),
                      record.ttl)
                     for record in answers if record.type == kind)
    if not found and len(failures) == 2:
        failures[0].raiseException()
    return found


@implementer(IHandshakeListener)
class _Identify(Protocol):
    """
    Reads the node id from the certificate the server presented, then
    hangs up.
    """

    transport: TLSMemoryBIOProtocol

    def __init__(self, cluster: str, done: Deferred[str]) -> None:
        self._cluster = cluster
        self._done = done

    def handshakeCompleted(self) -> None:
        certificate = self.transport.getPeerCertificate()
        try:
            if certificate is None:
                raise PeerIdentityError("no certificate")
            node_id = node_identity(certificate.to_cryptography(),
                                    self._cluster)
        except PeerIdentityError as e:
            self._settle(Failure(e))
        else:
            self._settle(node_id)
        self.transport.loseConnection()

    def _settle(self, outcome: str | Failure) -> None:
        # The caller may have given up already (a timeout, a stop).
        if self._done.called:
            return
        if isinstance(outcome, Failure):
            self._done.errback(outcome)
        else:
            self._done.callback(outcome)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._settle(reason)


def identify(tls: ClusterTLS, reactor: IReactorTCP, clock: IReactorTime,
             host: str, port: int,
             timeout: float = IDENTIFY_TIMEOUT) -> Deferred[str]:
    """
    The node id of the cluster node listening at C{host}:C{port}, from its
    verified certificate (C{reactor} and C{clock} are one reactor, seen as
    each interface).

    @return: fails with L{PeerIdentityError} when it presents a
        certificate of another cluster or none, with a connection error,
        or with a timeout.
    """
    def give_up(_: Deferred[str]) -> None:
        # A timeout or a stop ends the dial too, whatever stage it is at:
        # nothing of it outlives the question.
        connecting.cancel()
        for protocol in built:
            if protocol.transport is not None:
                protocol.transport.abortConnection()

    done: Deferred[str] = Deferred(give_up)
    built: list[_Identify] = []

    def build() -> _Identify:
        built.append(_Identify(tls.cluster, done))
        return built[-1]

    endpoint = wrapClientTLS(tls.client_options(None),
                             HostnameEndpoint(reactor, host, port,
                                              timeout=timeout))
    connecting = endpoint.connect(Factory.forProtocol(build))

    def failed(reason: Failure) -> None:
        if not done.called:
            done.errback(reason)

    connecting.addErrback(failed)
    return done.addTimeout(timeout, clock)


def endpoint_string(host: str, port: int) -> str:
    """
    The client endpoint string of a peer at C{host}:C{port}.
    """
    return f"tcp:host={host.replace(':', chr(92) + ':')}:port={port}"


class PeerDiscovery(Service):
    """
    Keeps the node's peers those that C{source}'s records name.

    @ivar peers: (node id, client endpoint string) of the peers found,
        sorted: what L{apply} was last given.
    @ivar counters: C{lookups}, C{lookup_failures}, C{identified}
        (addresses dialled whose node answered), C{identify_failures}.
    """

    def __init__(self, source: PeerSource, resolver: ResolverBase,
                 own_node_id: str,
                 identify: Callable[[str, int], Deferred[str]],
                 apply: Callable[[Sequence[tuple[str, str]]], None],
                 linked: Callable[[str], bool], clock: IReactorTime, *,
                 refresh: tuple[float, float] = DEFAULT_REFRESH) -> None:
        """
        @param identify: C{(host, port) -> Deferred[node id]}
            (L{identify}, with the node's channel).
        @param apply: called with the new peers when they change.
        @param linked: whether the link to a node id is up.
        @param refresh: seconds between lookups, at least and at most.
        """
        self.source = source
        self._resolver = resolver
        self._own_node_id = own_node_id
        self._identify = identify
        self._apply = apply
        self._linked = linked
        self._clock = clock
        self._refresh = refresh
        self.peers: tuple[tuple[str, str], ...] = ()
        # (host, port) -> the node id it named.
        self._known: dict[tuple[str, int], str] = {}
        self._next: IDelayedCall | None = None
        self._running: Deferred[float] | None = None
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._warnings = RateLimitedWarning(clock, log=_log)

    def startService(self) -> None:
        super().startService()
        self._next = self._clock.callLater(0, self._refresh_now)

    def stopService(self) -> None:
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        if self._running is not None:
            self._running.cancel()

    def _refresh_now(self) -> None:
        self._next = None
        self._running = Deferred.fromCoroutine(self.refresh())

        def again(delay: float) -> None:
            self._running = None
            if self.running:
                self._next = self._clock.callLater(delay, self._refresh_now)

        def failed(reason: Failure) -> float:
            if not reason.check(CancelledError):
                _log.failure("peer discovery failed", reason)
            return self._refresh[0]

        self._running.addErrback(failed).addCallback(again)

    async def refresh(self) -> float:
        """
        Look the records up, identify the addresses not linked yet, and
        apply the peers if they changed.

        @return: seconds until the next lookup.
        """
        low, high = self._refresh
        self.counters["lookups"] += 1
        try:
            addresses, ttl = await resolve(self._resolver, self.source)
        except CancelledError:
            raise
        except Exception as e:
            self.counters["lookup_failures"] += 1
            self._warnings.warn("cannot look up the peers at {source}: "
                                "{why}; the peers stay as they are",
                                source=str(self.source),
                                why=str(e) or type(e).__name__)
            return low
        known = {address: node_id for address, node_id in self._known.items()
                 if address in addresses}
        unknown = [address for address in addresses
                   if known.get(address) is None
                   or not (known[address] == self._own_node_id
                           or self._linked(known[address]))]
        # At once, a bounded number at a time: an address that does not
        # answer costs its timeout, not everybody's.
        limit = DeferredSemaphore(IDENTIFY_AT_ONCE)
        answers = await DeferredList(
            [limit.run(self._identify, *address) for address in unknown],
            consumeErrors=True)
        for address, (_, answer) in zip(unknown, answers):
            if not isinstance(answer, Failure):
                known[address] = answer
                self.counters["identified"] += 1
                continue
            known.pop(address, None)
            self.counters["identify_failures"] += 1
            self._warnings.warn(
                "peer address {address} from {source} named no node of the "
                "cluster: {why}", address=f"{address[0]}:{address[1]}",
                source=str(self.source),
                why=answer.getErrorMessage() or answer.type.__name__)
        self._known = known
        peers = _peers_of(known, self._own_node_id)
        if peers != self.peers:
            self.peers = peers
            self._apply(peers)
        return min(max(float(ttl), low), high)


def _peers_of(known: dict[tuple[str, int], str], own_node_id: str
              ) -> tuple[tuple[str, str], ...]:
    """
    One endpoint per node id, this node's own left out; a node found at
    several addresses is dialled at the first.
    """
    chosen: dict[str, str] = {}
    for (host, port), node_id in sorted(known.items()):
        if node_id != own_node_id:
            chosen.setdefault(node_id, endpoint_string(host, port))
    return tuple(sorted(chosen.items()))
