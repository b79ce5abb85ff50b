"""
The binding of the system libssl, and the only file that names a C symbol.

pyOpenSSL and cryptography expose none of the server-side session cache hooks
sslshare is built on (``SSL_CTX_sess_set_get_cb`` and friends, see
docs/architecture.md), and cryptography links a private copy of OpenSSL whose symbols are
hidden.  So this module opens the system ``libssl.so.3`` with cffi in ABI mode
(nothing is compiled at install time) and wraps it in three small classes that
speak Python: L{NativeContext} (an ``SSL_CTX``), L{NativeConnection} (an
``SSL`` with two memory BIOs) and L{NativeSession} (an ``SSL_SESSION``).
Callers never see a pointer, a C constant or an error code they would have to
look up in a header.

The C callbacks are five module-level trampolines shared by every context.
Each finds its L{NativeConnection} in a module dict keyed by the ``SSL``
pointer (a cffi pointer hashes and compares by address; the entry goes when
the ``SSL`` is freed, before its address can be reused), and through a weak
reference the Python object that owns the connection, and calls one of the
owner's methods with Python values:

    - C{_on_client_hello()} -> L{HELLO_SUCCESS}, L{HELLO_RETRY} or
      L{HELLO_FAILURE}; during the call, the connection's C{client_hello_*}
      methods and C{use_context} look at and act on the ClientHello;
    - C{_on_new_session_id()} -> the bytes of a fresh session id;
    - C{_on_new_session(session_id, der)} for every session OpenSSL makes;
    - C{_on_get_session(session_id)} -> a L{NativeSession} or C{None};
    - C{_on_select_alpn(offered)} -> one of the offered names or C{None}
      (none of them: see L{NativeContext.select_alpn}).

The weak references matter: the owner holds its L{NativeConnection}, so a
strong reference back (or from the module dict) would make a cycle that only
the cyclic collector could free, or keep every ``SSL`` alive, and a
connection dropped mid-handshake would keep its ``SSL`` alive until then.

The handshake runs the trampolines once or more per handshake, so they and
the calls they make stay lean: one dict look-up instead of a C call to find
the connection, out-parameters allocated once per connection instead of once
per call, and no copy that OpenSSL's own memory can stand in for.

This module never does I/O, never logs and knows nothing of policy; it is
not thread-safe beyond what OpenSSL itself is, and is used from the reactor
thread only.
"""

from __future__ import annotations

import ctypes.util
import weakref
from typing import Any, NamedTuple, Protocol, cast

import attrs
from cffi import FFI

