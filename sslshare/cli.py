"""
The C{sslshare} command: operator tools around a cluster.

    sslshare pki init DIR --cluster NAME --nodes node1,node2,node3
    sslshare pki add-node DIR NAME [--cluster NAME]
    sslshare key new
    sslshare stats --config FILE [--node NODE] [--json]
    sslshare config check FILE
    sslshare config example
    sslshare digest verify TRANSCRIPT ... (see --help)
    sslshare demo [--json] [--clients N] [--rounds N]
                  [--repository sqlite|redis|postgres]
    sslshare probe ADDR [ADDR ...] [--ca FILE] [--server-name NAME] [--json]

Errors a user can cause end the command with one line on stderr and exit
status 2; this module holds no session logic of its own.
"""

from __future__ import annotations

import argparse
import hmac
import json
import sys
from collections.abc import Sequence
from typing import Any

from sslshare import __version__, config
from sslshare.dev import pki
from sslshare.errors import FileError
from sslshare.state import SealError, StateKeyError, StateKeys
from sslshare.tools import CommandError, ask_stats, node_endpoint, run_in_reactor


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    arguments = parser.parse_args(argv)
    if not hasattr(arguments, "run"):
        parser.print_help()
        raise SystemExit(2)
    try:
        arguments.run(arguments)
    except (CommandError, config.ConfigError, FileError, ValueError) as e:
        sys.stderr.write(f"sslshare: {e}\n")
        raise SystemExit(2) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sslshare",
        description="Share TLS sessions across a cluster of TLS servers.")
    parser.add_argument("--version", action="version",
                        version=f"sslshare {__version__}")
    commands = parser.add_subparsers(metavar="COMMAND")

    pki_parser = commands.add_parser(
        "pki", help="make a development PKI for a cluster")
    pki_commands = pki_parser.add_subparsers(metavar="ACTION")
    init = pki_commands.add_parser(
        "init", help="write a CA, node certificates, a server certificate "
        "and a state key into DIR")
    init.add_argument("directory", metavar="DIR",
                      help="where to write the files (made if missing)")
    init.add_argument("--cluster", required=True, help="the cluster's name")
    init.add_argument("--nodes", required=True,
                      help="comma-separated node ids, e.g. node1,node2,node3")
    init.add_argument("--server-name", action="append", dest="server_names",
                      help="a name the server certificate answers for "
                      "(repeatable; default: localhost); its files are named "
                      "after the first: NAME-chain.pem, NAME-key.pem")
    init.add_argument("--force", action="store_true",
                      help="overwrite files that exist")
    init.set_defaults(run=_pki_init)
    add_node = pki_commands.add_parser(
        "add-node", help="issue a certificate for one more node from the CA "
        "that pki init wrote into DIR")
    add_node.add_argument("directory", metavar="DIR",
                          help="the directory pki init wrote")
    add_node.add_argument("node", metavar="NAME", help="the new node's id")
    add_node.add_argument("--cluster", help="the cluster's name (default: "
                          "the one the CA was made for)")
    add_node.set_defaults(run=_pki_add_node)

    key = commands.add_parser("key", help="cluster state keys")
    key_commands = key.add_subparsers(metavar="ACTION")
    new_key = key_commands.add_parser(
        "new", help="print a new random state key: one line for the state "
        "key file (see the rotation steps in README.rst)")
    new_key.set_defaults(run=_key_new)

    stats = commands.add_parser(
        "stats", help="print a node's counters, asked over the cluster "
        "channel with the node's own certificate")
    stats.add_argument("--config", required=True, metavar="FILE",
                       help="the TOML file of a node of the cluster, whose "
                       "certificate asks")
    stats.add_argument("--node", help="ask this peer instead of the node "
                       "of the configuration file")
    stats.add_argument("--json", action="store_true",
                       help="print one JSON object")
    stats.set_defaults(run=_stats)

    config_command = commands.add_parser(
        "config", help="node configuration files")
    config_commands = config_command.add_subparsers(metavar="ACTION")
    check = config_commands.add_parser(
        "check", help="read a node's configuration file and every file it "
        "names, as the node's start would, without starting one")
    check.add_argument("file", metavar="FILE",
                       help="the node's TOML file")
    check.set_defaults(run=_config_check)
    example = config_commands.add_parser(
        "example", help="print a node's configuration with every key "
        "explained (node1 of the demo cluster), to start a file from")
    example.set_defaults(run=_config_example)

    digest = commands.add_parser(
        "digest", help="audit a session's running digest of records")
    digest_commands = digest.add_subparsers(metavar="ACTION")
    verify = digest_commands.add_parser(
        "verify", help="recompute the digest from a recorded transcript and "
        "compare it with the stored checkpoint",
        description="TRANSCRIPT holds JSON lines {\"direction\": \"c2s\" or "
        "\"s2c\", \"record\": \"<hex plaintext>\"}, one record each, in the "
        "order the node saw them (see sslshare/digest.py for the encoding). "
        "The chain starts at the session's first record (--session-id and "
        "--exporter) or after a checkpoint (--from-seq and --from-digest). "
        "Exit status 0: the checkpoint matches; 1: it does not.")
    verify.add_argument("transcript", metavar="TRANSCRIPT",
                        help="the transcript file, - for standard input")
    verify.add_argument("--session-id", metavar="HEX",
                        help="the session id (64 hex digits)")
    verify.add_argument("--exporter", metavar="HEX",
                        help="the connection's exporter value (64 hex "
                        "digits): with --session-id, start at the first record")
    verify.add_argument("--from-seq", type=int, metavar="N",
                        help="start after the checkpoint with this seq")
    verify.add_argument("--from-digest", metavar="HEX",
                        help="the digest of that checkpoint")
    verify.add_argument("--checkpoint", metavar="SEQ:HEX",
                        help="the stored checkpoint to compare with")
    verify.add_argument("--config", metavar="FILE",
                        help="read the stored checkpoint of --session-id "
                        "from this node's repository instead")
    verify.set_defaults(run=_digest_verify)

    demo = commands.add_parser(
        "demo", help="run a local 3-node cluster and show sessions "
        "resuming across nodes")
    demo.add_argument("--json", action="store_true",
                      help="print the counts as one JSON object")
    demo.add_argument("--clients", type=int, default=6,
                      help="clients, half TLS 1.2 and half TLS 1.3 "
                      "(default 6)")
    demo.add_argument("--rounds", type=int, default=30,
                      help="connections per client (default 30)")
    demo.add_argument("--directory", default="demo",
                      help="where the demo keeps its PKI, state and logs "
                      "(default ./demo)")
    demo.add_argument("--conf", metavar="DIR",
                      help="directory of node1.toml..node3.toml (default: "
                      "the examples installed with sslshare, written into "
                      "DIRECTORY/conf at each run; with --repository, its "
                      "files are copied there too, and their relative "
                      "paths taken from there)")
    demo.add_argument("--repository", choices=("sqlite", "redis", "postgres"),
                      help="share sessions through a central repository of "
                      "this kind instead of asking peers (redis and postgres: "
                      "the demo starts a throwaway server)")
    demo.set_defaults(run=_demo)

    probe = commands.add_parser(
        "probe", help="connect to each address in turn, offering the "
        "session per the relatedness rules, and show which resumed",
        description="Exit status 0: every server that was offered a "
        "session resumed it; 1: one did not, or a connection failed.")
    probe.add_argument("addresses", metavar="ADDR", nargs="+",
                       help="HOST:PORT, [IPv6]:PORT, or HOST (port 443)")
    probe.add_argument("--ca", metavar="FILE",
                       help="trust this CA (PEM) instead of the system's")
    probe.add_argument("--server-name", metavar="NAME",
                       help="the name to verify and send as SNI "
                       "(default: each address's host)")
    probe.add_argument("--tls", choices=("1.2", "1.3"),
                       help="use only this TLS version")
    probe.add_argument("--group", action="append", default=[],
                       metavar="NAME=MEMBER,...",
                       help="related servers: addresses, networks or DNS "
                       "names (repeatable)")
    probe.add_argument("--ipv4-prefix", type=int, default=24, metavar="N",
                       help="IPv4 addresses sharing N leading bits are "
                       "related (default 24; -1 turns the rule off)")
    probe.add_argument("--ipv6-prefix", type=int, default=64, metavar="N",
                       help="the same for IPv6 (default 64; -1: off)")
    probe.add_argument("--request", default="HEAD / HTTP/1.0\\r\\nHost: "
                       "{host}\\r\\n\\r\\n",
                       help="sent after each handshake, with \\r \\n "
                       "escapes and {host} (default: an HTTP HEAD request)")
    probe.add_argument("--timeout", type=float, default=10.0, metavar="S",
                       help="give up on one address after S seconds")
    probe.add_argument("--json", action="store_true",
                       help="print one JSON object per address, as a list")
    probe.set_defaults(run=_probe)
    return parser


