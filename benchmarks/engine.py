"""
Server-side TLS handshakes per second of the sslshare engine, full and
resumed, against plain OpenSSL measured in the same run.

Usage, from the root of a checkout::

    .venv/bin/python benchmarks/engine.py [--quick] [--json]

The default run takes a minute or two, C{--quick} about twenty seconds;
C{--json} prints one JSON object instead of the table.

What runs
=========

Four kinds of handshake: TLS 1.2 and TLS 1.3, each with an RSA-2048 and an
EC P-256 certificate (a self-signed CA and a leaf for localhost, made with
C{cryptography} in a temporary directory).  Both ends live in this process
and talk through memory BIOs, no sockets.  The client is a pyOpenSSL
C{Connection} (client side, one TLS version only, VERIFY_NONE; for TLS 1.3
it reads the server's NewSessionTicket after the handshake to get its
session).  The server is one of two things:

B{engine}: a L{sslshare.tls.Connection} made by
C{ServerContext.serverConnectionForTLS}, whose lookup listener answers every
paused ClientHello from a plain dict of DER bytes
(C{connection.supply(sessions.get(request.session_id))}), so the handshake
goes on inside the same C{do_handshake} call.  Full handshakes run on
context 1, whose C{on_new_session} stores each session's DER in the dict.
Resumed handshakes offer those sessions to context 2: an independent
C{ServerContext} that shares only the dict and the service's session id
context, with another owner tag.  Every resumed handshake must be resumed
on both ends and must have offered a session id carrying context 1's owner
tag; C{cross_context_resumed} counts them.

B{raw}: a L{sslshare._openssl.NativeConnection} on
C{NativeContext(internal_cache=True)}, with the same certificate, key,
versions, ciphers, groups, session id context, session lifetime and one
TLS 1.3 ticket: plain OpenSSL with its own in-memory session cache and no
Python callback at all, driven through the same cffi binding (so the
overhead measured is the engine's own, not cffi's).  It resumes on the same
context, from OpenSSL's cache; every resumed handshake is checked as above.

What is timed
=============

Only the server: C{time.perf_counter_ns} around the server's calls for each
flight the client sends (write the bytes in, run the handshake, read all
output out; for TLS 1.3 the last read also carries the NewSessionTicket),
summed per handshake.  The client's CPU, making and closing connections,
and the checks are all outside the timed spans.  This is wall-clock time
of a single thread on a shared machine, hence the interleaving and medians
below.

How the numbers come out
========================

A warm-up round, then N rounds.  Each round visits every kind and, for
each, runs a batch of B handshakes of engine-full, engine-resumed,
raw-full and raw-resumed; engine and raw take turns going first, so that
drifts in the machine's load hit both alike.  A batch's figure is its
mean server time per handshake.  Then, per kind (L{LEGEND} says the same,
and is printed with the results):

    - handshakes/s = 1e9 / (median over rounds of the batch figure, ns);
    - resumed/full = median over rounds of (full figure / resumed figure),
      both from the same round;
    - engine overhead = median over rounds of (engine figure / raw figure,
      same round and handshake type) - 1.

The engine's goals are checked against those: resumed/full >= 2.0 for
TLS 1.2 with RSA-2048, and an engine overhead of at most 15% for every
kind.  This script times; it never asserts a timing.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import lib as _pyopenssl_lib
from zope.interface import implementer

# Run as a script from a checkout: import the sslshare next to this
# directory, ahead of any installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sslshare import _openssl, hooks, sessionid, tls

CLUSTER = "bench"
SERVICE = "web"
HOST_NAME = "localhost"
VERSIONS = ("1.2", "1.3")
KEY_TYPES = ("rsa2048", "p256")
PATHS = ("engine", "raw")
HANDSHAKES = ("full", "resumed")
_CLIENT_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
# Larger than any flight here: one read per flight in the common case.
_READ_SIZE = 1 << 16

OVERHEAD_GOAL = 0.15
RATIO_GOAL = 2.0
RATIO_GOAL_KIND = "tls1.2-rsa2048"


@attrs.frozen
class RunSize:
    """
    How much to measure: C{rounds} rounds (after one warm-up round) of
    C{batch} handshakes per kind, path and handshake type.
    """

    rounds: int
    batch: int

    @property
    def handshakes(self) -> int:
        per_round = (len(VERSIONS) * len(KEY_TYPES) * len(PATHS)
                     * len(HANDSHAKES) * self.batch)
        return (self.rounds + 1) * per_round


# Both ends together take about 0.55 ms per handshake on average on a 2-core
# Xeon VM: about 20 s and 75 s.
QUICK = RunSize(rounds=20, batch=100)
DEFAULT = RunSize(rounds=40, batch=200)

LEGEND = {
    "full_per_s": "engine full handshakes per second of server time: "
                  "1e9 / median over rounds of the batch's mean server ns "
                  "per handshake (context 1, no session offered)",
    "resumed_per_s": "engine resumed handshakes per second of server time, "
                     "as full_per_s (session made on context 1, resumed on "
                     "context 2)",
    "ratio_resumed_full": "engine: median over rounds of full ns / resumed "
                          "ns, both from the same round",
    "raw_openssl_per_s": "plain OpenSSL (NativeContext(internal_cache=True),"
                         " no callbacks, same binding, resuming from its own "
                         "cache): full and resumed, each measured as "
                         "full_per_s",
    "raw_ratio_resumed_full": "plain OpenSSL: as ratio_resumed_full",
    "engine_overhead": "median over rounds of engine ns / raw ns per "
                       "handshake, same round and handshake type, minus 1",
    "engine_overhead_quartiles": "first and third quartiles over rounds of "
                                 "the same per-round overhead",
    "server_us": "median over rounds of the batch's mean server time per "
                 "handshake, microseconds",
    "cross_context_resumed": "measured engine handshakes that offered a "
                             "session made by context 1 and were resumed on "
                             "context 2, checked on both ends",
    "timed": "server side only: perf_counter_ns around bio_write, "
             "do_handshake and bio_read of every flight (TLS 1.3: including "
             "the NewSessionTicket); the client's CPU, connection setup "
             "and shutdown, and the checks are excluded",
}


class HandshakeError(Exception):
    """
    A handshake did not end as the benchmark requires (stalled, failed, or
    resumed when it should not have been, or the other way round).
    """


def kind_name(version: str, key_type: str) -> str:
    return f"tls{version}-{key_type}"


def all_kinds() -> Iterator[tuple[str, str]]:
    for version in VERSIONS:
        for key_type in KEY_TYPES:
            yield version, key_type


# Certificates.

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, public_key: PublicKey, issuer: str,
                 signing_key: PrivateKey, is_ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None),
                       critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def write_certificates(directory: str, key_type: str) -> tuple[str, str]:
    """
    A CA and a leaf for L{HOST_NAME}, both of C{key_type}.

    @return: the paths of the chain (leaf, then CA) and of the leaf's key.
    """
    ca_key, leaf_key = _new_key(key_type), _new_key(key_type)
    ca_name = f"sslshare benchmark CA {key_type}"
    ca = _certificate(ca_name, ca_key.public_key(), ca_name, ca_key, True)
    leaf = _certificate(HOST_NAME, leaf_key.public_key(), ca_name, ca_key, False)
    chain_path = os.path.join(directory, f"{key_type}-chain.pem")
    key_path = os.path.join(directory, f"{key_type}-key.pem")
    with open(chain_path, "wb") as f:
        f.writelines(certificate.public_bytes(serialization.Encoding.PEM)
                     for certificate in (leaf, ca))
    with open(key_path, "wb") as f:
        f.write(leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return chain_path, key_path


# The two servers: each times its own calls, and only those.

@implementer(tls.ISessionLookupListener)
class DictLookup:
    """
    The lookup listener of engine connections: answers at once from a dict
    of session id -> DER, the stand-in for a node's store.
    """

    def __init__(self, sessions: dict[bytes, bytes]) -> None:
        self.sessions = sessions

    def lookup_requested(self, connection: tls.Connection,
                         request: hooks.LookupRequest) -> None:
        connection.supply(self.sessions.get(request.session_id))


class EngineServer:
    """
    The engine, called the way Twisted's TLS protocol calls it.
    """

    def __init__(self, context: tls.ServerContext,
                 listener: DictLookup) -> None:
        self.connection = context.serverConnectionForTLS(listener)

    def step(self, data: bytes) -> tuple[bool, bytes, int]:
        """
        Feed one client flight and run the handshake.

        @return: whether the handshake is done, the server's output, and
            the nanoseconds spent.
        """
        connection = self.connection
        start = time.perf_counter_ns()
        connection.bio_write(data)
        try:
            connection.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        output = []
        while True:
            try:
                output.append(connection.bio_read(_READ_SIZE))
            except SSL.WantReadError:
                break
        elapsed = time.perf_counter_ns() - start
        return done, b"".join(output), elapsed

    def session_reused(self) -> bool:
        return self.connection.session_reused()

    def offered_session_id(self) -> bytes | None:
        request = self.connection.lookup_request
        return None if request is None else request.session_id

    def close(self) -> None:
        self.connection.shutdown()


class RawServer:
    """
    Plain OpenSSL: a native connection on a context with OpenSSL's own
    session cache.  It is its own (never called) owner: the binding only
    needs an object it can reference weakly.
    """

    def __init__(self, context: _openssl.NativeContext) -> None:
        self.native = _openssl.NativeConnection(context, self)

    def step(self, data: bytes) -> tuple[bool, bytes, int]:
        """
        As L{EngineServer.step}.
        """
        native = self.native
        start = time.perf_counter_ns()
        native.feed(data)
        result = native.handshake()
        output = []
        while chunk := native.take_output(_READ_SIZE):
            output.append(chunk)
        elapsed = time.perf_counter_ns() - start
        if result not in (_openssl.RESULT_OK, _openssl.RESULT_WANT_READ):
            raise HandshakeError(
                f"raw server: result {result}: {_openssl.take_errors()}")
        return result == _openssl.RESULT_OK, b"".join(output), elapsed

    def session_reused(self) -> bool:
        return self.native.session_reused()

    def close(self) -> None:
        self.native.shutdown()


Server = EngineServer | RawServer


# The client, and one handshake between the two.

def client_context(version: str) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(_CLIENT_VERSIONS[version])
    context.set_max_proto_version(_CLIENT_VERSIONS[version])
    context.set_verify(SSL.VERIFY_NONE)
    return context


def new_client(context: SSL.Context, session: SSL.Session | None) -> SSL.Connection:
    client = SSL.Connection(context, None)
    client.set_connect_state()
    client.set_tlsext_host_name(HOST_NAME.encode("ascii"))
    if session is not None:
        client.set_session(session)
    return client


def _client_advance(client: SSL.Connection) -> bool:
    try:
        client.do_handshake()
        return True
    except SSL.WantReadError:
        return False


def _client_output(client: SSL.Connection) -> bytes:
    output = []
    while True:
        try:
            output.append(client.bio_read(_READ_SIZE))
        except SSL.WantReadError:
            return b"".join(output)


def handshake(client: SSL.Connection, server: Server) -> int:
    """
    Shuttle bytes until both ends are done.  The server's last output (a
    TLS 1.3 NewSessionTicket) is left in the client's input.

    @return: the server's nanoseconds for this handshake.
    """
    server_ns = 0
    client_done = server_done = False
    while True:
        if not client_done:
            client_done = _client_advance(client)
        to_server = _client_output(client)
        if not to_server:
            if client_done and server_done:
                return server_ns
            raise HandshakeError("handshake stalled: nobody has anything to say")
        done, to_client, elapsed = server.step(to_server)
        server_done = server_done or done
        server_ns += elapsed
        if to_client:
            client.bio_write(to_client)


def client_resumed(client: SSL.Connection) -> bool:
    """
    Whether the client resumed.  pyOpenSSL's C{Connection} has no
    C{session_reused}; the binding it runs on has C{SSL_session_reused},
    and C{_ssl} is the client's C{SSL} pointer.
    """
    return bool(_pyopenssl_lib.SSL_session_reused(client._ssl))


def client_session(client: SSL.Connection) -> SSL.Session:
    """
    The session to offer next time.  For TLS 1.3 it only exists once the
    client has read the NewSessionTicket waiting in its input; for TLS 1.2
    the read finds nothing, which is fine.
    """
    try:
        client.recv(1)
    except SSL.WantReadError:
        pass
    return client.get_session()


def close(client: SSL.Connection, server: Server) -> None:
    """
    Close both ends cleanly: OpenSSL marks the session of a connection
    freed without a shutdown not resumable, at either end.
    """
    client.shutdown()
    server.close()


# One kind: its contexts, and its batches.

class Kind:
    """
    One TLS version and key type: the engine's two contexts with the dict
    they share, the raw context, and the client context.

    @ivar cross_context_resumed: engine handshakes resumed on context 2
        with a session made by context 1, counted once measuring starts.
    @ivar negotiated: version, cipher and key exchange group of the first
        full handshake, as the client saw them.
    """

    def __init__(self, version: str, key_type: str, directory: str) -> None:
        self.name = kind_name(version, key_type)
        self.version = version
        chain, key = write_certificates(directory, key_type)
        id_context = sessionid.service_id_context(CLUSTER, SERVICE)
        self.sessions: dict[bytes, bytes] = {}
        self.listener = DictLookup(self.sessions)
        self.issuer = self._engine_context(chain, key, id_context, "node1")
        self.resumer = self._engine_context(chain, key, id_context, "node2")
        self.raw = self._raw_context(chain, key, id_context)
        self.client = client_context(version)
        self.cross_context_resumed = 0
        self.negotiated = ""

    def _engine_context(self, chain: str, key: str, id_context: bytes,
                        node: str) -> tls.ServerContext:
        service = tls.VirtualService(SERVICE, chain, key, id_context,
                                     (HOST_NAME,))
        return tls.ServerContext(
            [service], sessionid.owner_tag(CLUSTER, node),
            on_new_session=self._store,
            minimum_version=self.version, maximum_version=self.version)

    def _store(self, connection: tls.Connection, session_id: bytes,
               der: bytes) -> None:
        self.sessions[session_id] = der

    def _raw_context(self, chain: str, key: str,
                     id_context: bytes) -> _openssl.NativeContext:
        native = _openssl.NativeContext(internal_cache=True)
        native.load_certificate_chain(chain)
        native.load_private_key(key)
        version = _openssl.TLS_1_2 if self.version == "1.2" else _openssl.TLS_1_3
        native.set_versions(version, version)
        native.set_ciphers(tls.DEFAULT_TLS12_CIPHERS, tls.DEFAULT_TLS13_SUITES)
        native.set_groups(tls.DEFAULT_GROUPS)
        native.set_session_id_context(id_context)
        native.set_session_lifetime(tls.DEFAULT_SESSION_LIFETIME)
        native.set_tls13_tickets(1)
        return native

    def measure(self, path: str, batch: int, counting: bool) -> dict[str, float]:
        """
        A batch of full handshakes, then a batch resuming their sessions.

        @return: mean server ns per handshake, by handshake type.
        """
        if path == "engine":
            issue = functools.partial(EngineServer, self.issuer, self.listener)
            resume = functools.partial(EngineServer, self.resumer, self.listener)
        else:
            issue = resume = functools.partial(RawServer, self.raw)
        full_ns, sessions = self._full_batch(issue, batch)
        resumed_ns = self._resumed_batch(resume, sessions, path, counting)
        # The dict is the engine's whole session store: each round starts
        # it empty, so it stays small.
        self.sessions.clear()
        return {"full": full_ns / batch, "resumed": resumed_ns / batch}

    def _full_batch(self, new_server: Callable[[], Server],
                    batch: int) -> tuple[int, list[SSL.Session]]:
        total, sessions = 0, []
        for _ in range(batch):
            client, server = new_client(self.client, None), new_server()
            total += handshake(client, server)
            if server.session_reused() or client_resumed(client):
                raise HandshakeError(f"{self.name}: a full handshake resumed")
            sessions.append(client_session(client))
            if not self.negotiated:
                self.negotiated = (f"{client.get_protocol_version_name()} "
                                   f"{client.get_cipher_name()} "
                                   f"{client.get_group_name()}")
            close(client, server)
        return total, sessions

    def _resumed_batch(self, new_server: Callable[[], Server],
                       sessions: list[SSL.Session], path: str,
                       counting: bool) -> int:
        issuer_tag = self.issuer.owner_tag
        total = 0
        for session in sessions:
            client, server = new_client(self.client, session), new_server()
            total += handshake(client, server)
            if not (server.session_reused() and client_resumed(client)):
                raise HandshakeError(
                    f"{self.name} {path}: a session was not resumed "
                    f"(server {server.session_reused()}, "
                    f"client {client_resumed(client)})")
            if path == "engine":
                offered = server.offered_session_id()
                if offered is None or sessionid.owner_of(offered) != issuer_tag:
                    raise HandshakeError(
                        f"{self.name}: resumed a session context 1 did not make")
                if counting:
                    self.cross_context_resumed += 1
            close(client, server)
        return total


# The run.

Samples = dict[tuple[str, str, str], list[float]]


def run(kinds: list[Kind], size: RunSize) -> Samples:
    """
    One warm-up round, then C{size.rounds} measured ones.

    @return: (path, handshake type, kind) -> the batch figure (mean server
        ns per handshake) of every measured round.
    """
    samples: Samples = defaultdict(list)
    for round_number in range(size.rounds + 1):
        counting = round_number > 0
        for kind in kinds:
            order = PATHS if round_number % 2 else PATHS[::-1]
            for path in order:
                figures = kind.measure(path, size.batch, counting)
                if counting:
                    for handshake_type, ns in figures.items():
                        samples[path, handshake_type, kind.name].append(ns)
    return samples


def _ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    return [n / d for n, d in zip(numerators, denominators)]


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(_ratios(numerators, denominators))


def overhead_quartiles(engine: list[float], raw: list[float]) -> list[float]:
    """
    The first and third quartiles of the per-round engine overhead: how
    much the machine's noise moved it.
    """
    first, _, third = statistics.quantiles(_ratios(engine, raw), n=4,
                                           method="inclusive")
    return [first - 1, third - 1]


def summarize(kinds: list[Kind], samples: Samples) -> dict:
    """
    The figures (see L{LEGEND}), keyed as the JSON output is.
    """
    names = [kind.name for kind in kinds]

    def per_s(path: str, handshake_type: str) -> dict[str, float]:
        return {name: 1e9 / statistics.median(samples[path, handshake_type, name])
                for name in names}

    def ratio(path: str) -> dict[str, float]:
        return {name: _median_ratio(samples[path, "full", name],
                                    samples[path, "resumed", name])
                for name in names}

    return {
        "full_per_s": per_s("engine", "full"),
        "resumed_per_s": per_s("engine", "resumed"),
        "ratio_resumed_full": ratio("engine"),
        "raw_openssl_per_s": {t: per_s("raw", t) for t in HANDSHAKES},
        "raw_ratio_resumed_full": ratio("raw"),
        "engine_overhead": {
            t: {name: _median_ratio(samples["engine", t, name],
                                    samples["raw", t, name]) - 1
                for name in names}
            for t in HANDSHAKES},
        "engine_overhead_quartiles": {
            t: {name: overhead_quartiles(samples["engine", t, name],
                                         samples["raw", t, name])
                for name in names}
            for t in HANDSHAKES},
        "server_us": {
            path: {t: {name: statistics.median(samples[path, t, name]) / 1e3
                       for name in names}
                   for t in HANDSHAKES}
            for path in PATHS},
        "cross_context_resumed": sum(k.cross_context_resumed for k in kinds),
        "negotiated": {kind.name: kind.negotiated for kind in kinds},
    }


def goals(figures: dict) -> dict:
    ratio = figures["ratio_resumed_full"][RATIO_GOAL_KIND]
    over = {f"{name} {t}": overhead
            for t, by_kind in figures["engine_overhead"].items()
            for name, overhead in by_kind.items() if overhead > OVERHEAD_GOAL}
    return {
        "ratio_resumed_full_tls12_rsa2048": {
            "goal": f">= {RATIO_GOAL}", "value": ratio, "met": ratio >= RATIO_GOAL},
        "engine_overhead": {
            "goal": f"<= {OVERHEAD_GOAL:.0%} for every kind and handshake type",
            "worst": max(o for by_kind in figures["engine_overhead"].values()
                         for o in by_kind.values()),
            "over_goal": over, "met": not over},
    }


def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "server_openssl": _openssl.library_version(),
        "client_openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "python": platform.python_version(),
    }


# Output.

def print_table(result: dict) -> None:
    _print_rates(result)
    print()
    _print_times(result)
    print()
    print(f"cross-context resumptions (context 1 -> 2, checked on both ends): "
          f"{result['cross_context_resumed']}")
    for name, negotiated in result["negotiated"].items():
        print(f"negotiated {name}: {negotiated}")
    print()
    _print_goals(result["goals"])
    print()
    _print_run(result)
    print()
    print("how each number is measured:")
    for key, text in LEGEND.items():
        print(f"  {key}: {text}")


def _print_rates(result: dict) -> None:
    raw = result["raw_openssl_per_s"]
    overhead = result["engine_overhead"]
    print("server handshakes per second (engine, then plain OpenSSL), "
          "resumed/full, engine overhead")
    print(f"{'kind':<16}{'full/s':>8}{'resumed/s':>11}{'res/full':>10}"
          f"{'raw full/s':>12}{'raw res/s':>11}{'raw r/f':>9}"
          f"{'ovh full':>10}{'ovh res':>9}")
    for name in result["full_per_s"]:
        print(f"{name:<16}{result['full_per_s'][name]:>8.0f}"
              f"{result['resumed_per_s'][name]:>11.0f}"
              f"{result['ratio_resumed_full'][name]:>10.2f}"
              f"{raw['full'][name]:>12.0f}{raw['resumed'][name]:>11.0f}"
              f"{result['raw_ratio_resumed_full'][name]:>9.2f}"
              f"{overhead['full'][name]:>+10.1%}"
              f"{overhead['resumed'][name]:>+9.1%}")


def _print_times(result: dict) -> None:
    us = result["server_us"]
    print("server µs per handshake, and engine overhead: median "
          "[quartiles] over rounds")
    print(f"{'kind':<16}{'type':<9}{'engine µs':>10}{'raw µs':>9}"
          f"{'extra µs':>10}{'overhead':>10}  quartiles")
    for name in result["full_per_s"]:
        for t in HANDSHAKES:
            engine, plain = us["engine"][t][name], us["raw"][t][name]
            first, third = result["engine_overhead_quartiles"][t][name]
            print(f"{name:<16}{t:<9}{engine:>10.1f}{plain:>9.1f}"
                  f"{engine - plain:>+10.1f}"
                  f"{result['engine_overhead'][t][name]:>+10.1%}"
                  f"  [{first:+.1%}, {third:+.1%}]")


def _print_goals(goals: dict) -> None:
    ratio = goals["ratio_resumed_full_tls12_rsa2048"]
    overhead = goals["engine_overhead"]
    print(f"goal resumed/full {ratio['goal']} for {RATIO_GOAL_KIND}: "
          f"{ratio['value']:.2f}, {'met' if ratio['met'] else 'NOT met'}")
    verdict = "met" if overhead["met"] else "NOT met: " + ", ".join(
        f"{where} {value:+.1%}" for where, value in overhead["over_goal"].items())
    print(f"goal engine overhead {overhead['goal']}: worst "
          f"{overhead['worst']:+.1%}, {verdict}")


def _print_run(result: dict) -> None:
    size = result["size"]
    print(f"{size['rounds']} rounds (+1 warm-up) x {size['batch']} handshakes "
          f"per kind, path and type: {size['handshakes']} handshakes in "
          f"{result['seconds']:.0f} s")
    for key, value in result["machine"].items():
        print(f"{key}: {value}")
    print(f"command: {result['command']}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true",
                        help="about 20 s instead of a minute or two")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the table")
    options = parser.parse_args(argv)
    size = QUICK if options.quick else DEFAULT
    facts = machine()
    print(f"measuring {size.handshakes} handshakes: {size.rounds} rounds "
          f"(+1 warm-up) x {size.batch} per kind, path and type",
          file=sys.stderr)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sslshare-bench-") as directory:
        kinds = [Kind(version, key_type, directory)
                 for version, key_type in all_kinds()]
        samples = run(kinds, size)
    figures = summarize(kinds, samples)
    facts["load_average_1m_at_end"] = os.getloadavg()[0]
    result = {
        **figures,
        "goals": goals(figures),
        "size": {**attrs.asdict(size), "handshakes": size.handshakes},
        "seconds": time.monotonic() - started,
        "machine": facts,
        "command": shlex.join([sys.executable] + sys.argv),
        "method": LEGEND,
    }
    if options.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main(sys.argv[1:])