_CDEF = """
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
typedef struct ssl_method_st SSL_METHOD;
typedef struct ssl_cipher_st SSL_CIPHER;
typedef struct bio_st BIO;
typedef struct bio_method_st BIO_METHOD;
typedef struct stack_st OPENSSL_STACK;

unsigned long OpenSSL_version_num(void);
const char *OpenSSL_version(int type);

const SSL_METHOD *TLS_server_method(void);
SSL_CTX *SSL_CTX_new(const SSL_METHOD *method);
void SSL_CTX_free(SSL_CTX *ctx);
long SSL_CTX_ctrl(SSL_CTX *ctx, int cmd, long larg, void *parg);
uint64_t SSL_CTX_set_options(SSL_CTX *ctx, uint64_t op);
int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file);
int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type);
int SSL_CTX_check_private_key(const SSL_CTX *ctx);
int SSL_CTX_set_cipher_list(SSL_CTX *ctx, const char *str);
int SSL_CTX_set_ciphersuites(SSL_CTX *ctx, const char *str);
int SSL_CTX_set_session_id_context(SSL_CTX *ctx, const unsigned char *sid_ctx,
                                   unsigned int sid_ctx_len);
long SSL_CTX_set_timeout(SSL_CTX *ctx, long t);
int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t num_tickets);

void SSL_CTX_sess_set_new_cb(SSL_CTX *ctx,
    int (*new_session_cb)(SSL *, SSL_SESSION *));
void SSL_CTX_sess_set_get_cb(SSL_CTX *ctx,
    SSL_SESSION *(*get_session_cb)(SSL *, const unsigned char *, int, int *));
int SSL_CTX_set_generate_session_id(SSL_CTX *ctx,
    int (*cb)(SSL *, unsigned char *, unsigned int *));
void SSL_CTX_set_client_hello_cb(SSL_CTX *c,
    int (*cb)(SSL *, int *, void *), void *arg);
void SSL_CTX_set_alpn_select_cb(SSL_CTX *ctx,
    int (*cb)(SSL *, const unsigned char **, unsigned char *,
              const unsigned char *, unsigned int, void *), void *arg);

SSL *SSL_new(SSL_CTX *ctx);
void SSL_free(SSL *ssl);
SSL_CTX *SSL_set_SSL_CTX(SSL *ssl, SSL_CTX *ctx);
void SSL_set_accept_state(SSL *ssl);
void SSL_set_bio(SSL *ssl, BIO *rbio, BIO *wbio);
int SSL_do_handshake(SSL *ssl);
int SSL_read(SSL *ssl, void *buf, int num);
int SSL_write(SSL *ssl, const void *buf, int num);
int SSL_shutdown(SSL *ssl);
int SSL_get_shutdown(const SSL *ssl);
int SSL_pending(const SSL *ssl);
int SSL_get_error(const SSL *ssl, int ret);
int SSL_session_reused(const SSL *ssl);
int SSL_version(const SSL *ssl);
const SSL_CIPHER *SSL_get_current_cipher(const SSL *ssl);
const char *SSL_CIPHER_get_name(const SSL_CIPHER *cipher);
uint32_t SSL_CIPHER_get_id(const SSL_CIPHER *cipher);
OPENSSL_STACK *SSL_CTX_get_ciphers(const SSL_CTX *ctx);
int OPENSSL_sk_num(const OPENSSL_STACK *stack);
void *OPENSSL_sk_value(const OPENSSL_STACK *stack, int index);
void SSL_get0_alpn_selected(const SSL *ssl, const unsigned char **data,
                            unsigned int *len);
const char *SSL_get_servername(const SSL *ssl, const int type);
SSL_SESSION *SSL_get_session(const SSL *ssl);
int SSL_export_keying_material(SSL *ssl, unsigned char *out, size_t olen,
                               const char *label, size_t llen,
                               const unsigned char *context,
                               size_t contextlen, int use_context);

size_t SSL_client_hello_get0_session_id(SSL *s, const unsigned char **out);
int SSL_client_hello_get0_ext(SSL *s, unsigned int type,
                              const unsigned char **out, size_t *outlen);

SSL_SESSION *d2i_SSL_SESSION(SSL_SESSION **a, const unsigned char **pp,
                             long length);
int i2d_SSL_SESSION(SSL_SESSION *in, unsigned char **pp);
void SSL_SESSION_free(SSL_SESSION *session);
const unsigned char *SSL_SESSION_get_id(const SSL_SESSION *s,
                                        unsigned int *len);
const unsigned char *SSL_SESSION_get0_id_context(const SSL_SESSION *s,
                                                 unsigned int *len);
size_t SSL_SESSION_get_master_key(const SSL_SESSION *sess,
                                  unsigned char *out, size_t outlen);
int SSL_SESSION_get_protocol_version(const SSL_SESSION *s);
const SSL_CIPHER *SSL_SESSION_get0_cipher(const SSL_SESSION *s);
long SSL_SESSION_get_time(const SSL_SESSION *s);
long SSL_SESSION_get_timeout(const SSL_SESSION *s);
int SSL_SESSION_is_resumable(const SSL_SESSION *s);

void CRYPTO_free(void *ptr, const char *file, int line);

const BIO_METHOD *BIO_s_mem(void);
BIO *BIO_new(const BIO_METHOD *type);
int BIO_read(BIO *b, void *data, int dlen);
int BIO_write(BIO *b, const void *data, int dlen);
long BIO_ctrl(BIO *bp, int cmd, long larg, void *parg);
size_t BIO_ctrl_pending(BIO *b);

unsigned long ERR_get_error(void);
void ERR_clear_error(void);
const char *ERR_lib_error_string(unsigned long e);
const char *ERR_reason_error_string(unsigned long e);
"""