def _pki_init(arguments: argparse.Namespace) -> None:
    nodes = [node.strip() for node in arguments.nodes.split(",") if node.strip()]
    if not nodes:
        raise CommandError("--nodes: give at least one node id")
    files = pki.init_pki(arguments.directory, arguments.cluster, nodes,
                         tuple(arguments.server_names or ("localhost",)),
                         force=arguments.force)
    print(f"wrote a PKI for cluster {files.cluster!r} in {files.directory}:")
    print(f"  cluster CA        {files.ca_certificate}")
    for node in files.nodes:
        print(f"  node {node.node_id:<12} {node.certificate}, {node.key}")
    print(f"  server chain, key {files.server_chain}, {files.server_key}")
    print(f"  state key         {files.state_key}")


def _pki_add_node(arguments: argparse.Namespace) -> None:
    node = pki.add_node(arguments.directory, arguments.cluster, arguments.node)
    print(f"wrote node {node.node_id}: {node.certificate}, {node.key}")


def _config_check(arguments: argparse.Namespace) -> None:
    from twisted.internet import reactor

    from sslshare import service, tls
    from sslshare.repository import RepositoryError

    try:
        node_config = service.check(arguments.file, reactor)
    except (tls.TLSConfigurationError, RepositoryError) as e:
        raise CommandError(str(e)) from None
    print(f"{node_config.path}: node {node_config.node_id} of cluster "
          f"{node_config.cluster_name}: ok")


