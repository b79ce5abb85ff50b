"""
tlsfuzzer's scripts against an sslshare node, beside plain OpenSSL: which
pass, which fail, and why; the table goes to C{docs/tlsfuzzer.md}.

Usage, from the root of a checkout (also C{make tlsfuzzer TLSFUZZER=DIR})::

    .venv/bin/python benchmarks/tlsfuzzer.py CHECKOUT [--python PYTHON]
        [--script NAME ...] [--target NAME ...] [--timeout S] [--keep]
        [--output FILE]

C{CHECKOUT} is a checkout of https://github.com/tlsfuzzer/tlsfuzzer (it is
not on PyPI); C{PYTHON} a Python that has the C{tlslite-ng} version its
C{requirements.txt} names and C{ecdsa} (default: this one)::

    git clone https://github.com/tlsfuzzer/tlsfuzzer ../tlsfuzzer
    python3 -m venv ../tlsfuzzer-venv
    ../tlsfuzzer-venv/bin/pip install -r ../tlsfuzzer/requirements.txt ecdsa

This runs outside CI, which cannot fetch tlsfuzzer.

What runs
=========

Each target is started once, on 127.0.0.1, and every script of L{SCRIPTS}
runs against it in turn (C{scripts/<name>.py -h 127.0.0.1 -p PORT ...},
from the checkout, with a time limit each):

    - C{openssl s_server}: the baseline.  Plain OpenSSL (the same library
      the node binds) with the node's settings: the same certificate, TLS
      1.2 and 1.3, the same cipher lists, groups and ALPN (http/1.1),
      server preference, no
      renegotiation, no TLS 1.2 tickets and one stateful TLS 1.3 ticket per
      handshake (C{-no_ticket -num_tickets 1}), its own session cache;
      C{-www} answers the scripts' C{GET /};
    - C{sslshare}: one C{twistd -n sslshare} node proxying to Python's
      C{http.server}: its sessions go through sslshare's external cache
      (sealed, in the node's store) instead of OpenSSL's;
    - C{sslshare x2}: two nodes sharing sessions behind HAProxy
      (C{mode tcp}, round robin), so that consecutive connections of a
      script land on different nodes: every resumption a script tries is a
      cross-node one.

All of them serve an RSA-2048 certificate (tlsfuzzer's TLS 1.2 scripts
mostly offer RSA and ECDHE_RSA suites) and offer, after the node's default
TLS 1.2 list (ECDHE with AES-GCM or ChaCha20), C{ECDHE-RSA-AES128-SHA} and
C{AES128-SHA}: several scripts offer only those CBC suites and would
otherwise stop at the first ClientHello, testing the cipher policy instead
of the session code.

A script's tests that cannot apply to this server are excluded with C{-e}
(the reason is in L{SCRIPTS} and in the table); every other failure is
reported with the exception tlsfuzzer raised.  L{NOTES} holds what was
found when investigating a failure, printed beside it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import socketserver
import subprocess
import sys
import tempfile
import time
from typing import Any

import attrs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.checkpoint import BenchmarkError, log_tail, progress  # noqa: E402
from benchmarks.deploy import (  # noqa: E402
    Processes,
    free_port,
    start_haproxy,
    start_sslshare,
    stop_on_sigterm,
)

OUTPUT = os.path.join(ROOT, "docs", "tlsfuzzer.md")
CLUSTER_NODES = ("node1", "node2")
TIMEOUT = 300.0
TARGETS = ("openssl s_server", "sslshare", "sslshare x2")


@attrs.frozen
class Script:
    """
    One tlsfuzzer script and how it is run.

    @ivar arguments: options after C{-h} and C{-p}.
    @ivar excluded: (test name, why it cannot apply here) pairs, passed as
        C{-e}.
    @ivar why: what the script checks, and why these options.
    """

    name: str
    why: str
    arguments: tuple[str, ...] = ()
    excluded: tuple[tuple[str, str], ...] = ()


# The suites tlsfuzzer calls by their IETF names.
ECDHE_RSA_GCM = "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
EXTRA_TLS12_CIPHERS = "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA"

# Most TLS 1.2 scripts offer the static RSA key exchange and no
# signature_algorithms unless given -d; OpenSSL 3.0 then falls back to
# SHA-1 signatures, which its default security level refuses, and finds no
# shared cipher.  -d offers ECDHE and the signature algorithms.
ECDHE = "-d"
NO_RENEGOTIATION = ("the server refuses renegotiation "
                    "(SSL_OP_NO_RENEGOTIATION); test-renegotiation-disabled "
                    "checks that")
NO_TLS11 = "the server speaks TLS 1.2 and 1.3 only"

SCRIPTS: tuple[Script, ...] = (
    # Resumption.
    Script("test-tls13-session-resumption",
           "TLS 1.3 resumption with the ticket of the first connection.",
           (ECDHE,),
           (("sanity - TLS 1.2",
             "expects a TLS 1.2 session ticket; the server issues none "
             "(SSL_OP_NO_TICKET: sessions are shared by id)"),
            ("use TLS 1.2 ticket in TLS 1.3",
             "the server issues no TLS 1.2 tickets (SSL_OP_NO_TICKET: "
             "sessions are shared by id)"),
            ("session resumption - PSK_ONLY",
             "psk_ke (resumption without a new ECDHE) needs "
             "SSL_OP_ALLOW_NO_DHE_KEX, which neither server sets: every "
             "TLS 1.3 resumption is forward secret"))),
    Script("test-tls13-count-tickets",
           "The number of NewSessionTicket messages: one per handshake, "
           "by design (each stateful ticket is a session the cluster "
           "carries).", ("-t", "1")),
    Script("test-sessionID-resumption",
           "TLS 1.2 resumption by session id; garbage and too long ids.",
           (ECDHE,)),
    Script("test-resumption-with-wrong-ciphers",
           "A resuming ClientHello whose cipher list lacks the session's "
           "cipher must be refused.", (ECDHE,)),
    Script("test-invalid-server-name-extension-resumption",
           "Resumption with another or a malformed SNI.", (ECDHE,)),
    Script("test-extended-master-secret-extension",
           "Extended master secret, in full and resumed handshakes.",
           (ECDHE,),
           (("sanity TLSv1.1", NO_TLS11),
            ("extended master secret in TLSv1.1", NO_TLS11),
            ("extended master secret with renegotiation", NO_RENEGOTIATION),
            ("renegotiate with EMS in session without EMS", NO_RENEGOTIATION),
            ("renegotiate without EMS in session with EMS",
             NO_RENEGOTIATION))),
    # Conversations.
    Script("test-tls13-conversation", "A TLS 1.3 handshake and a request."),
    Script("test-conversation", "A TLS 1.2 handshake and a request.",
           (ECDHE, "-C", ECDHE_RSA_GCM)),
    Script("test-renegotiation-disabled",
           "Renegotiation attempts are refused.", (ECDHE,)),
    # ClientHello sanity.
    Script("test-large-hello", "ClientHellos of up to 2^14 bytes and more, "
           "in one or several records.", (ECDHE,)),
    Script("test-client-hello-max-size", "The largest ClientHello.",
           (ECDHE,)),
    Script("test-truncating-of-client-hello",
           "ClientHellos whose lengths do not add up.", (ECDHE,)),
    Script("test-invalid-client-hello-w-record-overflow",
           "ClientHellos longer than their record.", (ECDHE,)),
    Script("test-large-number-of-extensions",
           "Many extensions in one ClientHello.", (ECDHE,)),
    Script("test-invalid-compression-methods",
           "Compression methods other than null.", (ECDHE,)),
    Script("test-record-layer-fragmentation",
           "A ClientHello fragmented over many records.", (ECDHE,)),
    Script("test-tls13-legacy-version",
           "TLS 1.3 ClientHellos with odd legacy_version fields."),
    Script("test-tls13-version-negotiation",
           "supported_versions with unknown, draft and old versions.",
           (ECDHE,)),
    Script("test-tls13-keyshare-omitted", "A TLS 1.3 ClientHello without "
           "key_share (expects a HelloRetryRequest or an alert)."),
    Script("test-tls13-hrr", "HelloRetryRequest."),
    Script("test-tls13-nociphers", "A TLS 1.3 ClientHello without ciphers."),
    Script("test-tls13-invalid-ciphers",
           "Unknown cipher values beside a valid one."),
    Script("test-tls13-large-number-of-extensions",
           "Many unassigned extensions in a TLS 1.3 ClientHello."),
    Script("test-tls13-shuffled-extentions",
           "TLS 1.3 ClientHello extensions in unusual orders (the script's "
           "name is spelled so)."),
    Script("test-tls13-0rtt-garbage",
           "Early data the server did not accept must be skipped.",
           (ECDHE,)),
    # Record layer.
    Script("test-tls13-record-layer-limits",
           "Records at and over the size limits."),
    Script("test-tls13-ccs", "Middlebox-compatibility ChangeCipherSpec."),
    Script("test-tls13-zero-length-data", "Empty application data records."),
    Script("test-tls13-finished", "Finished messages of wrong size or "
           "content."),
)

# Scripts that fit the subject but cannot run against this server, and why.
NOT_RUN: dict[str, str] = {
    name: ("offers only the static RSA key exchange and no "
           "signature_algorithms (no -d option): OpenSSL 3.0 finds no "
           "shared cipher at its default security level, so every test "
           "stops at the ServerHello")
    for name in ("test-invalid-session-id", "test-invalid-client-hello",
                 "test-empty-extensions", "test-invalid-cipher-suites")
} | {
    "test-tls13-lengths": "expects its data echoed back (s_server -rev); "
                          "the targets here answer HTTP",
}

# What investigating the failures found, by script: each was run against
# openssl s_server with the same settings, which is the first column.
SAME_AS_OPENSSL = "The same as plain OpenSSL 3.0 (first column): "
NOTES: dict[str, str] = {
    "test-resumption-with-wrong-ciphers":
        SAME_AS_OPENSSL + "the script expects the AES-256-CBC suite it "
        "offers first, and the server picks ECDHE-RSA-AES128-SHA by its own "
        "preference (server order).",
    "test-invalid-server-name-extension-resumption":
        SAME_AS_OPENSSL + "an unknown name gets unrecognized_name where the "
        "script wants illegal_parameter, and the later tests resume the "
        "session of that failed test, so they fail with it.",
    "test-extended-master-secret-extension":
        SAME_AS_OPENSSL + "the test offers only finite-field DHE suites, "
        "which neither server enables.",
    "test-renegotiation-disabled":
        "s_server -www only: it answers the first line of an incomplete GET "
        "before the renegotiation attempt; sslshare waits for the backend.",
    "test-truncating-of-client-hello":
        SAME_AS_OPENSSL + "illegal_parameter where the script wants "
        "decode_error for a ClientHello longer than 2^17 bytes.",
    "test-invalid-client-hello-w-record-overflow":
        "Seen on s_server only, in two of four runs, never on sslshare "
        "(which gives the decode_error the script expects); why s_server "
        "sometimes answers this mangled ClientHello with illegal_parameter "
        "was not investigated.",
    "test-invalid-compression-methods":
        SAME_AS_OPENSSL + "decode_error where the script wants "
        "illegal_parameter.",
    "test-tls13-legacy-version":
        SAME_AS_OPENSSL + "legacy_version SSL 3.0 gets handshake_failure, "
        "not protocol_version.",
    "test-tls13-version-negotiation":
        SAME_AS_OPENSSL + "a ClientHello offering only an unknown version "
        "gets protocol_version.",
    "test-tls13-large-number-of-extensions":
        SAME_AS_OPENSSL + "OpenSSL lists its supported_groups in "
        "EncryptedExtensions, which the script does not expect.",
    "test-tls13-shuffled-extentions":
        SAME_AS_OPENSSL + "the script expects a HelloRetryRequest where "
        "OpenSSL picks a key share the client sent and answers with a "
        "ServerHello.",
    "test-tls13-record-layer-limits":
        SAME_AS_OPENSSL + "OpenSSL 3.0 accepts a padded record of 2^14 + 1 "
        "bytes, answers illegal_parameter for an oversized Finished, and "
        "waits for more data after a padded one.",
    "test-tls13-finished":
        "The script runs 40 of its tests picked at random, so each column "
        "ran others.  Each failing test, rerun by name against s_server, "
        "fails the same way (illegal_parameter where decode_error is "
        "expected); against sslshare the alert sometimes comes before the "
        "script has sent its whole 128 KiB Finished (\"Unexpected message\").",
}


@attrs.frozen
class Outcome:
    """
    What one script did against one target.

    @ivar failures: (test name, the exception's last line) pairs.
    @ivar error: why there are no counts (timeout, crash), or C{None}.
    """

    total: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: tuple[tuple[str, str], ...] = ()
    error: str | None = None
    seconds: float = 0.0


_TEST_START = re.compile(r"^(?P<name>\S.*) \.\.\.$")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)?: ")
_COUNT = re.compile(r"^(?P<key>TOTAL|SKIP|PASS|FAIL|XFAIL|XPASS): (?P<n>\d+)$")


def parse(output: str) -> Outcome:
    """
    The counts and failures in the output of one tlsfuzzer script: each
    test prints C{<name> ...}, then C{OK} or C{Error while processing} and
    a traceback, and the script ends with C{TOTAL:}, C{PASS:}, ... lines.
    """
    counts: dict[str, int] = {}
    reasons: dict[str, str] = {}
    current = None
    failing = False
    for line in output.splitlines():
        if count := _COUNT.match(line):
            counts[count["key"]] = int(count["n"])
        elif started := _TEST_START.match(line):
            current, failing = started["name"], False
        elif line == "Error while processing":
            failing = True
        elif failing and current is not None and _EXCEPTION.match(line):
            # The last one: the exception the test ended with.
            reasons[current] = line.strip()
    failed_names = re.search(r"^FAILED:\n((?:\t.*\n?)+)", output, re.MULTILINE)
    names = ([eval_name(n) for n in failed_names.group(1).split("\n") if n.strip()]
             if failed_names else [])
    if "TOTAL" not in counts:
        return Outcome(error="no summary: " + _last_lines(output))
    return Outcome(
        total=counts["TOTAL"], passed=counts.get("PASS", 0),
        failed=counts.get("FAIL", 0) + counts.get("XPASS", 0),
        skipped=counts.get("SKIP", 0),
        failures=tuple((name, reasons.get(name, "(no exception printed)"))
                       for name in names))


def eval_name(quoted: str) -> str:
    """
    A test name as tlsfuzzer lists it under C{FAILED:}: C{repr()} of a
    string, tab-indented.
    """
    quoted = quoted.strip()
    if len(quoted) >= 2 and quoted[0] == quoted[-1] and quoted[0] in "'\"":
        return quoted[1:-1].replace("\\'", "'").replace('\\"', '"')
    return quoted


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "(no output)"


def run_script(checkout: str, python: str, script: Script, port: int,
               timeout: float, log: str) -> Outcome:
    """
    Run C{script} against C{port}, its output going to C{log} too.
    """
    command = [python, os.path.join("scripts", f"{script.name}.py"),
               "-h", "127.0.0.1", "-p", str(port), *script.arguments]
    for test, _ in script.excluded:
        command += ["-e", test]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=checkout, capture_output=True,
                              text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        output = e.stdout if isinstance(e.stdout, str) else (
            e.stdout or b"").decode("utf-8", "replace")
        _write(log, shlex.join(command), output)
        return Outcome(error=f"timed out after {timeout:.0f} s; last test "
                             f"started: {_last_started(output)}",
                       seconds=time.monotonic() - started)
    _write(log, shlex.join(command), done.stdout + done.stderr)
    outcome = parse(done.stdout)
    if outcome.error is not None:
        outcome = attrs.evolve(outcome, error=outcome.error + " "
                               + _last_lines(done.stderr))
    return attrs.evolve(outcome, seconds=time.monotonic() - started)


def _write(path: str, command: str, output: str) -> None:
    with open(path, "w") as f:
        f.write(f"$ {command}\n{output}")


def _last_started(output: str) -> str:
    names = [m["name"] for line in output.splitlines()
             if (m := _TEST_START.match(line))]
    return names[-1] if names else "(none)"


# The backend (role _backend).

RESPONSE = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 3\r\n\r\nok\n")


class _OneWriteHandler(socketserver.BaseRequestHandler):
    """
    Answer a request's head with L{RESPONSE} in one write, then close: the
    node sends what it reads from the backend as it comes, and tlsfuzzer's
    scripts expect the answer to C{GET /} in one record (as C{s_server
    -www} sends it), then the server's close_notify.
    """

    def handle(self) -> None:
        received = b""
        while b"\n\n" not in received.replace(b"\r\n", b"\n"):
            chunk = self.request.recv(4096)
            if not chunk:
                return
            received += chunk
        self.request.sendall(RESPONSE)


class _BackendServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def run_backend(port: int) -> None:
    with _BackendServer(("127.0.0.1", port), _OneWriteHandler) as server:
        server.serve_forever()


def start_backend(processes: Processes, directory: str) -> int:
    port = free_port()
    process = processes.start(
        "backend", [sys.executable, os.path.abspath(__file__), "_backend",
                    str(port)],
        os.path.join(directory, "backend.log"))
    processes.wait_for_port(process, port)
    return port


# The targets.

S_SERVER_OPTIONS = ("-www", "-alpn", "http/1.1", "-no_ticket",
                    "-num_tickets", "1", "-serverpref",
                    "-no_renegotiation", "-min_protocol", "TLSv1.2",
                    "-max_protocol", "TLSv1.3")


def write_certificate(directory: str) -> tuple[str, str]:
    """
    An RSA-2048 chain for C{localhost} in the PKI directory, under the
    names the nodes' files use for their server certificate (replacing the
    EC one L{sslshare.dev.pki.init_pki} wrote).
    """
    from benchmarks.engine import write_certificates

    pki = os.path.join(directory, "pki")
    chain, key = write_certificates(pki, "rsa2048")
    target = (os.path.join(pki, "localhost-chain.pem"),
              os.path.join(pki, "localhost-key.pem"))
    os.replace(chain, target[0])
    os.replace(key, target[1])
    return target


def tls12_ciphers() -> str:
    from sslshare.tls import DEFAULT_TLS12_CIPHERS

    return f"{DEFAULT_TLS12_CIPHERS}:{EXTRA_TLS12_CIPHERS}"


def start_s_server(processes: Processes, directory: str,
                   certificate: tuple[str, str]) -> tuple[int, subprocess.Popen]:
    from sslshare.tls import DEFAULT_GROUPS, DEFAULT_TLS13_SUITES

    port = free_port()
    process = processes.start(
        "openssl s_server",
        [ensure_openssl(), "s_server", "-accept", f"127.0.0.1:{port}",
         "-cert", certificate[0], "-key", certificate[1],
         "-cipher", tls12_ciphers(), "-ciphersuites", DEFAULT_TLS13_SUITES,
         "-groups", DEFAULT_GROUPS, *S_SERVER_OPTIONS],
        os.path.join(directory, "s_server.log"))
    processes.wait_for_port(process, port)
    return port, process


def ensure_openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        raise BenchmarkError("openssl is missing: apt-get install openssl")
    return found


def start_target(name: str, processes: Processes, directory: str,
                 certificate: tuple[str, str],
                 backend_port: int) -> tuple[int, list[tuple[str, str]]]:
    """
    Start target C{name}; its port, and (name, log) of the processes whose
    death ends its run.
    """
    if name == "openssl s_server":
        port, _ = start_s_server(processes, directory, certificate)
        return port, [("openssl s_server", os.path.join(directory, "s_server.log"))]
    tables = (f'\n[tls]\nalpn = ["http/1.1"]\n'
              f'tls12_ciphers = "{tls12_ciphers()}"\n')
    if name == "sslshare":
        (node,) = start_sslshare(processes, directory, "sharing_off",
                                 backend_port, ("node1",), peers=False,
                                 tables=tables)
        return node.port, [("node1", os.path.join(directory, "sharing_off-node1.log"))]
    nodes = start_sslshare(processes, directory, "sslshare", backend_port,
                           CLUSTER_NODES, peers=True, tables=tables)
    port = start_haproxy(processes, directory, "tlsfuzzer",
                         [node.port for node in nodes])
    return port, [(node, os.path.join(directory, f"sslshare-{node}.log"))
                  for node in CLUSTER_NODES]


def run_target(name: str, checkout: str, python: str,
               scripts: list[Script], directory: str,
               certificate: tuple[str, str], backend_port: int,
               timeout: float, progress: Any) -> dict[str, Outcome]:
    processes = Processes()
    outcomes: dict[str, Outcome] = {}
    try:
        port, watched = start_target(name, processes, directory, certificate,
                                     backend_port)
        logs = os.path.join(directory, "tlsfuzzer", name.replace(" ", "-"))
        os.makedirs(logs, exist_ok=True)
        for script in scripts:
            outcome = run_script(checkout, python, script, port, timeout,
                                 os.path.join(logs, f"{script.name}.log"))
            outcomes[script.name] = outcome
            progress(f"{name}: {script.name}: " + (
                outcome.error or f"{outcome.passed}/{outcome.total} passed")
                + f" ({outcome.seconds:.1f} s)")
            if dead := processes.exited():
                for rest in scripts[len(outcomes):]:
                    outcomes[rest.name] = Outcome(
                        error=f"not run: {dead} exited during "
                              f"{script.name}")
                lines = "\n".join(log_tail(log) for _, log in watched)
                progress(f"{name}: {dead} exited:\n{lines}")
                break
    finally:
        processes.stop_all()
    return outcomes


# Checks before anything starts.

GET_TLSFUZZER = ("get one with: git clone https://github.com/tlsfuzzer/tlsfuzzer")


def check_checkout(checkout: str) -> str:
    """
    The commit of the tlsfuzzer checkout C{checkout}.
    """
    if not os.path.isfile(os.path.join(checkout, "scripts",
                                       "test-conversation.py")):
        raise BenchmarkError(f"{checkout} is not a tlsfuzzer checkout (no "
                             f"scripts/test-conversation.py); {GET_TLSFUZZER}")
    done = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"


def required_tlslite(checkout: str) -> str | None:
    try:
        with open(os.path.join(checkout, "requirements.txt")) as f:
            for line in f:
                if line.startswith("tlslite-ng"):
                    return line.split("==", 1)[1].strip() if "==" in line else None
    except OSError:
        pass
    return None


def check_python(python: str, checkout: str, progress: Any) -> str:
    """
    The tlslite-ng version of C{python}, which must import tlslite and
    ecdsa.
    """
    install = (f"install them with: {python} -m pip install -r "
               f"{os.path.join(checkout, 'requirements.txt')} ecdsa "
               f"(into a venv of their own: python3 -m venv DIR, then pass "
               f"--python DIR/bin/python)")
    try:
        done = subprocess.run(
            [python, "-c", "import ecdsa, tlslite; print(tlslite.__version__)"],
            capture_output=True, text=True)
    except OSError as e:
        raise BenchmarkError(f"cannot run {python}: {e.strerror}") from None
    if done.returncode != 0:
        missing = _last_lines(done.stderr, 1)
        raise BenchmarkError(f"{python} lacks tlslite-ng or ecdsa ({missing}); "
                             f"{install}")
    version = done.stdout.strip()
    wanted = required_tlslite(checkout)
    if wanted is not None and version != wanted:
        progress(f"warning: {python} has tlslite-ng {version}, the checkout "
                 f"asks for {wanted}")
    return version


# The report.

def _cell(outcome: Outcome | None) -> str:
    if outcome is None:
        return "not run"
    if outcome.error is not None:
        return "error"
    return f"{outcome.passed}/{outcome.total}" + (
        f" ({outcome.failed} failed)" if outcome.failed else "")


def _text(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def report(results: dict[str, dict[str, Outcome]], scripts: list[Script],
           facts: dict[str, str]) -> str:
    targets = list(results)
    lines = [
        "# tlsfuzzer against sslshare",
        "",
        "Written by `benchmarks/tlsfuzzer.py` (how the targets are set up is "
        "in its docstring); do not edit by hand, rerun it.",
        "",
        f"- command: `{facts['command']}`",
        f"- tlsfuzzer commit: `{facts['commit']}`, tlslite-ng "
        f"{facts['tlslite']}",
        f"- {facts['openssl']}; {facts['date']}; run took {facts['seconds']}",
        "",
        "Cells: tests passed / tests run (tlsfuzzer counts the sanity test "
        "twice when it runs it first and last).",
        "",
        "| script | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for script in scripts:
        lines.append(f"| {script.name} | " + " | ".join(
            _cell(results[target].get(script.name)) for target in targets)
            + " |")
    lines += ["", "## Scripts, options and exclusions", ""]
    for script in scripts:
        lines.append(f"- **{script.name}** "
                     + (f"`{shlex.join(script.arguments)}`: "
                        if script.arguments else ": ")
                     + script.why)
        for test, reason in script.excluded:
            lines.append(f"  - excluded `{test}`: {reason}")
    for name, reason in NOT_RUN.items():
        lines.append(f"- **{name}** not run: {reason}")
    lines += ["", "## Failures", "",
              "Identical failures are listed once with the targets they "
              "happened on.", ""]
    for script in scripts:
        seen: dict[tuple[str, str], list[str]] = {}
        for target in targets:
            outcome = results[target].get(script.name)
            if outcome is None:
                continue
            if outcome.error is not None:
                seen.setdefault(("(script)", outcome.error), []).append(target)
            for failure in outcome.failures:
                seen.setdefault(failure, []).append(target)
        if not seen:
            continue
        lines += [f"### {script.name}", ""]
        if script.name in NOTES:
            lines += [NOTES[script.name], ""]
        lines += [f"- `{_text(test)}`: {_text(reason)} ({', '.join(where)})"
                  for (test, reason), where in seen.items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def run(checkout: str, python: str, scripts: list[Script], targets: list[str],
        timeout: float, keep: bool, progress: Any) -> dict[str, dict[str, Outcome]]:
    from sslshare.dev.pki import init_pki

    directory = tempfile.mkdtemp(prefix="sslshare-tlsfuzzer-")
    backend = Processes()
    try:
        init_pki(os.path.join(directory, "pki"), "bench", CLUSTER_NODES)
        certificate = write_certificate(directory)
        backend_port = start_backend(backend, directory)
        return {target: run_target(target, checkout, python, scripts,
                                   directory, certificate, backend_port,
                                   timeout, progress)
                for target in targets}
    finally:
        backend.stop_all()
        if keep:
            progress(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_backend"]:
        return run_backend(int(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("checkout", help="a checkout of tlsfuzzer")
    parser.add_argument("--python", default=sys.executable,
                        help="a Python with tlslite-ng and ecdsa "
                        "(default: this one)")
    parser.add_argument("--script", action="append", metavar="NAME",
                        choices=[script.name for script in SCRIPTS],
                        help="run only this script (repeatable)")
    parser.add_argument("--target", action="append", choices=TARGETS,
                        help="run only against this target (repeatable)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help=f"seconds per script (default {TIMEOUT:.0f})")
    parser.add_argument("--output", default=OUTPUT,
                        help="where the Markdown goes (default "
                        "docs/tlsfuzzer.md)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs, logs)")
    options = parser.parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable, ROOT),
                          "benchmarks/tlsfuzzer.py"] + argv)

    stop_on_sigterm()
    checkout = os.path.abspath(options.checkout)
    scripts = [script for script in SCRIPTS
               if options.script is None or script.name in options.script]
    targets = options.target or list(TARGETS)
    started = time.monotonic()
    try:
        commit = check_checkout(checkout)
        tlslite = check_python(options.python, checkout, progress)
        openssl = subprocess.run([ensure_openssl(), "version"],
                                 capture_output=True, text=True).stdout.strip()
        results = run(checkout, options.python, scripts, targets,
                      options.timeout, options.keep, progress)
    except BenchmarkError as e:
        raise SystemExit(f"tlsfuzzer: {e}") from None
    facts = {"command": command, "commit": commit, "tlslite": tlslite,
             "openssl": openssl, "date": datetime.date.today().isoformat(),
             "seconds": f"{time.monotonic() - started:.0f} s"}
    text = report(results, scripts, facts)
    os.makedirs(os.path.dirname(os.path.abspath(options.output)), exist_ok=True)
    with open(options.output, "w") as f:
        f.write(text)
    print(text)
    progress(f"wrote {os.path.relpath(options.output, ROOT)}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; every process this run started was stopped")