# C constants, named once (values from OpenSSL 3.0's ssl.h, tls1.h, bio.h).
_SSL_FILETYPE_PEM = 1
_SSL_CTRL_MODE = 33
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_SET_MIN_PROTO_VERSION = 123
_SSL_CTRL_SET_MAX_PROTO_VERSION = 124
_SSL_SESS_CACHE_SERVER = 0x0002
# Server cache, but OpenSSL neither stores nor looks up anything itself.
_SSL_SESS_CACHE_SERVER_NO_INTERNAL = _SSL_SESS_CACHE_SERVER | 0x0100 | 0x0200
_SSL_OP_NO_TICKET = 1 << 14
_SSL_OP_NO_COMPRESSION = 1 << 17
_SSL_OP_CIPHER_SERVER_PREFERENCE = 1 << 22
_SSL_OP_NO_RENEGOTIATION = 1 << 30
_SSL_MODE_ENABLE_PARTIAL_WRITE = 0x1
_SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER = 0x2
_SSL_MODE_RELEASE_BUFFERS = 0x10
_SSL_SENT_SHUTDOWN = 1
_SSL_RECEIVED_SHUTDOWN = 2
_SSL_CLIENT_HELLO_SUCCESS = 1
_SSL_CLIENT_HELLO_ERROR = 0
_SSL_CLIENT_HELLO_RETRY = -1
_SSL_TLSEXT_ERR_OK = 0
_SSL_TLSEXT_ERR_ALERT_FATAL = 2
_SSL_TLSEXT_ERR_NOACK = 3
_SSL_AD_INTERNAL_ERROR = 80
_SSL_AD_HANDSHAKE_FAILURE = 40
_TLSEXT_NAMETYPE_host_name = 0
_BIO_C_SET_BUF_MEM_EOF_RETURN = 130

TLS_1_2 = 0x0303
TLS_1_3 = 0x0304
MINIMUM_OPENSSL = 0x30000000

# Results of an operation on a connection, in the order of SSL_get_error.
RESULT_OK = 0
RESULT_SSL_ERROR = 1
RESULT_WANT_READ = 2
RESULT_WANT_WRITE = 3
RESULT_WANT_X509_LOOKUP = 4
RESULT_SYSCALL = 5
RESULT_ZERO_RETURN = 6
RESULT_WANT_CLIENT_HELLO = 11

HELLO_SUCCESS = _SSL_CLIENT_HELLO_SUCCESS
HELLO_RETRY = _SSL_CLIENT_HELLO_RETRY
HELLO_FAILURE = _SSL_CLIENT_HELLO_ERROR


class OpenSSLUnavailable(ImportError):
    """
    The system libssl could not be loaded, or is older than OpenSSL 3.0.
    """


class NativeError(Exception):
    """
    An OpenSSL call failed.

    @ivar errors: the drained error queue as (library, reason) string pairs,
        oldest first.
    """

    def __init__(self, what: str, errors: list[tuple[str, str]]) -> None:
        self.what = what
        self.errors = errors
        reasons = "; ".join(reason for _, reason in errors) or "no reason given"
        super().__init__(f"{what}: {reasons}")


class NativeKeyMismatch(NativeError):
    """
    A private key is not the key of the certificate it was loaded for.
    """


def _load() -> tuple[FFI, Any]:
    ffi = FFI()
    ffi.cdef(_CDEF)
    candidates = ["libssl.so.3"]
    found = ctypes.util.find_library("ssl")
    if found and found not in candidates:
        candidates.append(found)
    failures = []
    for name in candidates:
        try:
            # dlsym on this handle also finds libcrypto's symbols, since
            # libssl depends on it.
            # Any: its attributes are the C functions of _CDEF, which the
            # stubs of cffi's Lib cannot name.
            lib: Any = ffi.dlopen(name)
        except OSError as e:
            failures.append(f"{name}: {e}")
            continue
        try:
            version = lib.OpenSSL_version_num()
        except AttributeError as e:
            failures.append(f"{name}: {e}")
            continue
        if version < MINIMUM_OPENSSL:
            failures.append(f"{name}: version {version:#x} is older than 3.0")
            continue
        return ffi, lib
    raise OpenSSLUnavailable(
        "sslshare needs the system OpenSSL 3 library (Debian: libssl3): "
        + "; ".join(failures)
    )


ffi, _lib = _load()


def library_version() -> str:
    """
    The version string of the loaded libssl, such as C{"OpenSSL 3.0.19 ..."}.
    """
    return _char_string(_lib.OpenSSL_version(0)).decode("ascii")


def take_errors() -> list[tuple[str, str]]:
    """
    Drain this thread's OpenSSL error queue.

    @return: (library, reason) pairs, oldest first.
    """
    errors: list[tuple[str, str]] = []
    while True:
        code = _lib.ERR_get_error()
        if not code:
            return errors
        errors.append((_string(_lib.ERR_lib_error_string(code)),
                       _string(_lib.ERR_reason_error_string(code))))


def _string(pointer: Any) -> str:
    if pointer == ffi.NULL:
        return ""
    return _char_string(pointer).decode("ascii", "replace")


