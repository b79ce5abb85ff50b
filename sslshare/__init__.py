"""
sslshare: one TLS session, many servers.

A cluster of Twisted TLS servers that share TLS sessions, so that a client
resumes on any node the session it negotiated with another.  See README.rst
for running it and docs/architecture.md for how the parts fit.
"""

__version__ = "0.1.0"
