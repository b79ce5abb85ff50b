"""
The names of a cluster and its nodes, and the URI that names a node.

A node's identity is the URI C{sslshare://<cluster>/<node id>}: its
certificate carries it as its one subject alternative name URI, a peer reads
it back to know who dialled, and the config, the development PKI and the
cluster channel all apply the one rule here for what a cluster name or a node
id may be.

The rule is lower case only.  service_identity compares the URI's host part
as a lower-case DNS name, so a name with upper case would have two spellings
that disagree, and a certificate issued for C{Node1} would name a node the
config could not.  Names also end up in file names, so they carry no slash,
colon or space and do not start with a dot.

This module reads and writes strings; it never touches a certificate.
"""

from __future__ import annotations

import re

URI_SCHEME = "sslshare"

MAX_NAME_LENGTH = 64

NAME_PATTERN = re.compile(rf"[a-z0-9][a-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}")
"""
What a cluster name or node id may be.
"""

NAME_RULE = ("1 to 64 characters of a-z, 0-9, '.', '_' and '-', starting "
             "with a letter or a digit")
"""
L{NAME_PATTERN} in words, for messages.
"""


def is_name(value: object) -> bool:
    """
    Whether C{value} is a usable cluster name or node id.
    """
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


def validate_name(kind: str, value: str) -> str:
    """
    C{value}, if it is a usable cluster name or node id.

    @param kind: what C{value} is, for the message (C{"node id"}).
    @raise ValueError: it is not (the message says why).
    """
    if not is_name(value):
        raise ValueError(f"{kind} {value!r} is not a valid name: use "
                         f"{NAME_RULE}")
    return value


def node_uri(cluster: str, node_id: str) -> str:
    """
    The identity of C{node_id} of C{cluster}: C{sslshare://<cluster>/<node id>}.

    @raise ValueError: C{cluster} or C{node_id} is not a valid name.
    """
    validate_name("cluster name", cluster)
    validate_name("node id", node_id)
    return f"{URI_SCHEME}://{cluster}/{node_id}"


def node_of(uri: str, cluster: str) -> str | None:
    """
    The node id that C{uri} names in C{cluster}, or C{None} when it names
    nothing in C{cluster} (another scheme or another cluster).

    @raise ValueError: C{cluster} is not a valid name, or C{uri} is in
        C{cluster} but its node id is not a valid name.
    """
    prefix = f"{URI_SCHEME}://{validate_name('cluster name', cluster)}/"
    if not uri.startswith(prefix):
        return None
    return validate_name("node id", uri[len(prefix):])
