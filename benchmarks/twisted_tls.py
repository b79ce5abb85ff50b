"""
A TLS-terminating TCP proxy made of stock Twisted parts and nothing else:
the floor that Twisted's own TLS transport sets under any server built on
it, for the rate benchmark's reference kinds (L{benchmarks.rates}).

It is what an sslshare node is without sslshare: a C{listenSSL} port
(Twisted's C{TLSMemoryBIOProtocol} over a pyOpenSSL context) and
C{twisted.protocols.portforward}'s proxy to the backend.  As the other
references, OpenSSL's own session cache resumes (tickets off, so TLS 1.3
resumes from it too); no cluster, no digest, no external cache.  The
client factory is quiet, as sslshare's backend connection is: Twisted's
default logs two lines per connection.

    python -m benchmarks.twisted_tls PORT BACKEND_PORT CHAIN KEY
"""

from __future__ import annotations

import hashlib
import sys

from OpenSSL import SSL
from twisted.internet import reactor, ssl
from twisted.protocols import portforward


class _QuietProxyClientFactory(portforward.ProxyClientFactory):
    noisy = False


class ProxyServer(portforward.ProxyServer):
    """
    C{portforward}'s proxy, connecting to the backend quietly.
    """

    clientProtocolFactory = _QuietProxyClientFactory


class ContextFactory(ssl.ContextFactory):
    """
    One pyOpenSSL context for every connection, serving C{chain} (the
    certificate, then its issuers) with C{key}, resuming from OpenSSL's
    own session cache.
    """

    def __init__(self, chain: str, key: str) -> None:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        # OpenSSL 3.0 takes a client's close without close_notify (what
        # most clients do once the answer is in) for a fatal error and
        # drops the session from its cache, so that the benchmark's clients
        # would never resume (they resume at HAProxy and nginx).
        context.set_options(SSL.OP_NO_TICKET | SSL.OP_IGNORE_UNEXPECTED_EOF)
        context.use_certificate_chain_file(chain)
        context.use_privatekey_file(key)
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        context.set_session_id(hashlib.sha256(b"twisted-tls").digest())
        self._context = context

    def getContext(self) -> SSL.Context:
        return self._context


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    port, backend_port, chain, key = argv
    factory = portforward.ProxyFactory("127.0.0.1", int(backend_port))
    factory.protocol = ProxyServer
    factory.noisy = False
    reactor.listenSSL(int(port), factory, ContextFactory(chain, key),
                      interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
