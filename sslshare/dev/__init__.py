"""
Tools for development, demos, tests and benchmarks, apart from the runtime:
the development PKI (L{pki}), the demo cluster (L{demo}) and throwaway
redis-server and PostgreSQL processes (L{throwaway}).  A running node
imports none of them.
"""
