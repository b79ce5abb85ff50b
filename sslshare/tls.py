"""
The client-facing TLS engine: L{ServerContext} and L{Connection}.

L{Connection} offers the part of pyOpenSSL's C{Connection} that Twisted's
L{TLSMemoryBIOProtocol} calls, and raises pyOpenSSL's exceptions, so a
Twisted server uses it unchanged: L{ServerContext} provides
L{IOpenSSLServerConnectionCreator} and goes where a Twisted TLS server takes
a context factory.  What pyOpenSSL cannot do, and this engine exists for, is
an external, asynchronous session cache:

    - every session OpenSSL makes is handed to C{on_new_session} as its id
      and DER bytes; OpenSSL itself stores nothing;
    - session ids are 32 bytes that name this node (L{sslshare.sessionid}),
      for TLS 1.2 sessions and TLS 1.3 stateful tickets alike;
    - a ClientHello that offers one of our session ids (TLS 1.2: the legacy
      session id; TLS 1.3: a PSK identity) pauses the handshake.  The
      connection tells its lookup listener (the TLS protocol, when it
      provides L{ISessionLookupListener}), answers Twisted's
      C{do_handshake} with C{WantReadError} until L{Connection.supply} is
      called with the DER bytes, or C{None}, and then goes on: resumed, or
      full when nothing usable was supplied.

The pause uses OpenSSL's client-hello callback, which may run several times
for one ClientHello (OpenSSL calls it again when the handshake is retried,
and again for a second ClientHello after a HelloRetryRequest): the connection
remembers the request and its answer, and asks only once.  The listener is
called from L{Connection.do_handshake}, never from inside OpenSSL, so it may
answer at once (a local hit) or later from the reactor.

Bad input never crashes the engine: a malformed extension, a foreign session
id, a DER that does not parse, or one from another session id context, a
protocol version or session that does not match, a session whose cipher the
service no longer allows, all end in a full handshake or in OpenSSL's own
alert, and each is counted in L{ServerContext.counters}.

This module does no network I/O and holds no policy on where sessions live.
"""

from __future__ import annotations

import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from OpenSSL.SSL import (
    Error,
    SysCallError,
    WantReadError,
    WantWriteError,
    WantX509LookupError,
    ZeroReturnError,
)
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import Interface, implementer

from sslshare import _openssl, sessionid
from sslshare.errors import CertificateKeyMismatch, FileError
from sslshare.hooks import CLIENT_TO_SERVER, SERVER_TO_CLIENT, LookupRequest

TLS_1_2 = _openssl.TLS_1_2
TLS_1_3 = _openssl.TLS_1_3
_VERSIONS = {"1.2": TLS_1_2, "1.3": TLS_1_3}
_VERSION_NAMES = {TLS_1_2: "TLSv1.2", TLS_1_3: "TLSv1.3"}

# Mozilla's "intermediate" TLS 1.2 list: forward secret AEAD suites only.
DEFAULT_TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
DEFAULT_TLS13_SUITES = ("TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:"
                        "TLS_CHACHA20_POLY1305_SHA256")
DEFAULT_GROUPS = "X25519:P-256:P-384"
DEFAULT_SESSION_LIFETIME = 3600

# What a service with ALPN does with a client that offers none of its
# protocols -> whether that ends the handshake: the fatal
# no_application_protocol alert RFC 7301 (3.2) asks for, or carry on
# without ALPN.
_ALPN_MISMATCH_REFUSES = {"alert": True, "ignore": False}
ALPN_MISMATCH_ACTIONS = tuple(_ALPN_MISMATCH_REFUSES)
DEFAULT_ALPN_MISMATCH = ALPN_MISMATCH_ACTIONS[0]

# A paused handshake waits for at most the lookup budget, but a client may
# keep sending meanwhile: past this many bytes it is not a client.
MAX_INPUT_WHILE_PAUSED = 64 * 1024