def _char_string(pointer: Any) -> bytes:
    # A char * reads as bytes; only a wchar_t * would read as str.
    return cast(bytes, ffi.string(pointer))


def _bytes(pointer: Any, length: int) -> bytes:
    if pointer == ffi.NULL or length <= 0:
        return b""
    return ffi.buffer(pointer, length)[:]


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise NativeError(what, take_errors())


class SessionOwner(Protocol):
    """
    What the trampolines call on the Python object owning a connection.
    """

    def _on_client_hello(self) -> int: ...

    def _on_new_session_id(self) -> bytes: ...

    def _on_new_session(self, session_id: bytes, der: bytes) -> None: ...

    def _on_get_session(self, session_id: bytes) -> NativeSession | None: ...

    def _on_select_alpn(self, offered: list[bytes]) -> bytes | None: ...


# SSL pointer -> its NativeConnection, for the trampolines (module docstring).
_connections: dict[Any, weakref.ref[NativeConnection]] = {}


# Looked up now, not in the finalizer: the first look-up of a C function
# takes the FFI's lock, and a finalizer can run while that lock is held (a
# garbage collection during ffi.new's parsing of a type), which deadlocks.
_SSL_free = _lib.SSL_free


def _free_ssl(ssl: Any) -> None:
    _connections.pop(ssl, None)
    _SSL_free(ssl)


def _owned(ssl: Any) -> tuple[NativeConnection, SessionOwner] | None:
    """
    The connection of C{ssl} and its owner, or C{None} once either is gone.
    """
    reference = _connections.get(ssl)
    connection = None if reference is None else reference()
    if connection is None:
        return None
    owner = connection._owner()
    return None if owner is None else (connection, owner)


@ffi.callback("int(SSL *, int *, void *)", error=_SSL_CLIENT_HELLO_ERROR)
def _client_hello_trampoline(ssl, alert, _arg):
    owned = _owned(ssl)
    if owned is None:
        alert[0] = _SSL_AD_INTERNAL_ERROR
        return _SSL_CLIENT_HELLO_ERROR
    decision = owned[1]._on_client_hello()
    if decision == _SSL_CLIENT_HELLO_ERROR:
        alert[0] = _SSL_AD_HANDSHAKE_FAILURE
    return decision


@ffi.callback("int(SSL *, unsigned char *, unsigned int *)", error=0)
def _generate_session_id_trampoline(ssl, out, length):
    owned = _owned(ssl)
    if owned is None:
        return 0
    session_id = owned[1]._on_new_session_id()
    size = len(session_id)
    if not 0 < size <= length[0]:
        return 0
    ffi.memmove(out, session_id, size)
    length[0] = size
    return 1


@ffi.callback("int(SSL *, SSL_SESSION *)", error=0)
def _new_session_trampoline(ssl, session):
    owned = _owned(ssl)
    if owned is not None:
        connection, owner = owned
        owner._on_new_session(_session_id(session, connection._length),
                              _encode(session, connection._pointer))
    # 0: we kept no reference to the session, OpenSSL still owns it.
    return 0


@ffi.callback("SSL_SESSION *(SSL *, const unsigned char *, int, int *)",
              error=ffi.NULL)
def _get_session_trampoline(ssl, data, length, copy):
    owned = _owned(ssl)
    if owned is None:
        return ffi.NULL
    session = owned[1]._on_get_session(_bytes(data, length))
    if session is None:
        return ffi.NULL
    # The NativeSession keeps (and eventually frees) its own reference, so
    # OpenSSL must take one of its own: copy = 1 makes it increment the count.
    copy[0] = 1
    return session._pointer


# The callback argument of the ALPN trampoline: what a context does when
# its owner chooses none of the protocols offered.
_ALPN_GO_ON = ffi.NULL
_ALPN_REFUSE = ffi.cast("void *", 1)


@ffi.callback("int(SSL *, const unsigned char **, unsigned char *,"
              " const unsigned char *, unsigned int, void *)",
              error=_SSL_TLSEXT_ERR_NOACK)
