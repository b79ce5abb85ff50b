"""
Helpers shared by the tests, one module per concern:

  - L{files}: private files, the umask a test runs under, file modes.
  - L{pki}: the test CA and the server identities it signs.
  - L{sessions}: session ids and states, Hypothesis strategies for them,
    what a lookup finds.
  - L{wire}: ClientHellos and TLS records built and read by hand, and an
    exchange that judges what a server did with them.
  - L{clients}: Python C{ssl} and C{openssl s_client} rounds, their
    contexts, and clients that misbehave.
  - L{servers}: engine contexts sharing sessions, backends, and peers that
    misbehave.
  - L{cluster}: clusters of real nodes on 127.0.0.1, and lookups over TCP.
  - L{databases}: the Redis and PostgreSQL servers the tests run against.
  - L{processes}: child processes, and what this process holds (memory,
    descriptors, connections).
  - L{waiting}: waiting for a condition or a listening port.
  - L{metrics}: a node's metrics page, scraped and parsed.
  - L{memory}: in-memory doubles of a node's peers and repository on one
    clock.
  - L{suite}: which test modules are slow, for C{make test-quick}.
"""
