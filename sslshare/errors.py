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


def read_bytes(path: str, error: type[FileError] = FileError) -> bytes:
    """
    The contents of the file at C{path}.

    @param error: the L{FileError} subclass to raise, that of the module
        reading.
    @raise FileError: C{error}, when the file cannot be read, with the reason
        the system gave.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise error(path, f"cannot read ({e.strerror})") from None


class CertificateKeyMismatch(FileError):
    """
    A private key file does not hold the key of its certificate file.

    @ivar certificate: the certificate file.
    """

    def __init__(self, path: str, certificate: str) -> None:
        super().__init__(path, f"does not match {certificate}")
        self.certificate = certificate