# Why a supplied session is not resumed, as ServerContext.counters names
# them: it does not parse; it is another session than the one offered; it
# belongs to another service or protocol version; it has expired; its
# cipher is not one the service allows now (a reload took it out, or the
# node that made it allows more).
SESSION_REFUSALS = ("bad_der", "wrong_session", "context_mismatch",
                    "version_mismatch", "expired", "cipher_not_allowed")
COUNTERS = ("full", "resumed", "lookups", "lookup_misses", *SESSION_REFUSALS,
            "not_resumed", "foreign_session_id", "malformed_psk")
"""Every counter of L{ServerContext.counters} but the C{failed:<reason>}
ones: the stats show each, zero included."""

# TLS extension numbers (RFC 6066, RFC 8446).
_EXTENSION_SERVER_NAME = 0
_EXTENSION_PSK = 41
_EXTENSION_SUPPORTED_VERSIONS = 43
_HOST_NAME = 0


class TLSConfigurationError(Exception):
    """
    A server context could not be built; the message names the file or
    setting and the reason.
    """


class TLSFileError(FileError, TLSConfigurationError):
    """
    A service's certificate chain or private key file is unusable.
    """


class TLSKeyMismatch(CertificateKeyMismatch, TLSConfigurationError):
    """
    A service's private key is not the key of its certificate.
    """


class MalformedExtension(ValueError):
    """
    A ClientHello extension does not parse.
    """


def check_tls12_ciphers(ciphers: str) -> None:
    """
    Check that OpenSSL selects at least one TLS 1.2 cipher from the cipher
    list C{ciphers} (OpenSSL's syntax; names it does not know are skipped).

    @raise TLSConfigurationError: it selects none.
    """
    try:
        _openssl.NativeContext(internal_cache=True).set_ciphers(
            ciphers, DEFAULT_TLS13_SUITES)
    except _openssl.NativeError as e:
        raise TLSConfigurationError(str(e)) from None


@attrs.frozen
class VirtualService:
    """
    One certificate and the names it answers for.

    @ivar name: the service name, unique in a context; also what the session
        id context is derived from (with the cluster name).
    @ivar certificate_chain: path of a PEM file, leaf first.
    @ivar private_key: path of the PEM private key (RSA or EC).
    @ivar server_names: the SNI names that select this service; C{"*.x.y"}
        matches one label.  The first service of a context is also the
        default, for clients that send no name or an unknown one.
    @ivar id_context: the session id context, at most 32 bytes.
    """

    name: str
    certificate_chain: str
    private_key: str
    id_context: bytes
    server_names: tuple[str, ...] = ()


class ISessionLookupListener(Interface):
    """
    Whoever answers a paused handshake: in sslshare, the TLS protocol of the
    connection (the object passed to C{set_app_data}).
    """

    def lookup_requested(connection: Connection, request: LookupRequest) -> None:
        """
        The handshake of C{connection} waits for the session of
        C{request}.  Call C{connection.supply(der or None)} once, now or
        later, then let Twisted drive the handshake again.
        """


NewSessionCallback = Callable[["Connection", bytes, bytes], None]
SessionFields = _openssl.SessionFields


def session_fields(der: bytes) -> SessionFields:
    """
    What a session holds: id, id context, protocol version, cipher, master
    key (a secret, kept out of C{repr}), creation time and lifetime.

    @raise ValueError: C{der} is not an encoded TLS session.
    """
    return _openssl.NativeSession.from_der(der).details()


