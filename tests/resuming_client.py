"""
A stock Python C{ssl} client that resumes one session over and over,
alternating between servers: the load of the engine's leak test, run as a
separate process so that the server's memory is measured alone.

    python resuming_client.py CA_FILE VERSION COUNT PORT [PORT ...]

Prints one line: C{resumed=N full=M}.
"""

import socket
import ssl
import sys


def main(ca_file: str, version: str, count: str, *ports: str) -> None:
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = context.maximum_version = getattr(
        ssl.TLSVersion, version.replace(".", "_"))
    session = None
    resumed = full = 0
    for index in range(int(count)):
        port = int(ports[index % len(ports)])
        with socket.create_connection(("127.0.0.1", port)) as raw:
            # As browsers do: without it, the request after a resumed TLS 1.2
            # handshake waits for the server's delayed ACK (40 ms).
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, server_hostname="localhost",
                                     session=session) as client:
                client.sendall(b"x")
                while client.recv(1024):
                    pass
                if client.session_reused:
                    resumed += 1
                else:
                    full += 1
                session = client.session
    print(f"resumed={resumed} full={full}")


if __name__ == "__main__":
    main(*sys.argv[1:])
