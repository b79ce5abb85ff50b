"""
The C{twistd sslshare} plugin; everything else is in L{sslshare.service}.
"""

from twisted.application.service import ServiceMaker

sslshare = ServiceMaker(
    "sslshare",
    "sslshare.service",
    "A TLS server node that shares TLS sessions across its cluster.",
    "sslshare",
)