@implementer(IOpenSSLServerConnectionCreator)
class ServerContext:
    """
    Everything the engine needs to accept TLS connections for a set of
    virtual services, and the counters of what happened to them.

    @ivar alpn: the application protocols the services speak, in order of
        preference; none: the engine ignores ALPN.
    @ivar alpn_mismatch: one of L{ALPN_MISMATCH_ACTIONS}, for a client that
        offers none of C{alpn}.
    @ivar counters: event name -> count.  C{full} and C{resumed} handshakes;
        C{lookups} (handshakes paused for a session), C{lookup_misses} (the
        answer was C{None}); the reasons a supplied session was refused
        (L{SESSION_REFUSALS}) and a supplied session OpenSSL did not resume
        (C{not_resumed}); offered keys that could not be ours
        (C{foreign_session_id}, C{malformed_psk}); and C{failed:<reason>}
        for handshakes that ended in an error.
    """

    def __init__(
        self,
        services: Sequence[VirtualService],
        owner_tag: bytes,
        on_new_session: NewSessionCallback | None = None,
        alpn: Sequence[bytes] = (),
        alpn_mismatch: str = DEFAULT_ALPN_MISMATCH,
        minimum_version: str = "1.2",
        maximum_version: str = "1.3",
        tls12_ciphers: str = DEFAULT_TLS12_CIPHERS,
        tls13_suites: str = DEFAULT_TLS13_SUITES,
        groups: str = DEFAULT_GROUPS,
        session_lifetime: int = DEFAULT_SESSION_LIFETIME,
    ) -> None:
        if not services:
            raise TLSConfigurationError("a server needs at least one service")
        if len(owner_tag) != sessionid.OWNER_TAG_LENGTH:
            raise TLSConfigurationError(
                f"owner tag must be {sessionid.OWNER_TAG_LENGTH} bytes")
        try:
            self.minimum_version = _VERSIONS[minimum_version]
            self.maximum_version = _VERSIONS[maximum_version]
        except KeyError as e:
            raise TLSConfigurationError(
                f"TLS version {e.args[0]!r} is not supported: use 1.2 or 1.3"
            ) from None
        if self.minimum_version > self.maximum_version:
            raise TLSConfigurationError(
                f"minimum TLS version {minimum_version} is above the "
                f"maximum {maximum_version}")
        if alpn_mismatch not in ALPN_MISMATCH_ACTIONS:
            raise TLSConfigurationError(
                f"ALPN mismatch action {alpn_mismatch!r} is not one of "
                + ", ".join(map(repr, ALPN_MISMATCH_ACTIONS)))
        self.owner_tag = owner_tag
        self._new_session_id = sessionid.session_id_maker(owner_tag)
        self.on_new_session = on_new_session
        self.alpn = tuple(alpn)
        self.alpn_mismatch = alpn_mismatch
        self.session_lifetime = session_lifetime
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._services: list[tuple[VirtualService, _openssl.NativeContext]] = []
        self._by_name: dict[str, int] = {}
        seen_services = set()
        for service in services:
            if service.name in seen_services:
                raise TLSConfigurationError(
                    f"service {service.name!r} is defined twice")
            seen_services.add(service.name)
            native = self._native_context(
                service, tls12_ciphers, tls13_suites, groups)
            for name in service.server_names:
                name = name.lower()
                if name in self._by_name:
                    raise TLSConfigurationError(
                        f"server name {name!r} belongs to two services")
                self._by_name[name] = len(self._services)
            self._services.append((service, native))

    def _native_context(self, service: VirtualService, tls12_ciphers: str,
                        tls13_suites: str, groups: str) -> _openssl.NativeContext:
        for what, path in (("certificate chain", service.certificate_chain),
                           ("private key", service.private_key)):
            if not os.access(path, os.R_OK):
                raise TLSConfigurationError(
                    f"{path}: cannot read the {what} of service "
                    f"{service.name!r}: "
                    + ("no such file" if not os.path.exists(path)
                       else "permission denied"))
        if not 0 < len(service.id_context) <= sessionid.ID_CONTEXT_LENGTH:
            raise TLSConfigurationError(
                f"service {service.name!r}: session id context must be 1 to "
                f"{sessionid.ID_CONTEXT_LENGTH} bytes")
        native = _openssl.NativeContext()
        try:
            native.load_certificate_chain(service.certificate_chain)
        except _openssl.NativeError as e:
            raise TLSFileError(service.certificate_chain, str(e)) from None
        try:
            native.load_private_key(service.private_key)
        except _openssl.NativeError as e:
            if isinstance(e, _openssl.NativeKeyMismatch):
                raise TLSKeyMismatch(service.private_key,
                                     service.certificate_chain) from None
            raise TLSFileError(service.private_key, str(e)) from None
        steps: list[tuple[str, Callable[[], None]]] = [
            ("versions", lambda: native.set_versions(
                self.minimum_version, self.maximum_version)),
            ("ciphers", lambda: native.set_ciphers(tls12_ciphers, tls13_suites)),
            ("groups", lambda: native.set_groups(groups)),
            ("session id context",
             lambda: native.set_session_id_context(service.id_context)),
            # One TLS 1.3 ticket per handshake: each stateful ticket is a
            # session of its own that the cluster would have to carry.
            ("tickets", lambda: native.set_tls13_tickets(1)),
        ]
        for what, step in steps:
            try:
                step()
            except _openssl.NativeError as e:
                raise TLSConfigurationError(
                    f"{what}: service {service.name!r}: {e}") from None
        native.set_session_lifetime(self.session_lifetime)
        if self.alpn:
            native.select_alpn(
                _ALPN_MISMATCH_REFUSES[self.alpn_mismatch])
        return native

    @property
    def services(self) -> list[VirtualService]:
        return [service for service, _ in self._services]

    def _select(self, server_name: str | None) -> int:
        if server_name is None:
            return 0
        index = self._by_name.get(server_name)
        if index is None and "." in server_name:
            index = self._by_name.get("*." + server_name.split(".", 1)[1])
        return 0 if index is None else index

    # Twisted types the interface's answer as pyOpenSSL's Connection; what
    # TLSMemoryBIOProtocol calls of it, L{Connection} has.
    def serverConnectionForTLS(  # type: ignore[override]
            self, tlsProtocol: TLSMemoryBIOProtocol) -> Connection:
        """
        A new server-side L{Connection} for Twisted's TLS protocol.
        """
        connection = Connection(self)
        connection.set_app_data(tlsProtocol)
        return connection


