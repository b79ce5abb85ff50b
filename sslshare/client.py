"""
The client side of session sharing: offer a TLS session obtained from one
server to another server only when the two are related (the same cluster),
and never anywhere else.

A session is a linkable token: a server that receives a ticket or session
id it issued — or that a colleague issued — learns that this client is the
one it saw before.  Offering every session to every server would let
unrelated sites link a client's visits, so the cache is keyed by
C{(group, server name)}, where the group comes from L{RelatednessPolicy}:

    1. a configured group (addresses, networks or DNS names) holding the
       server's address or the host name the client connected to;
    2. the DNS name the client connected to (every address that one name
       resolves to is the same service);
    3. the address prefix (IPv4 /24, IPv6 /64 by default);
    4. otherwise the exact address: a server outside every rule gets a
       group of its own, so what it issued is never offered elsewhere and
       what others issued is never offered to it.

The server name is part of the key because a resumed handshake skips the
certificate: a session verified for C{localhost} must only ever be offered
when C{localhost} is what would be verified.

Twisted integration.  L{SessionSharingPolicy} is both a factory of
L{IOpenSSLClientConnectionCreator}s for endpoints (L{SessionSharingPolicy.creator})
and an L{IPolicyForHTTPS} for L{twisted.web.client.Agent} (and so for
treq, which takes an agent).  Each creator wraps the one that
L{twisted.internet.ssl.optionsForClientTLS} makes, so that certificate and
host name verification (C{service_identity}) stay Twisted's own, and adds
an OpenSSL info callback to the connection:

    - at handshake start — the first moment the peer's address is known,
      because Twisted makes the connection before it has a transport — it
      computes the key and, if the cache holds a session for it, calls
      C{Connection.set_session};
    - at handshake end it records TLS version, cipher, whether the session
      was resumed and the time taken, and keeps a TLS 1.2 session;
    - TLS 1.3 tickets arrive after the handshake, each as a new session:
      every one read is kept, and each is offered once only.

If the server does not resume what was offered, OpenSSL simply completes
a full handshake (with full verification): nothing else to do here.

pyOpenSSL exposes neither a session's lifetime nor its ticket's lifetime
hint, so sessions expire after a lifetime of the cache's own (one hour by
default; a server that has dropped one earlier costs a full handshake).

This module never logs or shows a session, and holds no server code.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.exceptions import IPAddressMismatch
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

_log = Logger()

# The state OpenSSL is in right after it has read a TLS 1.3
# NewSessionTicket; pyOpenSSL offers the state only as this string.
_READ_TICKET = b"SSLv3/TLS read server session ticket"

TLS13 = "TLSv1.3"


class RelatednessError(ValueError):
    """
    A relatedness rule is malformed; the message names the rule and why.
    """


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@attrs.frozen
class AddressGroup:
    """
    Servers that are one cluster: by address, network or DNS name.

    @ivar name: shown in the cache key, C{group:<name>}.
    """

    name: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    names: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, name: str, members: Iterable[str]) -> AddressGroup:
        """
        A group from strings: an address (C{10.0.0.1}), a network
        (C{10.0.0.0/16}) or a DNS name (C{www.example.com}).
        """
        if not name:
            raise RelatednessError("a group needs a name")
        networks, names = [], set()
        for member in members:
            member = member.strip()
            if not member:
                raise RelatednessError(f"group {name!r}: an empty member")
            if _is_address(member) or "/" in member:
                try:
                    networks.append(ipaddress.ip_network(member, strict=False))
                except ValueError as e:
                    raise RelatednessError(f"group {name!r}: {member!r}: {e}") from None
            else:
                names.add(member.lower().rstrip("."))
        if not networks and not names:
            raise RelatednessError(f"group {name!r}: no members")
        return cls(name, tuple(networks), frozenset(names))

    def holds(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
              host: str | None) -> bool:
        if host is not None and host.lower().rstrip(".") in self.names:
            return True
        return address is not None and any(
            address.version == network.version and address in network
            for network in self.networks)


def _prefix(value: int | None, bits: int, which: str) -> int | None:
    if value is not None and not 0 <= value <= bits:
        raise RelatednessError(f"{which}: {value} is not a prefix length "
                               f"(0..{bits}, or None to turn the rule off)")
    return value


@attrs.frozen
class RelatednessPolicy:
    """
    Which servers may see a session obtained from which: see the module
    docstring for the order of the rules.

    @ivar groups: configured groups, tried in order.
    @ivar same_name: servers reached through one DNS name are related.
    @ivar ipv4_prefix: addresses sharing this many leading bits are
        related; C{None} turns the rule off.
    @ivar ipv6_prefix: the same for IPv6.
    """

    groups: tuple[AddressGroup, ...] = ()
    same_name: bool = True
    ipv4_prefix: int | None = attrs.field(
        default=24, converter=lambda v: _prefix(v, 32, "ipv4_prefix"))
    ipv6_prefix: int | None = attrs.field(
        default=64, converter=lambda v: _prefix(v, 128, "ipv6_prefix"))

    def group_of(self, address: str | None, host: str | None = None) -> str:
        """
        The group of the server at C{address}, reached by connecting to
        C{host} (a DNS name or an address literal; C{None} if unknown).
        """
        ip = None
        if address is not None:
            try:
                ip = ipaddress.ip_address(address.split("%")[0])
            except ValueError:
                ip = None
        for group in self.groups:
            if group.holds(ip, host):
                return f"group:{group.name}"
        if self.same_name and host is not None and not _is_address(host):
            return f"name:{host.lower().rstrip('.')}"
        if ip is not None:
            if isinstance(ip, ipaddress.IPv4Address):
                bits = self.ipv4_prefix
            else:
                bits = self.ipv6_prefix
                if ip.ipv4_mapped is not None:
                    return self.group_of(str(ip.ipv4_mapped))
            if bits is not None:
                network = ipaddress.ip_network(f"{ip}/{bits}", strict=False)
                return f"prefix:{network}"
            return f"address:{ip}"
        # Neither an address nor a name: a group no other server shares.
        return f"address:{address}"

    def related(self, first: str, second: str) -> bool:
        """
        Whether a session from the server at address C{first} may be
        offered to the server at address C{second}.
        """
        return self.group_of(first) == self.group_of(second)


@attrs.define
class _Entry:
    session: SSL.Session = attrs.field(repr=False)
    version: str
    expires: float


class ClientSessionCache:
    """
    Sessions by C{(group, server name)}.  TLS 1.2 sessions are kept one per
    key and may be offered again; TLS 1.3 tickets are kept up to
    C{tickets_per_key} per key and each is handed out once.

    @ivar counters: C{stored}, C{offered}, C{expired}, C{evicted}.
    """

    def __init__(self, clock: IReactorTime | None = None,
                 lifetime: float = 3600.0, max_keys: int = 1024,
                 tickets_per_key: int = 4) -> None:
        if lifetime <= 0 or max_keys < 1 or tickets_per_key < 1:
            raise ValueError("lifetime, max_keys and tickets_per_key must be positive")
        self._now: Callable[[], float] = (
            clock.seconds if clock is not None else time.time)
        self.lifetime = lifetime
        self.max_keys = max_keys
        self.tickets_per_key = tickets_per_key
        self._entries: OrderedDict[tuple[str, str], list[_Entry]] = OrderedDict()
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    def __repr__(self) -> str:
        return f"<ClientSessionCache keys={len(self._entries)} sessions={len(self)}>"

    def put(self, key: tuple[str, str], session: SSL.Session,
            version: str) -> None:
        entry = _Entry(session, version, self._now() + self.lifetime)
        entries = self._entries.get(key, [])
        if version == TLS13:
            entries = [e for e in entries if e.version == TLS13]
            entries.append(entry)
            del entries[:-self.tickets_per_key]
        else:
            # One TLS 1.2 session replaces whatever was there.
            entries = [entry]
        self._entries[key] = entries
        self._entries.move_to_end(key)
        self.counters["stored"] += 1
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)
            self.counters["evicted"] += 1

    def take(self, key: tuple[str, str]) -> SSL.Session | None:
        """
        A session to offer for C{key}, newest first, or C{None}.
        """
        entries = self._entries.get(key)
        if not entries:
            return None
        now = self._now()
        live = [e for e in entries if e.expires > now]
        self.counters["expired"] += len(entries) - len(live)
        if not live:
            del self._entries[key]
            return None
        entry = live[-1]
        if entry.version == TLS13:
            live.pop()
        if live:
            self._entries[key] = live
        else:
            del self._entries[key]
        self.counters["offered"] += 1
        return entry.session

    def holds(self, key: tuple[str, str]) -> bool:
        now = self._now()
        return any(e.expires > now for e in self._entries.get(key, ()))

    def discard(self, key: tuple[str, str]) -> None:
        self._entries.pop(key, None)


@attrs.frozen
class HandshakeReport:
    """
    What one client handshake did.

    @ivar offered: a session was offered.
    @ivar seconds: from the ClientHello to the end of the handshake.
    """

    address: str
    port: int
    server_name: str
    group: str
    version: str
    cipher: str
    offered: bool
    resumed: bool
    seconds: float


def _session_reused(connection: SSL.Connection) -> bool:
    # pyOpenSSL has no public call for SSL_session_reused.
    from OpenSSL._util import lib

    return bool(lib.SSL_session_reused(connection._ssl))


class _Watcher:
    """
    The info callback of one client connection: offers the session at
    handshake start, keeps sessions as they appear.
    """

    def __init__(self, creator: _SessionOfferingCreator,
                 tls_protocol: TLSMemoryBIOProtocol) -> None:
        self._creator = creator
        self._protocol = tls_protocol
        self._key: tuple[str, str] | None = None
        self._started: float | None = None
        self._done = False
        self._offered = False
        self._peer: tuple[str, int] = ("", 0)

    def __call__(self, connection: SSL.Connection, where: int, ret: int) -> None:
        # An exception escaping an OpenSSL callback is lost at best.
        try:
            self._event(connection, where)
        except BaseException:
            _log.failure("in the session-sharing info callback")

    def _event(self, connection: SSL.Connection, where: int) -> None:
        creator = self._creator
        if where & SSL.SSL_CB_HANDSHAKE_START and self._started is None:
            self._started = time.perf_counter()
            peer = self._protocol.getPeer()
            host = getattr(peer, "host", None)
            self._peer = (str(host), getattr(peer, "port", 0))
            self._key = (creator.policy.relatedness.group_of(host, creator.connect_host),
                         creator.server_name)
            session = creator.policy.cache.take(self._key)
            if session is not None:
                connection.set_session(session)
                self._offered = True
            return
        if self._key is None:
            return
        if where & SSL.SSL_CB_HANDSHAKE_DONE and not self._done:
            self._done = True
            version = connection.get_protocol_version_name()
            if version != TLS13:
                session = connection.get_session()
                if session is not None:
                    creator.policy.cache.put(self._key, session, version)
            assert self._started is not None
            report = HandshakeReport(
                address=self._peer[0], port=self._peer[1],
                server_name=creator.server_name, group=self._key[0],
                version=version, cipher=connection.get_cipher_name() or "",
                offered=self._offered, resumed=_session_reused(connection),
                seconds=time.perf_counter() - self._started)
            creator.policy._report(report, self._protocol)
            return
        if (self._done and where & SSL.SSL_CB_LOOP
                and connection.get_state_string() == _READ_TICKET):
            session = connection.get_session()
            if session is not None:
                creator.policy.cache.put(self._key, session, TLS13)
                creator.policy._ticket(self._protocol)


@implementer(IOpenSSLClientConnectionCreator)
class _SessionOfferingCreator:
    """
    Twisted's client creator for C{server_name}, offering and keeping
    sessions through its policy.
    """

    def __init__(self, policy: SessionSharingPolicy, options: Any,
                 server_name: str, connect_host: str | None) -> None:
        self.policy = policy
        self.server_name = server_name
        self.connect_host = connect_host
        self._options = options

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol
                               ) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_info_callback(_Watcher(self, tlsProtocol))
        return connection


@implementer(IPolicyForHTTPS)
class SessionSharingPolicy:
    """
    Client TLS that offers sessions only to related servers.

    Use L{creator} with C{wrapClientTLS} for endpoints, or pass the policy
    as C{contextFactory} to L{twisted.web.client.Agent}.

    @ivar cache: the L{ClientSessionCache}.
    @ivar relatedness: the L{RelatednessPolicy}.
    @ivar reports: called with a L{HandshakeReport} after each handshake.
    """

    def __init__(self, trustRoot: Any = None,
                 relatedness: RelatednessPolicy | None = None,
                 cache: ClientSessionCache | None = None, *,
                 clientCertificate: Any = None,
                 acceptableProtocols: Sequence[bytes] | None = None,
                 extraCertificateOptions: dict[str, Any] | None = None) -> None:
        self.trustRoot = trustRoot
        self.relatedness = relatedness if relatedness is not None else RelatednessPolicy()
        self.cache = cache if cache is not None else ClientSessionCache()
        self._clientCertificate = clientCertificate
        self._acceptableProtocols = acceptableProtocols
        self._extra = dict(extraCertificateOptions or {})
        # pyOpenSSL offers a session only on the context that made it, so
        # there is one Twisted options object (one context) per name.
        self._options: dict[str, Any] = {}
        self.reports: list[Callable[[HandshakeReport], object]] = []

    def creator(self, server_name: str, connect_host: str | None = None
                ) -> IOpenSSLClientConnectionCreator:
        """
        A connection creator that verifies C{server_name} (and sends it as
        SNI), for a server reached by connecting to C{connect_host} (a DNS
        name or an address; C{None}: by address only).
        """
        options = self._options.get(server_name)
        if options is None:
            options = self._options[server_name] = optionsForClientTLS(
                server_name, trustRoot=self.trustRoot,
                clientCertificate=self._clientCertificate,
                acceptableProtocols=self._acceptableProtocols,
                extraCertificateOptions=dict(self._extra))
        return _SessionOfferingCreator(self, options, server_name, connect_host)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        name = hostname.decode("ascii")
        return self.creator(name, name)

    def _report(self, report: HandshakeReport,
                tls_protocol: TLSMemoryBIOProtocol) -> None:
        for observer in list(self.reports):
            observer(report)
        probing = _probe_over(tls_protocol)
        if probing is not None:
            probing.handshake_reported(report)

    def _ticket(self, tls_protocol: TLSMemoryBIOProtocol) -> None:
        probing = _probe_over(tls_protocol)
        if probing is not None:
            probing.ticket_arrived()


def _probe_over(tls_protocol: TLSMemoryBIOProtocol) -> _ProbeProtocol | None:
    """
    The probe's protocol inside C{tls_protocol}, if it carries one.
    """
    wrapped = tls_protocol.wrappedProtocol
    return wrapped if isinstance(wrapped, _ProbeProtocol) else None


# The probe.

@attrs.frozen
class ProbeResult:
    """
    One line of C{sslshare probe}.

    @ivar should_resume: a session was offered to this server.
    @ivar error: why the connection failed, or C{None}.
    """

    target: str
    version: str = ""
    cipher: str = ""
    offered: bool = False
    resumed: bool = False
    seconds: float = 0.0
    group: str = ""
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or (self.offered and not self.resumed)

    def as_json(self) -> dict[str, Any]:
        return {"address": self.target, "version": self.version,
                "cipher": self.cipher, "offered": self.offered,
                "resumed": self.resumed,
                "handshake_ms": round(self.seconds * 1000, 3),
                "group": self.group, "error": self.error}


class _ProbeProtocol(Protocol):
    """
    Sends the request once the handshake is done, and reads until the
    server closes, or a session to keep has arrived and the answer went
    quiet.
    """

    # The TLS connection, from makeConnection on.
    transport: TLSMemoryBIOProtocol

    def __init__(self, request: bytes, reactor: IReactorTime,
                 linger: float) -> None:
        self.request = request
        self.reactor = reactor
        self.linger = linger
        self.report: HandshakeReport | None = None
        self.closed: Deferred[None] = Deferred()
        self._ticket = False
        self._timer: IDelayedCall | None = None
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        # The request rides behind the handshake (Twisted buffers it).
        if self.request:
            self.transport.write(self.request)

    def handshake_reported(self, report: HandshakeReport) -> None:
        """
        The policy saw the handshake of this connection end.
        """
        self.report = report
        self._rearm()

    def ticket_arrived(self) -> None:
        """
        The policy kept a session ticket of this connection.
        """
        self._ticket = True
        self._rearm()

    def dataReceived(self, data: bytes) -> None:
        self._rearm()

    def _rearm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.reactor.callLater(self.linger, self._quiet)

    def _quiet(self) -> None:
        report = self.report
        if report is not None and (report.version != TLS13 or self._ticket):
            self.transport.loseConnection()
        else:
            # Still waiting for a ticket: give it one more quiet period.
            self._timer = self.reactor.callLater(self.linger, self.transport.loseConnection)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.reason = reason
        self.closed.callback(None)


def parse_target(target: str, default_port: int = 443) -> tuple[str, int]:
    """
    C{host}, C{host:port}, C{[v6]:port} or a bare IPv6 address.
    """
    host, port = target, default_port
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        if rest.startswith(":"):
            port = _port(target, rest[1:])
    elif target.count(":") == 1:
        host, _, text = target.partition(":")
        port = _port(target, text)
    if not host:
        raise ValueError(f"{target!r}: no host")
    return host, port


def _port(target: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{target!r}: {text!r} is not a port number")
    return int(text)


async def probe(reactor: Any, targets: Sequence[str], policy: SessionSharingPolicy,
                server_name: str | None = None, request: bytes = b"",
                timeout: float = 10.0, linger: float = 0.3) -> list[ProbeResult]:
    """
    Connect to each target in turn, offering sessions as C{policy} allows,
    and say what each handshake did.

    @param server_name: the name to verify and send as SNI; default the
        target's host.
    @param request: bytes to send after the handshake (C{{host}} in it is
        replaced by the server name).
    @param linger: close after the answer has been quiet this long (and,
        for TLS 1.3, a ticket has arrived).
    """
    results = []
    for target in targets:
        try:
            host, port = parse_target(target)
        except ValueError as e:
            results.append(ProbeResult(target, error=str(e)))
            continue
        name = server_name or host
        protocol = _ProbeProtocol(request.replace(b"{host}", name.encode("idna")),
                                  reactor, linger)
        endpoint = wrapClientTLS(policy.creator(name, host),
                                 HostnameEndpoint(reactor, host, port, timeout=timeout))
        try:
            connecting = connectProtocol(endpoint, protocol)
            connecting.addTimeout(timeout, reactor)
            await connecting
            closed = protocol.closed.addTimeout(timeout, reactor)
            await closed
        except Exception as e:
            if protocol.connected:
                protocol.transport.abortConnection()
            if protocol.report is None:
                results.append(ProbeResult(
                    target, error=_describe(e, name, server_name is None)))
                continue
        report = protocol.report
        if report is None:
            why = ("the handshake did not complete" if protocol.reason is None
                   else _describe(protocol.reason.value, name,
                                  server_name is None))
            results.append(ProbeResult(target, error=why))
            continue
        results.append(ProbeResult(
            target, report.version, report.cipher, report.offered,
            report.resumed, report.seconds, report.group))
    return results


def _describe(error: BaseException, name: str, name_from_address: bool) -> str:
    """
    Why a probe of the server named C{name} failed, in words; C{name} was
    the address's host when C{name_from_address}.
    """
    if isinstance(error, VerificationError):
        kind = ("address" if any(isinstance(mismatch, IPAddressMismatch)
                                 for mismatch in error.errors) else "name")
        why = f"the certificate is not for {name}: none of its names is that {kind}"
        if name_from_address:
            why += "; give the name it was issued for with --server-name"
        return why
    if isinstance(error, SSL.Error) and error.args:
        return f"TLS error: {error.args[0]}"
    text = str(error) or type(error).__name__
    return text.splitlines()[0] if text else type(error).__name__