def _config_example(arguments: argparse.Namespace) -> None:
    from sslshare import examples

    sys.stdout.write(examples.text("example.toml"))


def _key_new(arguments: argparse.Namespace) -> None:
    print(StateKeys.generate().hex())


def _stats(arguments: argparse.Namespace) -> None:
    node_config = config.load(arguments.config)
    target = arguments.node or node_config.node_id
    # A node the file cannot reach is a mistake in the command, said as
    # it is rather than as a failed ask.
    node_endpoint(node_config, target)
    try:
        results = run_in_reactor(
            lambda reactor: ask_stats(reactor, node_config, target))
    except Exception as e:
        raise CommandError(f"could not ask node {target!r} for its stats: "
                           f"{e or type(e).__name__}") from None
    if arguments.json:
        print(json.dumps(results, sort_keys=True))
        return
    # The channel checked that the node answering is the one asked.
    print(f"node {target}")
    width = max((len(name) for name in results), default=0)
    for name, value in sorted(results.items()):
        print(f"{name:<{width}}  {value}")


def _hex(option: str, value: str | None, length: int | None = 32) -> bytes | None:
    if value is None:
        return None
    try:
        decoded = bytes.fromhex(value)
    except ValueError:
        raise CommandError(f"{option}: not hexadecimal") from None
    if length is not None and len(decoded) != length:
        raise CommandError(f"{option}: {len(decoded)} bytes, {length} expected")
    return decoded


def _stored_checkpoint(arguments: argparse.Namespace,
                       session_id: bytes | None) -> tuple[int, bytes]:
    if arguments.checkpoint is not None:
        seq, _, digest = arguments.checkpoint.partition(":")
        if not seq.isdigit():
            raise CommandError("--checkpoint: give SEQ:HEX, such as 12:ab…")
        return int(seq), _hex("--checkpoint", digest) or b""
    if arguments.config is None:
        raise CommandError("give the stored checkpoint: --checkpoint SEQ:HEX, "
                           "or --config FILE to read it from the repository")
    if session_id is None:
        raise CommandError("--config needs --session-id")
    node_config = config.load(arguments.config)
    repository_config = node_config.repository
    if repository_config is None:
        raise CommandError(f"{node_config.path}: no [repository]: this node "
                           "keeps checkpoints in memory only; give "
                           "--checkpoint SEQ:HEX")
    from sslshare.repository import from_config

    async def read(reactor: Any) -> tuple[int, bytes] | None:
        repository = from_config(repository_config, reactor,
                                 node_config.state_dir)
        await repository.start()
        try:
            return await repository.checkpoint_of(session_id)
        finally:
            await repository.close()

    found = run_in_reactor(read)
    if found is None:
        raise CommandError(f"the repository holds no session "
                           f"{session_id.hex()[:12]}…")
    seq, sealed = found
    try:
        return seq, StateKeys.from_file(
            node_config.cluster.state_key).open_checkpoint(session_id, seq, sealed)
    except (StateKeyError, SealError) as e:
        raise CommandError(f"the repository's checkpoint: {e}") from None