class Connection:
    """
    One server-side TLS connection over memory BIOs; see the module
    docstring for the pause on a ClientHello.
    """

    record_observer: Callable[[int, bytes], object] | None = None
    """
    Called with (direction, plaintext) for every record read or written
    (the running digest): one C{SSL_read} yields at most one
    record, and with partial writes enabled (see L{sslshare._openssl}) one
    C{SSL_write} of at most 16 KiB, which is what Twisted hands us, makes
    exactly one.
    """

    def __init__(self, context: ServerContext) -> None:
        self._context = context
        self._service_index = 0
        self._native = _openssl.NativeConnection(context._services[0][1], self)
        self._app_data: Any = None
        self._request: LookupRequest | None = None
        self._answered = False
        self._notified = False
        self._supplied: _openssl.NativeSession | None = None
        self._handshake_done = False
        self._hello_server_name: str | None = None

    # What Twisted's TLS protocol calls, as pyOpenSSL spells it.

    def set_app_data(self, data: Any) -> None:
        self._app_data = data

    def get_app_data(self) -> Any:
        return self._app_data

    def set_accept_state(self) -> None:
        """
        Nothing to do: the engine is server-only and accepts from the start.
        """

    def set_connect_state(self) -> None:
        raise NotImplementedError("sslshare's engine is server-side only")

    def do_handshake(self) -> None:
        while True:
            if self._request is not None and not self._answered:
                if self._native.input_pending() > MAX_INPUT_WHILE_PAUSED:
                    self._context.counters[
                        "failed:too much input while paused"] += 1
                    raise Error([("sslshare", "", "the client sent more "
                                  "than a ClientHello's worth while its "
                                  "handshake waited for its session")])
                raise WantReadError()
            result = self._native.handshake()
            if result == _openssl.RESULT_OK:
                self._finish_handshake()
                return
            if result == _openssl.RESULT_WANT_READ:
                # The end of every flight but the last: no detour by _raise.
                raise WantReadError()
            if result == _openssl.RESULT_WANT_CLIENT_HELLO and not self._notified:
                self._notified = True
                self._app_data.lookup_requested(self, self._request)
                continue
            self._raise(result, during_handshake=True)

    def bio_write(self, data: bytes) -> int:
        if not data:
            return 0
        return self._native.feed(bytes(data))

    def bio_read(self, size: int) -> bytes:
        data = self._native.take_output(size)
        if not data:
            raise WantReadError()
        return data

    def bio_shutdown(self) -> None:
        self._native.mark_input_eof()

    def recv(self, size: int) -> bytes:
        data, result = self._native.read(size)
        if result != _openssl.RESULT_OK:
            self._raise(result)
        if self.record_observer is not None:
            self.record_observer(CLIENT_TO_SERVER, data)
        return data

    read = recv

    def send(self, data: bytes) -> int:
        data = bytes(data)
        count, result = self._native.write(data)
        if result != _openssl.RESULT_OK:
            self._raise(result)
        if self.record_observer is not None:
            self.record_observer(
                SERVER_TO_CLIENT, data if count == len(data) else data[:count])
        return count

    write = send

    def shutdown(self) -> bool:
        done, result = self._native.shutdown()
        if result != _openssl.RESULT_OK:
            self._raise(result)
        return done

    def pending(self) -> int:
        return self._native.pending()

    def get_peer_certificate(self) -> None:
        """
        Always C{None}: clients are not asked for certificates.
        """
        return None

    def get_alpn_proto_negotiated(self) -> bytes:
        return self._native.alpn_selected()

    def get_servername(self) -> bytes | None:
        """
        The server name the client asked for.  OpenSSL answers from the
        session on a TLS 1.2 resumption, where it kept none (it keeps the
        name only when a server-name callback accepted it): the name the
        ClientHello carried is kept for that case.
        """
        name = self._native.server_name()
        if name is None and self._hello_server_name is not None:
            return self._hello_server_name.encode("ascii")
        return name

    def get_protocol_version_name(self) -> str:
        return _VERSION_NAMES.get(self._native.protocol_version(), "unknown")

    def get_cipher_name(self) -> str | None:
        return self._native.cipher_name()

    def export_keying_material(self, label: bytes, olen: int,
                               context: bytes | None = None) -> bytes:
        try:
            return self._native.export_keying_material(label, olen,
                                                       context or b"")
        except _openssl.NativeError as e:
            raise Error([("SSL routines", "", str(e))]) from None

    # sslshare's own.

    @property
    def service(self) -> VirtualService:
        """
        The virtual service this connection reached (the default one until
        the ClientHello has been read).
        """
        return self._context._services[self._service_index][0]

    @property
    def lookup_request(self) -> LookupRequest | None:
        return self._request

    def session_reused(self) -> bool:
        return self._native.session_reused()

    def get_session_id(self) -> bytes:
        """
        The id of the connection's current session: after a TLS 1.3
        handshake, the id of the ticket just issued.
        """
        return self._native.session_id()

    def supply(self, der: bytes | None) -> None:
        """
        Answer the lookup this connection's handshake waits for: the DER of
        the session, or C{None} for a full handshake.  What cannot be used
        (see L{ServerContext.counters}) also gives a full handshake.
        """
        if self._request is None or self._answered:
            raise RuntimeError("no session lookup is waiting for an answer")
        self._answered = True
        counters = self._context.counters
        if der is None:
            counters["lookup_misses"] += 1
            return
        try:
            session = _openssl.NativeSession.from_der(der)
        except ValueError:
            counters["bad_der"] += 1
            return
        refusal = self._refusal(session.identity())
        if refusal is not None:
            counters[refusal] += 1
            return
        self._supplied = session

    def _refusal(self, found: _openssl.SessionIdentity) -> str | None:
        request = self._request
        assert request is not None
        if found.session_id != request.session_id:
            return "wrong_session"
        if found.id_context != self.service.id_context:
            return "context_mismatch"
        if _VERSION_NAMES.get(found.protocol_version) != request.protocol:
            return "version_mismatch"
        if found.expires <= time.time() or not found.resumable:
            return "expired"
        # OpenSSL checks the session's cipher against what the client
        # offers (TLS 1.2) or only its hash (TLS 1.3), never against the
        # server's own list.
        native = self._context._services[self._service_index][1]
        if found.cipher_id not in native.cipher_ids:
            return "cipher_not_allowed"
        return None

    def _finish_handshake(self) -> None:
        if self._handshake_done:
            return
        self._handshake_done = True
        counters = self._context.counters
        if self._supplied is None:
            # Nothing supplied, nothing resumed: the native context has
            # neither OpenSSL's own cache nor stateless tickets, so the
            # supplied session is the only one a handshake can resume.
            counters["full"] += 1
        elif self._native.session_reused():
            counters["resumed"] += 1
        else:
            counters["full"] += 1
            counters["not_resumed"] += 1
        # The supplied session is OpenSSL's now, or was not wanted.
        self._supplied = None

    def _raise(self, result: int, during_handshake: bool = False) -> None:
        if result == _openssl.RESULT_WANT_READ:
            raise WantReadError()
        if result == _openssl.RESULT_WANT_WRITE:
            raise WantWriteError()
        if result == _openssl.RESULT_WANT_X509_LOOKUP:
            raise WantX509LookupError()
        if result == _openssl.RESULT_ZERO_RETURN:
            raise ZeroReturnError()
        errors = _openssl.take_errors()
        if during_handshake:
            reason = errors[-1][1] if errors else "unexpected eof"
            self._context.counters[f"failed:{reason}"] += 1
        if result == _openssl.RESULT_SYSCALL and not errors:
            raise SysCallError(-1, "Unexpected EOF")
        raise Error([(library, "", reason) for library, reason in errors])

    # What OpenSSL asks through the trampolines (see sslshare._openssl).

    def _on_client_hello(self) -> int:
        if self._request is not None:
            return (_openssl.HELLO_SUCCESS if self._answered
                    else _openssl.HELLO_RETRY)
        context = self._context
        # With one service there is nothing for SNI to choose.
        if len(context._services) > 1:
            try:
                server_name = _server_name(self._native.client_hello_extension(
                    _EXTENSION_SERVER_NAME))
            except MalformedExtension:
                # OpenSSL parses it again and answers with decode_error.
                return _openssl.HELLO_SUCCESS
            self._hello_server_name = server_name
            self._service_index = context._select(server_name)
            if self._service_index:
                self._native.use_context(
                    context._services[self._service_index][1])
        request = self._lookup()
        if request is None or not ISessionLookupListener.providedBy(
                self._app_data):
            return _openssl.HELLO_SUCCESS
        # OpenSSL forgets the server name on a TLS 1.2 resumption
        # (get_servername).
        if request.protocol == "TLSv1.2" and len(context._services) == 1:
            try:
                self._hello_server_name = _server_name(
                    self._native.client_hello_extension(
                        _EXTENSION_SERVER_NAME))
            except MalformedExtension:
                return _openssl.HELLO_SUCCESS
        context.counters["lookups"] += 1
        self._request = request
        return _openssl.HELLO_RETRY

    def _lookup(self) -> LookupRequest | None:
        native = self._native
        if self._negotiates_tls13():
            body = native.client_hello_extension(_EXTENSION_PSK)
            if body is None:
                return None
            try:
                identities = _psk_identities(body)
            except MalformedExtension:
                self._context.counters["malformed_psk"] += 1
                return None
            key = next((i for i in identities if sessionid.is_session_id(i)),
                       None)
            if key is None:
                self._context.counters["foreign_session_id"] += 1
                return None
            return LookupRequest(key, "TLSv1.3", self.service.name)
        key = native.client_hello_session_id()
        if not key:
            return None
        if not sessionid.is_session_id(key):
            self._context.counters["foreign_session_id"] += 1
            return None
        return LookupRequest(key, "TLSv1.2", self.service.name)

    def _negotiates_tls13(self) -> bool:
        context = self._context
        if context.maximum_version < TLS_1_3:
            return False
        if context.minimum_version == TLS_1_3:
            return True
        body = self._native.client_hello_extension(
            _EXTENSION_SUPPORTED_VERSIONS)
        if body is None:
            return False
        try:
            return TLS_1_3 in _supported_versions(body)
        except MalformedExtension:
            return False

    def _on_new_session_id(self) -> bytes:
        return self._context._new_session_id()

    def _on_new_session(self, session_id: bytes, der: bytes) -> None:
        on_new_session = self._context.on_new_session
        if on_new_session is not None and der:
            on_new_session(self, session_id, der)

    def _on_get_session(self, session_id: bytes) -> _openssl.NativeSession | None:
        if self._supplied is None or self._request is None:
            return None
        if session_id != self._request.session_id:
            return None
        return self._supplied

    def _on_select_alpn(self, offered: list[bytes]) -> bytes | None:
        return next((name for name in self._context.alpn if name in offered),
                    None)