def _alpn_trampoline(ssl, out, outlen, offered, offered_length, refuse):
    owned = _owned(ssl)
    if owned is None:
        return _SSL_TLSEXT_ERR_NOACK
    wire = _bytes(offered, offered_length)
    names, offsets = _parse_alpn(wire)
    chosen = owned[1]._on_select_alpn(names) if names else None
    if chosen is None or chosen not in names:
        # OpenSSL answers ALERT_FATAL with no_application_protocol.
        return (_SSL_TLSEXT_ERR_NOACK if refuse == _ALPN_GO_ON
                else _SSL_TLSEXT_ERR_ALERT_FATAL)
    # The answer must point into memory that outlives this call; the
    # client's own list does, for as long as OpenSSL needs it.
    out[0] = offered + offsets[names.index(chosen)]
    outlen[0] = len(chosen)
    return _SSL_TLSEXT_ERR_OK


def _parse_alpn(wire: bytes) -> tuple[list[bytes], list[int]]:
    names, offsets = [], []
    position = 0
    while position < len(wire):
        length = wire[position]
        start = position + 1
        if length == 0 or start + length > len(wire):
            return [], []
        names.append(wire[start:start + length])
        offsets.append(start)
        position = start + length
    return names, offsets


def _session_id(session: Any, length: Any) -> bytes:
    """
    @param length: an C{unsigned int *} to use as the out-parameter.
    """
    pointer = _lib.SSL_SESSION_get_id(session, length)
    return _bytes(pointer, length[0])


def _encode(session: Any, cursor: Any) -> bytes:
    """
    @param cursor: an C{unsigned char **} to use as the out-parameter.
    """
    # A null cursor makes OpenSSL size and allocate the encoding itself:
    # one encoding pass, where asking the size first would make two.
    cursor[0] = ffi.NULL
    size = _lib.i2d_SSL_SESSION(session, cursor)
    if size <= 0:
        return b""
    der = ffi.buffer(cursor[0], size)[:]
    _lib.CRYPTO_free(cursor[0], ffi.NULL, 0)
    return der


class NativeSession:
    """
    A parsed ``SSL_SESSION``, freed when this object is collected.
    """

    def __init__(self, pointer: Any) -> None:
        self._pointer = ffi.gc(pointer, _lib.SSL_SESSION_free)

    @classmethod
    def from_der(cls, der: bytes) -> NativeSession:
        """
        @raise ValueError: C{der} is not an encoded session.
        """
        # d2i only reads: it may parse the bytes object's own memory.
        source = ffi.from_buffer("unsigned char[]", der)
        cursor = ffi.new("const unsigned char **", source)
        _lib.ERR_clear_error()
        pointer = _lib.d2i_SSL_SESSION(ffi.NULL, cursor, len(der))
        if pointer == ffi.NULL:
            reasons = "; ".join(reason for _, reason in take_errors())
            raise ValueError(f"not a TLS session: {reasons or 'unparsable'}")
        if cursor[0] - source != len(der):
            _lib.SSL_SESSION_free(pointer)
            raise ValueError("not a TLS session: trailing bytes after it")
        return cls(pointer)

    def identity(self) -> SessionIdentity:
        """
        What decides whether the session may be resumed here, without the
        secret: cheaper than L{details} on the handshake path.
        """
        pointer = self._pointer
        length = ffi.new("unsigned int *")
        context = _lib.SSL_SESSION_get0_id_context(pointer, length)
        id_context = _bytes(context, length[0])
        cipher = _lib.SSL_SESSION_get0_cipher(pointer)
        return SessionIdentity(
            _session_id(pointer, length),
            id_context,
            _lib.SSL_SESSION_get_protocol_version(pointer),
            0 if cipher == ffi.NULL else _lib.SSL_CIPHER_get_id(cipher),
            _lib.SSL_SESSION_get_time(pointer)
            + _lib.SSL_SESSION_get_timeout(pointer),
            bool(_lib.SSL_SESSION_is_resumable(pointer)),
        )

    def details(self) -> SessionFields:
        pointer = self._pointer
        length = ffi.new("unsigned int *")
        context = _lib.SSL_SESSION_get0_id_context(pointer, length)
        id_context = _bytes(context, length[0])
        key_length = _lib.SSL_SESSION_get_master_key(pointer, ffi.NULL, 0)
        key = ffi.new("unsigned char[]", key_length)
        _lib.SSL_SESSION_get_master_key(pointer, key, key_length)
        cipher = _lib.SSL_SESSION_get0_cipher(pointer)
        return SessionFields(
            session_id=_session_id(pointer, length),
            id_context=id_context,
            protocol_version=_lib.SSL_SESSION_get_protocol_version(pointer),
            cipher="" if cipher == ffi.NULL else _string(
                _lib.SSL_CIPHER_get_name(cipher)),
            master_key=ffi.buffer(key, key_length)[:],
            created=_lib.SSL_SESSION_get_time(pointer),
            lifetime=_lib.SSL_SESSION_get_timeout(pointer),
            resumable=bool(_lib.SSL_SESSION_is_resumable(pointer)),
        )


