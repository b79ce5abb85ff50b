"""
Throwaway database servers: a real C{redis-server} or PostgreSQL started
in a temporary directory on a free port of 127.0.0.1, for the demo, the
benchmarks and the tests.

Each server is a child process (C{subprocess}, not the reactor, so that it
can start before a reactor runs and outlive one), with its files in a fresh
temporary directory removed when it goes.  Start-up and shutdown block for
a few milliseconds.

Running as root: PostgreSQL's initdb and postgres refuse root, so when this
process runs as root both run as an unprivileged user ("postgres" when that
user exists, as after C{apt-get install postgresql}, else "nobody"), which
owns the temporary directory (made under /tmp, which every user can reach).

Nothing here is used by a running node.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time


class ServerFailed(Exception):
    """
    A server did not start or answer in time; the message ends with the
    tail of its log.
    """


_ports_given: set[int] = set()

# Ports given to the processes of this user, one file per port holding the
# pid it went to: processes that run side by side (trial -j, a test run
# beside another) would otherwise give one port to two servers, the second
# failing to listen when the first started in the meantime.
_CLAIMS = os.path.join(tempfile.gettempdir(), f"sslshare-ports-{os.getuid()}")


@functools.cache
def _port_range() -> tuple[int, int]:
    """
    Where to look for free ports: outside the kernel's ephemeral range
    (Linux: /proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by
    default), above the demo's and the usual services' ports; the whole
    unprivileged range when the ephemeral one leaves too little room.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(field) for field in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low - 10000 >= 4096:
        return 10000, low - 1
    if 65535 - high >= 4096:
        return high + 1, 65535
    return 1024, 65535


def free_port():
    """
    A TCP port on 127.0.0.1 that nothing listened on a moment ago, for
    configurations that must name their ports before anything starts.

    It is taken outside the kernel's ephemeral range where it can be: a
    port the kernel picked there can be a client connection's own port by
    the time its server listens (every outgoing connection takes one),
    which fails the listen.  A port is given once per process, and to one
    process at a time.
    """
    first, last = _port_range()
    for _ in range(1000):
        port = random.randint(first, last)
        if port in _ports_given:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        if not _claim(port):
            continue
        _ports_given.add(port)
        return port
    raise OSError(f"no free TCP port on 127.0.0.1 from {first} to {last}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # It exists, as another user's.
        return True
    return True


def _claim(port: int) -> bool:
    """
    Claim C{port} for this process, unless a live process of this user
    has; a claim of a process that has ended is taken over.  The claims
    are read and written under one lock, held only meanwhile.
    """
    os.makedirs(_CLAIMS, mode=0o700, exist_ok=True)
    path = os.path.join(_CLAIMS, str(port))
    with open(os.path.join(_CLAIMS, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                owner = int(f.read())
        except (OSError, ValueError):
            owner = None
        if owner is not None and owner != os.getpid() and _alive(owner):
            return False
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    if not _ports_given:
        atexit.register(_release_claims)
    return True


def _release_claims() -> None:
    for port in _ports_given:
        try:
            os.unlink(os.path.join(_CLAIMS, str(port)))
        except OSError:
            pass


class ServerUnavailable(Exception):
    """
    A server binary a test needs is not installed; the message says which
    and where it was looked for (tests turn it into a skip).
    """


def redis_server_binary():
    """
    The path of C{redis-server}, from the C{PATH} or C{/usr/bin}.

    @raise ServerUnavailable: not installed.
    """
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK)
        else None)
    if found is None:
        raise ServerUnavailable(
            "redis-server not found on the PATH or in /usr/bin "
            "(Debian: apt-get install redis-server)")
    return found


def postgres_binaries():
    """
    The directory holding C{initdb} and C{postgres}: the one of C{initdb}
    on the C{PATH}, else the newest C{/usr/lib/postgresql/*/bin}.

    @raise ServerUnavailable: not installed.
    """
    candidates = []
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(os.path.dirname(os.path.realpath(initdb)))

    def version(path):
        number = path.split(os.sep)[-2]
        return int(number) if number.isdigit() else 0

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version,
                         reverse=True)
    for directory in candidates:
        if all(os.access(os.path.join(directory, name), os.X_OK)
               for name in ("initdb", "postgres")):
            return directory
    raise ServerUnavailable(
        "PostgreSQL's initdb and postgres not found on the PATH or in "
        "/usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)")


