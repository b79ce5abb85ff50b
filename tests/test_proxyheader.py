"""
L{sslshare.proxyheader}: the headers, read back with Twisted's own PROXY
protocol parsers, and the TLVs of version 2 byte by byte.
"""

from __future__ import annotations

import struct

from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.trial.unittest import SynchronousTestCase

from sslshare import proxyheader

CONNECTION = proxyheader.Connection(
    client=("203.0.113.7", 40001), server=("10.0.0.1", 443),
    tls_version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256",
    server_name="www.example.com", alpn=b"h2", resumed="peer")


def _tlvs(data):
    found = {}
    while data:
        kind, length = struct.unpack("!BH", data[:3])
        found[kind] = data[3:3 + length]
        data = data[3 + length:]
    return found


class HeaderTests(SynchronousTestCase):

    def test_v1_reads_back(self):
        info = V1Parser.parse(proxyheader.v1(CONNECTION)[:-2])
        self.assertEqual((info.source.host, info.source.port,
                          info.destination.host, info.destination.port),
                         ("203.0.113.7", 40001, "10.0.0.1", 443))

    def test_v2_reads_back(self):
        info = V2Parser.parse(proxyheader.v2(CONNECTION))
        self.assertEqual((info.source.host, info.source.port,
                          info.destination.host, info.destination.port),
                         ("203.0.113.7", 40001, "10.0.0.1", 443))

    def test_v2_tlvs(self):
        header = proxyheader.v2(CONNECTION)
        (length,) = struct.unpack("!H", header[14:16])
        self.assertEqual(len(header), 16 + length)
        tlvs = _tlvs(header[16 + 12:])
        self.assertEqual((tlvs[0x01], tlvs[0x02], tlvs[0xE0]),
                         (b"h2", b"www.example.com", b"peer"))
        ssl = tlvs[0x20]
        self.assertEqual(struct.unpack("!BI", ssl[:5]), (0x01, 0))
        self.assertEqual(_tlvs(ssl[5:]), {
            0x21: b"TLSv1.3", 0x23: b"TLS_AES_128_GCM_SHA256"})

    def test_ipv6_and_an_ipv4_client_on_an_ipv6_socket(self):
        mixed = proxyheader.Connection(
            client=("192.0.2.1", 1), server=("::1", 443),
            tls_version="TLSv1.2", cipher=None, server_name=None, alpn=None,
            resumed="full")
        self.assertEqual(proxyheader.v1(mixed),
                         b"PROXY TCP6 ::ffff:c000:201 ::1 1 443\r\n")
        info = V2Parser.parse(proxyheader.v2(mixed))
        self.assertEqual(info.destination.host, "0:0:0:0:0:0:0:1")

    def test_a_unix_listener_says_unknown_or_local(self):
        local = proxyheader.Connection(
            client=None, server=None, tls_version="TLSv1.3", cipher=None,
            server_name=None, alpn=None, resumed="full")
        self.assertEqual(proxyheader.v1(local), b"PROXY UNKNOWN\r\n")
        header = proxyheader.v2(local)
        self.assertEqual(header[12:14], b"\x20\x00")
        self.assertIsNone(V2Parser.parse(header).source)

    def test_an_unknown_version_is_refused(self):
        self.assertRaises(ValueError, proxyheader.header, "v3", CONNECTION)