class SessionIdentity(NamedTuple):
    session_id: bytes
    id_context: bytes
    protocol_version: int
    # OpenSSL's id of the session's cipher, as in L{NativeContext.cipher_ids};
    # 0 when the session names none.
    cipher_id: int
    expires: int
    resumable: bool


@attrs.frozen
class SessionFields:
    """
    What OpenSSL records in a session.  C{master_key} is a secret: it is kept
    out of C{repr} so that it never reaches a log by accident.
    """

    session_id: bytes
    id_context: bytes
    protocol_version: int
    cipher: str
    master_key: bytes = attrs.field(repr=False)
    created: int
    lifetime: int
    resumable: bool


class NativeContext:
    """
    An ``SSL_CTX`` for a TLS server with the external session cache wired to
    the trampolines, and nothing of OpenSSL's own cache.

    @ivar cipher_ids: the ids of the TLS 1.2 ciphers and TLS 1.3 suites the
        context allows, as L{set_ciphers} last left them.
    """

    cipher_ids: frozenset[int] = frozenset()

    def __init__(self, internal_cache: bool = False) -> None:
        """
        @param internal_cache: leave sessions to OpenSSL's own in-memory
            cache and install no callbacks: plain OpenSSL, which the engine
            benchmark measures the engine against.
        """
        ctx = _lib.SSL_CTX_new(_lib.TLS_server_method())
        _check(ctx != ffi.NULL, "SSL_CTX_new")
        self._ctx = ffi.gc(ctx, _lib.SSL_CTX_free)
        _lib.SSL_CTX_ctrl(
            ctx, _SSL_CTRL_SET_SESS_CACHE_MODE,
            _SSL_SESS_CACHE_SERVER if internal_cache
            else _SSL_SESS_CACHE_SERVER_NO_INTERNAL, ffi.NULL)
        # NO_TICKET: TLS 1.2 without stateless tickets, and TLS 1.3 with
        # stateful tickets whose identity is the session id
        # (docs/architecture.md).
        _lib.SSL_CTX_set_options(
            ctx,
            _SSL_OP_NO_TICKET | _SSL_OP_NO_COMPRESSION
            | _SSL_OP_CIPHER_SERVER_PREFERENCE | _SSL_OP_NO_RENEGOTIATION,
        )
        # The same modes pyOpenSSL sets, which Twisted's write loop expects;
        # RELEASE_BUFFERS keeps idle connections small.
        _lib.SSL_CTX_ctrl(
            ctx, _SSL_CTRL_MODE,
            _SSL_MODE_ENABLE_PARTIAL_WRITE | _SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
            | _SSL_MODE_RELEASE_BUFFERS,
            ffi.NULL,
        )
        if internal_cache:
            return
        _lib.SSL_CTX_sess_set_new_cb(ctx, _new_session_trampoline)
        _lib.SSL_CTX_sess_set_get_cb(ctx, _get_session_trampoline)
        _lib.SSL_CTX_set_generate_session_id(ctx, _generate_session_id_trampoline)
        _lib.SSL_CTX_set_client_hello_cb(ctx, _client_hello_trampoline, ffi.NULL)

    def load_certificate_chain(self, path: str) -> None:
        _lib.ERR_clear_error()
        _check(_lib.SSL_CTX_use_certificate_chain_file(
            self._ctx, path.encode("utf-8")) == 1, "certificate chain")

    def load_private_key(self, path: str) -> None:
        """
        @raise NativeKeyMismatch: the key is not that of the certificate
            loaded before it.
        @raise NativeError: it cannot be read.
        """
        _lib.ERR_clear_error()
        if _lib.SSL_CTX_use_PrivateKey_file(
                self._ctx, path.encode("utf-8"), _SSL_FILETYPE_PEM) != 1:
            errors = take_errors()
            # OpenSSL checks a key against the certificate already loaded.
            mismatch = any(reason == "key values mismatch"
                           for _, reason in errors)
            raise (NativeKeyMismatch if mismatch else NativeError)(
                "private key", errors)
        if _lib.SSL_CTX_check_private_key(self._ctx) != 1:
            raise NativeKeyMismatch(
                "private key does not match the certificate", take_errors())

    def set_versions(self, minimum: int, maximum: int) -> None:
        _check(_lib.SSL_CTX_ctrl(self._ctx, _SSL_CTRL_SET_MIN_PROTO_VERSION,
                                 minimum, ffi.NULL) == 1, "minimum version")
        _check(_lib.SSL_CTX_ctrl(self._ctx, _SSL_CTRL_SET_MAX_PROTO_VERSION,
                                 maximum, ffi.NULL) == 1, "maximum version")

    def set_ciphers(self, tls12_ciphers: str, tls13_suites: str) -> None:
        _lib.ERR_clear_error()
        _check(_lib.SSL_CTX_set_cipher_list(
            self._ctx, tls12_ciphers.encode("ascii")) == 1, "TLS 1.2 ciphers")
        _check(_lib.SSL_CTX_set_ciphersuites(
            self._ctx, tls13_suites.encode("ascii")) == 1, "TLS 1.3 suites")
        # OpenSSL keeps both lists in one stack, TLS 1.3 suites first.
        ciphers = _lib.SSL_CTX_get_ciphers(self._ctx)
        self.cipher_ids = frozenset(
            _lib.SSL_CIPHER_get_id(ffi.cast(
                "const SSL_CIPHER *", _lib.OPENSSL_sk_value(ciphers, index)))
            for index in range(_lib.OPENSSL_sk_num(ciphers)))

    def set_groups(self, groups: str) -> None:
        _lib.ERR_clear_error()
        names = ffi.new("char[]", groups.encode("ascii"))
        _check(_lib.SSL_CTX_ctrl(self._ctx, _SSL_CTRL_SET_GROUPS_LIST, 0,
                                 names) == 1, "groups")

    def set_session_id_context(self, context: bytes) -> None:
        _check(_lib.SSL_CTX_set_session_id_context(
            self._ctx, context, len(context)) == 1, "session id context")

    def set_session_lifetime(self, seconds: int) -> None:
        _lib.SSL_CTX_set_timeout(self._ctx, seconds)

    def set_tls13_tickets(self, count: int) -> None:
        _check(_lib.SSL_CTX_set_num_tickets(self._ctx, count) == 1, "tickets")

    def select_alpn(self, refuse_without_overlap: bool) -> None:
        """
        Let each connection's owner choose among the application protocols
        a client offers (C{_on_select_alpn}).  Without this, OpenSSL
        ignores ALPN.

        @param refuse_without_overlap: when the owner chooses none, end the
            handshake with a fatal no_application_protocol alert (RFC 7301,
            3.2); otherwise go on without ALPN.
        """
        _lib.SSL_CTX_set_alpn_select_cb(
            self._ctx, _alpn_trampoline,
            _ALPN_REFUSE if refuse_without_overlap else _ALPN_GO_ON)