def _wait_until(ready, process, what, log_path=None, timeout=20.0):
    """
    Call C{ready()} until it is true; fail if C{process} ends first or
    C{timeout} seconds pass.  Blocking.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"{what} ended with status {process.returncode}"
                                 + _log_tail(log_path))
        if ready():
            return
        time.sleep(0.02)
    raise ServerFailed(f"{what} was not ready in {timeout} s"
                         + _log_tail(log_path))


def _log_tail(path):
    if path is None:
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return ":\n" + "".join(f.readlines()[-20:])
    except OSError:
        return ""


class _ServerProcess:
    """
    What the servers share: a child process, and a temporary directory.

    @cvar stop_signal: what L{stop} sends by default.
    @cvar stop_wait: seconds L{stop} waits for the process to end.
    """

    stop_signal: signal.Signals
    stop_wait: float

    def __init__(self, prefix):
        self.directory = tempfile.mkdtemp(prefix=prefix)
        self.port = free_port()
        self.process = None

    def stop(self, sig=None):
        """
        Stop the server with C{sig} (by default L{stop_signal}) and wait
        until it has ended.  Blocking.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(self.stop_signal if sig is None else sig)
            self.process.wait(self.stop_wait)
        self.process = None

    def remove(self):
        """
        Stop the server and remove its directory.
        """
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisServer(_ServerProcess):
    """
    A C{redis-server} on 127.0.0.1 with no persistence, in a temporary
    directory:

        redis-server --port <port> --bind 127.0.0.1 --save '' \\
            --appendonly no --dir <tmp> [--requirepass <password>]

    With C{tls} (a L{PKI}), it listens with TLS only (C{--port 0
    --tls-port <port>}), with the PKI's EC localhost certificate, and does
    not ask clients for certificates.  C{arguments} go after these (a
    cluster's or a replica's).

    @ivar port: its TCP port; the same across L{stop} and L{start}.
    """

    # As a crash.
    stop_signal = signal.SIGKILL
    stop_wait = 10.0

    def __init__(self, password=None, tls=None, arguments=()):
        self.binary = redis_server_binary()
        super().__init__("sslshare-redis-")
        self.password = password
        self.tls = tls
        self.extra_arguments = list(arguments)

    @property
    def url(self):
        """
        The C{redis://} (or C{rediss://}) URL of the server, without the
        password.
        """
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def arguments(self):
        arguments = [self.binary, "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", self.directory,
                     "--logfile", os.path.join(self.directory, "redis.log")]
        if self.tls is None:
            arguments += ["--port", str(self.port)]
        else:
            arguments += ["--port", "0", "--tls-port", str(self.port),
                          "--tls-cert-file", self.tls.ec_chain,
                          "--tls-key-file", self.tls.ec_key,
                          "--tls-ca-cert-file", self.tls.ca_cert,
                          "--tls-auth-clients", "no"]
        if self.password is not None:
            arguments += ["--requirepass", self.password]
        return arguments + self.extra_arguments

    def start(self):
        """
        Start the server and wait until it answers.  Blocking.
        """
        self.process = subprocess.Popen(
            self.arguments(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until(self._answers, self.process, "redis-server",
                    os.path.join(self.directory, "redis.log"))
        return self

    def _answers(self):
        # A TCP connection is enough: redis-server listens only once it
        # is ready to serve.
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False



def redis_cli(*arguments, timeout=20.0):
    """
    Run C{redis-cli} (beside C{redis-server}) with C{arguments}; its
    output.  Blocking.

    @raise ServerFailed: it failed.
    """
    binary = os.path.join(os.path.dirname(redis_server_binary()), "redis-cli")
    done = subprocess.run([binary, *arguments], capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0 or done.stdout.startswith("(error)"):
        raise ServerFailed(f"redis-cli {' '.join(arguments)}: "
                           f"{(done.stdout + done.stderr)[-2000:]}")
    return done.stdout


def _info(port, section):
    """
    The fields of C{INFO section} of the server on C{port}.
    """
    try:
        text = redis_cli("-p", str(port), "info", section, timeout=5)
    except (ServerFailed, subprocess.TimeoutExpired):
        return {}
    return dict(line.split(":", 1) for line in text.splitlines()
                if ":" in line and not line.startswith("#"))


class RedisClusterServers:
    """
    A Redis Cluster of C{masters} C{redis-server} masters with no replicas
    on 127.0.0.1, each as L{RedisServer} with C{--cluster-enabled yes},
    joined by C{redis-cli --cluster create}; the slots spread evenly.
    """

    def __init__(self, masters=3):
        # The bus port is the port + 10000 unless named: it may be taken,
        # or past 65535.
        self.servers = [
            RedisServer(arguments=["--cluster-enabled", "yes",
                                   "--cluster-port", str(free_port()),
                                   "--cluster-node-timeout", "2000"])
            for _ in range(masters)]

    @property
    def url(self):
        """
        The C{redis+cluster://} URL naming every master as a seed.
        """
        return "redis+cluster://" + ",".join(
            f"127.0.0.1:{server.port}" for server in self.servers)

    def start(self):
        """
        Start the masters, create the cluster, and wait until every master
        says it is up.  Blocking.
        """
        for server in self.servers:
            server.start()
        redis_cli("--cluster", "create",
                  *(f"127.0.0.1:{server.port}" for server in self.servers),
                  "--cluster-replicas", "0", "--cluster-yes", timeout=60)
        for server in self.servers:
            _wait_until(
                lambda: _info(server.port, "cluster").get(
                    "cluster_enabled") == "1" and "cluster_state:ok"
                in redis_cli("-p", str(server.port), "cluster", "info"),
                server.process, "redis cluster")
        return self

    def remove(self):
        for server in self.servers:
            server.remove()


SENTINEL_CONFIG = """\
port {port}
bind 127.0.0.1
dir {directory}
logfile {directory}/sentinel.log
sentinel monitor {service} 127.0.0.1 {master_port} {quorum}
sentinel down-after-milliseconds {service} {down_after_ms}
sentinel failover-timeout {service} {failover_timeout_ms}
sentinel parallel-syncs {service} 1
"""


class RedisSentinels:
    """
    A master, C{replicas} replicas and C{sentinels} sentinels (each a
    C{redis-server --sentinel}, quorum a majority) watching the master as
    C{service}, on 127.0.0.1.  A master the sentinels cannot reach for
    C{down_after} seconds is replaced by a replica.

    @ivar master: the L{RedisServer} that was master at the start.
    @ivar replicas: the L{RedisServer}s that replicated it then.
    @ivar sentinel_ports: the sentinels' ports.
    """

    service = "sslshare"

    def __init__(self, replicas=1, sentinels=3, down_after=1.0):
        self.master = RedisServer()
        self.replicas = [
            RedisServer(arguments=["--replicaof", "127.0.0.1",
                                   str(self.master.port)])
            for _ in range(replicas)]
        self.down_after = down_after
        self._sentinels = [_ServerProcess("sslshare-sentinel-")
                           for _ in range(sentinels)]
        self.sentinel_ports = [s.port for s in self._sentinels]

    @property
    def sentinels(self):
        """
        The sentinels as C{host:port} strings, as a node's configuration
        names them.
        """
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def start(self):
        """
        Start the master, its replicas (until each is in sync) and the
        sentinels (until each sees every replica and the other sentinels).
        Blocking.
        """
        self.master.start()
        for replica in self.replicas:
            replica.start()
            _wait_until(lambda: _info(replica.port, "replication").get(
                "master_link_status") == "up", replica.process,
                "redis replica")
        quorum = len(self._sentinels) // 2 + 1
        for sentinel in self._sentinels:
            configuration = os.path.join(sentinel.directory, "sentinel.conf")
            with open(configuration, "w") as f:
                f.write(SENTINEL_CONFIG.format(
                    port=sentinel.port, directory=sentinel.directory,
                    service=self.service, master_port=self.master.port,
                    quorum=quorum,
                    down_after_ms=int(self.down_after * 1000),
                    failover_timeout_ms=int(self.down_after * 4000)))
            sentinel.process = subprocess.Popen(
                [redis_server_binary(), configuration, "--sentinel"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        for sentinel in self._sentinels:
            _wait_until(lambda: self._sees_everyone(sentinel.port),
                        sentinel.process, "redis sentinel",
                        os.path.join(sentinel.directory, "sentinel.log"))
        return self

    def _sees_everyone(self, port):
        try:
            text = redis_cli("-p", str(port), "sentinel", "master",
                             self.service, timeout=5)
        except (ServerFailed, subprocess.TimeoutExpired):
            return False
        lines = text.splitlines()
        fields = dict(zip(lines[::2], lines[1::2]))
        return (fields.get("num-slaves") == str(len(self.replicas))
                and fields.get("num-other-sentinels")
                == str(len(self._sentinels) - 1))

    def master_port(self):
        """
        The port of the master the first sentinel names now.
        """
        text = redis_cli("-p", str(self.sentinel_ports[0]), "sentinel",
                         "get-master-addr-by-name", self.service)
        return int(text.split()[1])

    def replicas_of_master(self):
        """
        How many replicas of the master the sentinels name now are online
        (in sync, taking its writes).
        """
        fields = _info(self.master_port(), "replication")
        return sum(1 for name, value in fields.items()
                   if name.startswith("slave") and "state=online" in value)

    def restart_old_master(self):
        """
        Start the first master again after L{master} was stopped, as a
        replica of the master the sentinels promoted (what the sentinels
        would make it too, some seconds after it came back).  Blocking.
        """
        self.master.extra_arguments = ["--replicaof", "127.0.0.1",
                                       str(self.master_port())]
        self.master.start()

    def remove(self):
        for sentinel in self._sentinels:
            if sentinel.process is not None and sentinel.process.poll() is None:
                sentinel.process.kill()
                sentinel.process.wait(10)
            shutil.rmtree(sentinel.directory, ignore_errors=True)
        for server in (self.master, *self.replicas):
            server.remove()


def _unprivileged_user():
    """
    (uid, gid) to run PostgreSQL as when this process is root, else
    C{None}.
    """
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise ServerUnavailable("running as root, and neither a postgres nor a "
                            "nobody user exists to run PostgreSQL as")


class PostgresServer(_ServerProcess):
    """
    A PostgreSQL cluster of its own in a temporary directory, made with

        initdb -D <tmp>/data -A trust -U postgres -E UTF8 --locale=C \\
            --no-sync --no-instructions

    and run as the postmaster itself (not through C{pg_ctl}, which
    detaches: the test needs the process to kill it):

        postgres -D <tmp>/data -p <port> -k <tmp> \\
            -c listen_addresses=127.0.0.1 -c fsync=off ...

    When this process is root, both run as the user from
    L{_unprivileged_user} (C{subprocess} C{user=}/C{group=}, no
    supplementary groups: what C{setpriv --reuid --regid --clear-groups}
    does), and that user owns the directory.

    Authentication: C{trust} for everyone, except two roles that prove
    the repository's options: C{sslshare_password} (password
    L{PASSWORD}, C{scram-sha-256}) and C{sslshare_tls} (C{trust}, over
    TLS only).  TLS is on, with the EC localhost certificate of L{pki}.

    @ivar port: its TCP port; the same across L{stop} and L{start}.
    """

    PASSWORD = "correct horse battery staple"
    # PostgreSQL's immediate shutdown: every backend ends at once,
    # connections break, and the next start runs crash recovery (a SIGKILL
    # of the postmaster alone would leave its backends running).
    stop_signal = signal.SIGQUIT
    stop_wait = 20.0

    def __init__(self, tls=None, survives_kill=False):
        """
        @param tls: an object with C{ec_chain} and C{ec_key} paths, to
            accept TLS with that certificate; C{None} for plain TCP only.
        @param survives_kill: commit synchronously, so that what a client
            saw committed is still there after the server is killed and
            started again (fault tests); otherwise the last commits may be
            lost, which a throwaway server does not mind.
        """
        self.tls = tls
        self.survives_kill = survives_kill
        self.bin = postgres_binaries()
        self.user = _unprivileged_user()
        super().__init__("sslshare-pg-")
        self.data = os.path.join(self.directory, "data")
        self.log = os.path.join(self.directory, "postgres.log")
        self._roles_made = False
        self._chown(self.directory)
        self._run([os.path.join(self.bin, "initdb"), "-D", self.data,
                   "-A", "trust", "-U", "postgres", "-E", "UTF8",
                   "--locale=C", "--no-sync", "--no-instructions"])
        self._configure()

    def _chown(self, path):
        if self.user is not None:
            os.chown(path, *self.user)

    def _as_user(self):
        if self.user is None:
            return {}
        return {"user": self.user[0], "group": self.user[1], "extra_groups": []}

    def _run(self, arguments):
        result = subprocess.run(arguments, stdin=subprocess.DEVNULL,
                                capture_output=True, cwd=self.directory,
                                **self._as_user())
        if result.returncode != 0:
            raise ServerFailed(
                f"{' '.join(arguments)} failed ({result.returncode}):\n"
                + result.stderr.decode("utf-8", "replace"))

    def _configure(self):
        # The server reads its key only when the key is private to it.
        if self.tls is not None:
            for source, name in [(self.tls.ec_chain, "server.crt"),
                                 (self.tls.ec_key, "server.key")]:
                target = os.path.join(self.data, name)
                shutil.copyfile(source, target)
                os.chmod(target, 0o600)
                self._chown(target)
        hba = os.path.join(self.data, "pg_hba.conf")
        with open(hba) as f:
            original = f.read()
        # The first matching line wins: the two special roles come first.
        with open(hba, "w") as f:
            f.write("host all sslshare_password 127.0.0.1/32 scram-sha-256\n"
                    "hostssl all sslshare_tls 127.0.0.1/32 trust\n"
                    "hostnossl all sslshare_tls 127.0.0.1/32 reject\n"
                    + original)

    def dsn(self, user="postgres"):
        """
        A libpq connection string for C{user} on the server's TCP port.
        """
        return (f"host=127.0.0.1 port={self.port} dbname=postgres "
                f"user={user}")

    def start(self):
        """
        Start the postmaster and wait until it accepts connections.
        Blocking.
        """
        arguments = [os.path.join(self.bin, "postgres"), "-D", self.data,
                     "-p", str(self.port), "-k", self.directory,
                     "-c", "listen_addresses=127.0.0.1",
                     # A throwaway cluster: durability against a crash of
                     # the machine buys nothing.
                     "-c", "fsync=off", "-c", "full_page_writes=off",
                     "-c", "synchronous_commit="
                     + ("on" if self.survives_kill else "off"),
                     "-c", "max_connections=40"]
        if self.tls is not None:
            arguments += ["-c", "ssl=on", "-c", "ssl_cert_file=server.crt",
                          "-c", "ssl_key_file=server.key"]
        log = open(self.log, "ab")
        try:
            self.process = subprocess.Popen(
                arguments, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=self.directory, **self._as_user())
        finally:
            log.close()
        _wait_until(self._answers, self.process, "postgres", self.log)
        if not self._roles_made:
            self.execute("CREATE ROLE sslshare_password LOGIN PASSWORD "
                         "'" + self.PASSWORD + "'")
            self.execute("CREATE ROLE sslshare_tls LOGIN")
            # Each has a schema of its own, first on its search path
            # ("$user"), so its table is its own.
            self.execute("CREATE SCHEMA AUTHORIZATION sslshare_password")
            self.execute("CREATE SCHEMA AUTHORIZATION sslshare_tls")
            self._roles_made = True
        return self

    def _answers(self):
        import psycopg

        try:
            psycopg.connect(self.dsn(), connect_timeout=2,
                            sslmode="disable").close()
            return True
        except psycopg.OperationalError:
            return False

    def execute(self, statement, *parameters):
        """
        Run one SQL statement as the superuser; the rows it returns, if
        any.  Blocking.
        """
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True,
                             sslmode="disable") as connection:
            cursor = connection.execute(statement, parameters or None)
            return cursor.fetchall() if cursor.description else None

