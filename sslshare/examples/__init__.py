"""
The example configurations installed with sslshare: C{example.toml} (every
key, explained; C{sslshare config example} prints it), C{node1.toml} to
C{node3.toml} (the demo cluster; C{sslshare demo} writes them beside its
PKI) and C{sslshare@.service} (a systemd template unit).  Data only.
"""

from importlib.resources import files


def text(name: str) -> str:
    """
    The example file C{name}, as installed.
    """
    return files(__name__).joinpath(name).read_text(encoding="utf-8")