def _u16_prefixed(body: bytes, position: int) -> tuple[bytes, int]:
    if position + 2 > len(body):
        raise MalformedExtension("truncated length")
    (length,) = struct.unpack_from("!H", body, position)
    end = position + 2 + length
    if end > len(body):
        raise MalformedExtension("length past the end")
    return body[position + 2:end], end


def _server_name(body: bytes | None) -> str | None:
    """
    The host name of a server_name extension (RFC 6066, section 3).
    """
    if body is None:
        return None
    names, end = _u16_prefixed(body, 0)
    if end != len(body):
        raise MalformedExtension("bytes after the server name list")
    position = 0
    while position < len(names):
        name_type = names[position]
        name, position = _u16_prefixed(names, position + 1)
        if name_type == _HOST_NAME:
            try:
                return name.decode("ascii").lower()
            except UnicodeDecodeError:
                raise MalformedExtension("host name is not ASCII") from None
    return None


def _psk_identities(body: bytes) -> list[bytes]:
    """
    The identities of a pre_shared_key extension (RFC 8446, 4.2.11), which
    must be whole: one binder of at least 32 bytes per identity, and nothing
    after the binders.  (Read byte by byte rather than with L{_u16_prefixed}:
    it runs on every resumption offered.)
    """
    size = len(body)
    if size < 2:
        raise MalformedExtension("truncated identities length")
    identities_end = 2 + (body[0] << 8 | body[1])
    if identities_end + 2 > size:
        raise MalformedExtension("identities past the end")
    if identities_end + 2 + (body[identities_end] << 8
                             | body[identities_end + 1]) != size:
        raise MalformedExtension("binders do not end the extension")
    identities = []
    position = 2
    while position < identities_end:
        if position + 2 > identities_end:
            raise MalformedExtension("truncated identity length")
        start = position + 2
        end = start + (body[position] << 8 | body[position + 1])
        position = end + 4
        if end == start or position > identities_end:
            raise MalformedExtension("empty identity or truncated ticket age")
        identities.append(body[start:end])
    binders = 0
    position = identities_end + 2
    while position < size:
        length = body[position]
        position += 1 + length
        if length < 32 or position > size:
            raise MalformedExtension("short or truncated binder")
        binders += 1
    if not identities or binders != len(identities):
        raise MalformedExtension("identities and binders do not pair up")
    return identities


def _supported_versions(body: bytes) -> list[int]:
    if not body or body[0] + 1 != len(body) or body[0] % 2:
        raise MalformedExtension("bad supported_versions length")
    return [version for (version,) in struct.iter_unpack("!H", body[1:])]
