"""
The error a user fixes by mending one file: it names the file and says why.

Each module that reads or writes files has its own subclass, so callers can
tell them apart; the commands catch them all as L{FileError} and print the
message as one line.
"""


class FileError(Exception):
    """
    A file is unusable.

    @ivar path: the file (or directory) concerned.
    @ivar reason: what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
