"""
Files as a node's configuration wants them: private files, the umask a test
runs under, and the modes files end up with.
"""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import TestCase


def write_private(path: str, data: bytes = b"") -> str:
    """
    Write C{data} to a new file at C{path}, mode 0600 from the start, as a
    node's configuration requires of its keys and password files.
    """
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
              "wb") as f:
        f.write(data)
    return path


def umask_for_test(testcase: TestCase, mask: int) -> None:
    """
    Set the process's umask to C{mask} until C{testcase} ends: files made
    meanwhile get exactly the mode their maker asks for, unless the maker
    sets it itself.
    """
    testcase.addCleanup(os.umask, os.umask(mask))


def file_mode(path: str) -> int:
    """
    The permission bits of C{path}.
    """
    return stat.S_IMODE(os.stat(path).st_mode)
