"""
The test modules of C{make test-quick}: every one but those L{SLOW} names.

    python -m tests.support.suite quick|slow

prints the names of the quick or the slow modules, one a line.
"""

from __future__ import annotations

import os
import sys

# The modules that take longest alone on a 2-core machine, from 90 s down
# to 8 s: the soak (load and faults), the leak test (20,000 resumed
# handshakes), floods of hostile input, reloads of twistd processes, the
# nodes' own tests (twistd processes, 4 MiB through the proxy, and timings
# under stalled peers that load on the machine can upset), and the demo's
# three twistd nodes.
SLOW = frozenset({
    "tests.test_soak",
    "tests.test_tls_leak",
    "tests.test_hostile",
    "tests.test_lifecycle",
    "tests.test_node",
    "tests.test_demo",
})

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules() -> list[str]:
    """
    Every test module, C{tests/test_*.py}, by name.
    """
    return sorted(f"tests.{name[:-len('.py')]}" for name in os.listdir(_TESTS)
                  if name.startswith("test_") and name.endswith(".py"))


def quick() -> list[str]:
    """
    Every test module but the slow ones.
    """
    return [module for module in modules() if module not in SLOW]


def slow() -> list[str]:
    """
    The slow test modules.
    """
    return sorted(SLOW)


def main(argv: list[str]) -> int:
    if argv not in (["quick"], ["slow"]):
        print(f"usage: {sys.executable} -m tests.support.suite quick|slow",
              file=sys.stderr)
        return 2
    for module in {"quick": quick, "slow": slow}[argv[0]]():
        print(module)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