def _digest_verify(arguments: argparse.Namespace) -> None:
    from sslshare import digest

    session_id = _hex("--session-id", arguments.session_id)
    stored_seq, stored_digest = _stored_checkpoint(arguments, session_id)
    try:
        source = (sys.stdin if arguments.transcript == "-"
                  else open(arguments.transcript, encoding="utf-8"))
    except OSError as e:
        raise CommandError(f"{arguments.transcript}: {e.strerror}") from None
    with source:
        try:
            seq, computed = digest.verify_transcript(
                source, session_id=None if arguments.exporter is None
                else session_id,
                exporter=_hex("--exporter", arguments.exporter),
                start_seq=arguments.from_seq,
                start_digest=_hex("--from-digest", arguments.from_digest),
                until_seq=stored_seq)
        except ValueError as e:
            raise CommandError(f"{arguments.transcript}: {e}") from None
    if seq == stored_seq and hmac.compare_digest(computed, stored_digest):
        print(f"match: the transcript gives the stored checkpoint, seq {seq}")
        return
    print(f"MISMATCH: the transcript gives seq {seq} digest {computed.hex()}; "
          f"the store holds seq {stored_seq} digest {stored_digest.hex()}")
    raise SystemExit(1)


def _demo(arguments: argparse.Namespace) -> None:
    from sslshare.dev import demo

    demo.run(arguments)


def _probe(arguments: argparse.Namespace) -> None:
    from twisted.internet.ssl import Certificate, TLSVersion

    from sslshare import client

    groups = []
    for text in arguments.group:
        name, equals, members = text.partition("=")
        if not equals:
            raise CommandError(f"--group {text!r}: give NAME=MEMBER,MEMBER")
        try:
            groups.append(client.AddressGroup.parse(name, members.split(",")))
        except client.RelatednessError as e:
            raise CommandError(f"--group: {e}") from None
    try:
        relatedness = client.RelatednessPolicy(
            tuple(groups),
            ipv4_prefix=None if arguments.ipv4_prefix < 0 else arguments.ipv4_prefix,
            ipv6_prefix=None if arguments.ipv6_prefix < 0 else arguments.ipv6_prefix)
    except client.RelatednessError as e:
        raise CommandError(str(e)) from None
    trust = None
    if arguments.ca is not None:
        try:
            with open(arguments.ca, "rb") as f:
                trust = Certificate.loadPEM(f.read())
        except OSError as e:
            raise CommandError(f"{arguments.ca}: {e.strerror}") from None
        except Exception:
            raise CommandError(f"{arguments.ca}: not a PEM certificate") from None
    extra: dict[str, Any] = {}
    if arguments.tls == "1.2":
        extra["lowerMaximumSecurityTo"] = TLSVersion.TLSv1_2
    elif arguments.tls == "1.3":
        extra["raiseMinimumTo"] = TLSVersion.TLSv1_3
    policy = client.SessionSharingPolicy(trust, relatedness,
                                         extraCertificateOptions=extra)
    request = (arguments.request.replace("\\r", "\r").replace("\\n", "\n")
               .encode("utf-8"))
    results = run_in_reactor(lambda reactor: client.probe(
        reactor, arguments.addresses, policy, arguments.server_name,
        request, arguments.timeout))
    if arguments.json:
        print(json.dumps([result.as_json() for result in results], indent=1))
    else:
        rows = [("ADDRESS", "TLS", "CIPHER", "RESUMED", "HANDSHAKE")]
        for result in results:
            if result.error is not None:
                rows.append((result.target, "-", "-", "error", result.error))
                continue
            resumed = ("yes" if result.resumed else
                       "NO (offered)" if result.offered else "no")
            rows.append((result.target, result.version, result.cipher,
                         resumed, f"{result.seconds * 1000:.1f} ms"))
        widths = [max(len(row[column]) for row in rows) for column in range(4)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width
                            in zip(row, widths)) + "  " + row[4])
    if any(result.failed for result in results):
        raise SystemExit(1)