class NativeConnection:
    """
    A server-side ``SSL`` reading from and writing to memory BIOs, owned by
    a Python object that answers the trampolines (see the module docstring).

    Each operation returns the result code of C{SSL_get_error} as one of the
    C{RESULT_*} names; the caller turns them into exceptions.
    """

    def __init__(self, context: NativeContext, owner: SessionOwner) -> None:
        ssl = _lib.SSL_new(context._ctx)
        _check(ssl != ffi.NULL, "SSL_new")
        self._ssl = ffi.gc(ssl, _free_ssl)
        self._owner = weakref.ref(owner)
        _connections[ssl] = weakref.ref(self)
        # Out-parameters of the calls a handshake makes, allocated once.
        self._length = ffi.new("unsigned int *")
        self._size = ffi.new("size_t *")
        self._pointer = ffi.new("unsigned char **")
        self._into_ssl = _lib.BIO_new(_lib.BIO_s_mem())
        self._from_ssl = _lib.BIO_new(_lib.BIO_s_mem())
        _check(self._into_ssl != ffi.NULL and self._from_ssl != ffi.NULL,
               "BIO_new")
        # The SSL now owns both BIOs and frees them with itself.
        _lib.SSL_set_bio(ssl, self._into_ssl, self._from_ssl)
        _lib.SSL_set_accept_state(ssl)

    def client_hello_session_id(self) -> bytes:
        """
        The legacy session id of the ClientHello; only during
        C{_on_client_hello}.
        """
        pointer = self._pointer
        length = _lib.SSL_client_hello_get0_session_id(self._ssl, pointer)
        return _bytes(pointer[0], length)

    def client_hello_extension(self, extension_type: int) -> bytes | None:
        """
        The body of one extension of the ClientHello as the client sent it,
        or C{None} when the client did not send it; only during
        C{_on_client_hello}.
        """
        pointer, size = self._pointer, self._size
        if not _lib.SSL_client_hello_get0_ext(
            self._ssl, extension_type, pointer, size
        ):
            return None
        return _bytes(pointer[0], size[0])

    def use_context(self, context: NativeContext) -> None:
        """
        Continue this handshake with another context: its certificate and
        session id context (how SNI picks a virtual service); only during
        C{_on_client_hello}.
        """
        _lib.SSL_set_SSL_CTX(self._ssl, context._ctx)

    def _result(self, returned: int) -> int:
        if returned > 0:
            return RESULT_OK
        return _lib.SSL_get_error(self._ssl, returned)

    def handshake(self) -> int:
        _lib.ERR_clear_error()
        return self._result(_lib.SSL_do_handshake(self._ssl))

    def read(self, size: int) -> tuple[bytes, int]:
        _lib.ERR_clear_error()
        buffer = ffi.new("char[]", size)
        count = _lib.SSL_read(self._ssl, buffer, size)
        if count > 0:
            return ffi.buffer(buffer, count)[:], RESULT_OK
        return b"", self._result(count)

    def write(self, data: bytes) -> tuple[int, int]:
        _lib.ERR_clear_error()
        count = _lib.SSL_write(self._ssl, data, len(data))
        return max(count, 0), self._result(count)

    def shutdown(self) -> tuple[bool, int]:
        """
        @return: whether both sides have now sent close_notify, and the
            result code.
        """
        _lib.ERR_clear_error()
        returned = _lib.SSL_shutdown(self._ssl)
        if returned >= 0:
            return returned == 1, RESULT_OK
        return False, _lib.SSL_get_error(self._ssl, returned)

    def sent_shutdown(self) -> bool:
        return bool(_lib.SSL_get_shutdown(self._ssl) & _SSL_SENT_SHUTDOWN)

    def feed(self, data: bytes) -> int:
        return _lib.BIO_write(self._into_ssl, data, len(data))

    def output_pending(self) -> int:
        return _lib.BIO_ctrl_pending(self._from_ssl)

    def input_pending(self) -> int:
        return _lib.BIO_ctrl_pending(self._into_ssl)

    def take_output(self, size: int) -> bytes:
        size = min(size, _lib.BIO_ctrl_pending(self._from_ssl))
        if size <= 0:
            return b""
        buffer = ffi.new("char[]", size)
        count = _lib.BIO_read(self._from_ssl, buffer, size)
        return ffi.buffer(buffer, max(count, 0))[:]

    def mark_input_eof(self) -> None:
        # Reads past the end of the memory BIO now report EOF (0) instead of
        # "retry", which OpenSSL turns into a clean or unexpected EOF.
        _lib.BIO_ctrl(self._into_ssl, _BIO_C_SET_BUF_MEM_EOF_RETURN, 0, ffi.NULL)

    def pending(self) -> int:
        return _lib.SSL_pending(self._ssl)

    def session_reused(self) -> bool:
        return bool(_lib.SSL_session_reused(self._ssl))

    def protocol_version(self) -> int:
        return _lib.SSL_version(self._ssl)

    def cipher_name(self) -> str | None:
        cipher = _lib.SSL_get_current_cipher(self._ssl)
        if cipher == ffi.NULL:
            return None
        return _string(_lib.SSL_CIPHER_get_name(cipher))

    def alpn_selected(self) -> bytes:
        pointer, length = self._pointer, self._length
        _lib.SSL_get0_alpn_selected(self._ssl, pointer, length)
        return _bytes(pointer[0], length[0])

    def server_name(self) -> bytes | None:
        name = _lib.SSL_get_servername(self._ssl, _TLSEXT_NAMETYPE_host_name)
        if name == ffi.NULL:
            return None
        return _char_string(name)

    def session_id(self) -> bytes:
        session = _lib.SSL_get_session(self._ssl)
        if session == ffi.NULL:
            return b""
        return _session_id(session, self._length)

    def export_keying_material(self, label: bytes, length: int,
                               context: bytes) -> bytes:
        out = ffi.new("unsigned char[]", length)
        _lib.ERR_clear_error()
        _check(_lib.SSL_export_keying_material(
            self._ssl, out, length, label, len(label), context, len(context),
            1) == 1, "keying material export")
        return ffi.buffer(out, length)[:]
