"""
Two checkouts measured against each other in one run: the rate benchmark
(L{benchmarks.rates}) of each in turn, round after round, so that the noise
of a shared machine falls on both alike.  What a change to a hot path is
kept or reverted by.

Usage, from the root of a checkout::

    .venv/bin/python -m benchmarks.compare BEFORE AFTER [--rounds N]
        [--kinds full,local,peer] [--versions tls1.2,tls1.3] [--seconds S]
        [--json]

C{BEFORE} and C{AFTER} are the roots of two checkouts (C{git worktree add
/tmp/before <commit>}).  Each round runs C{python -m benchmarks.rates} from
C{BEFORE}, then from C{AFTER}, each with its own tree first on
C{PYTHONPATH}, so that its nodes run its code; the benchmark scripts are
each tree's own, so a tree older than C{benchmarks.rates}' command line
needs this tree's C{benchmarks/} copied into it.  It prints, per TLS
version and kind, each round's server CPU per handshake (µs, all nodes of
the kind), their median, the median of AFTER over BEFORE, and the cluster
commands and items per connection of the first round (exact counts, the
same in every round).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

SIDES = ("before", "after")


def run_rates(tree: str, arguments: list[str]) -> dict[str, Any]:
    """
    One run of C{benchmarks.rates} from checkout C{tree}.

    @raise RuntimeError: it failed (the message has its last output).
    """
    environment = dict(os.environ, PYTHONPATH=tree)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.rates", *arguments, "--json"],
        cwd=tree, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks.rates in {tree} exited "
                           f"{done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """
    Per version and kind: each side's CPU per handshake by round and its
    median, the ratio of the medians, and the first round's commands and
    items per connection.
    """
    table: dict[str, Any] = {}
    for version, kinds in runs["before"][0]["kinds"].items():
        for kind in kinds:
            row: dict[str, Any] = {}
            for side in SIDES:
                measured = [run["kinds"][version][kind] for run in runs[side]]
                cpu = [m["server_cpu_us_per_handshake"] for m in measured]
                row[side] = {
                    "server_cpu_us": [round(c) for c in cpu],
                    "median": round(statistics.median(cpu)),
                    "commands": measured[0]["messages_per_connection"],
                    "items": measured[0].get("items_per_connection", {}),
                }
            row["after_over_before"] = round(
                row["after"]["median"] / row["before"]["median"], 3)
            table[f"{version} {kind}"] = row
    return table


def _counts(counts: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.2f}" for name, value in sorted(counts.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Interleaved rounds of the rate benchmark of two "
                    "checkouts (see the module docstring).")
    parser.add_argument("before", help="root of the checkout before the change")
    parser.add_argument("after", help="root of the checkout after the change")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default="full,local,peer")
    parser.add_argument("--versions", default="tls1.2,tls1.3")
    parser.add_argument("--seconds", default="5")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as JSON")
    options = parser.parse_args(argv)
    trees = {"before": os.path.abspath(options.before),
             "after": os.path.abspath(options.after)}
    for side, tree in trees.items():
        if not os.path.isfile(os.path.join(tree, "benchmarks", "rates.py")):
            parser.error(f"{side}: {tree} has no benchmarks/rates.py")
    if options.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {options.rounds}")
    arguments = ["--kinds", options.kinds, "--versions", options.versions,
                 "--seconds", options.seconds]
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for number in range(1, options.rounds + 1):
        for side in SIDES:
            try:
                runs[side].append(run_rates(trees[side], arguments))
            except (RuntimeError, ValueError) as e:
                sys.exit(f"compare: round {number}, {side}: {e}")
            print(f"round {number}/{options.rounds}: {side} measured",
                  file=sys.stderr)
    table = summary(runs)
    if options.json:
        json.dump({"trees": trees, "rounds": options.rounds,
                   "arguments": arguments, "summary": table},
                  sys.stdout, indent=2)
        print()
        return
    for name, row in table.items():
        print(f"{name}: after/before {row['after_over_before']}")
        for side in SIDES:
            figures = row[side]
            print(f"  {side:6} server µs/handshake {figures['server_cpu_us']} "
                  f"median {figures['median']}; commands "
                  f"{_counts(figures['commands'])}; items "
                  f"{_counts(figures['items'])}")


if __name__ == "__main__":
    main()
