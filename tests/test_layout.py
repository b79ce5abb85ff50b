"""
The package's dependency rule, checked: the layers README.rst states
(section "Layout"), read from README.rst itself, against the imports of
every module of C{sslshare/}.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from twisted.trial.unittest import TestCase

_ROOT = Path(__file__).resolve().parent.parent
_PACKAGE = _ROOT / "sslshare"
_LAYER = re.compile(r"^ {4}(\d+)\. ([\w ]+)$")


def stated_layers(readme: str) -> dict[str, int]:
    """
    The layer of each module as README.rst's Layout section numbers them
    (lines C{"    <n>. <module> <module> ..."}).
    """
    section = readme.split("\nLayout\n------\n", 1)[1].split("\n\n\n", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        match = _LAYER.match(line)
        if match:
            for unit in match.group(2).split():
                layers[unit] = int(match.group(1))
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path) -> Iterator[str]:
    """
    The C{sslshare} modules that the module at C{path} imports, anywhere in
    it (in functions and under C{TYPE_CHECKING} too: a dependency is a
    dependency).
    """
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 \
                and node.module and node.module.split(".")[0] == "sslshare":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                known = (_PACKAGE.parent / candidate.replace(".", "/"))
                if known.with_suffix(".py").exists() or known.is_dir():
                    yield candidate
                else:
                    yield node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sslshare":
                    yield alias.name


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(_PACKAGE.rglob("*.py")):
        name = module_name(path)
        graph[name] = {other for other in imported(path) if other != name}
    return graph


def unit(module: str) -> str:
    """
    What the layers name C{module} by: its top-level module or package.
    """
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """
    One cycle of C{graph}, if it has one.
    """
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for other in sorted(graph.get(node, ())):
            found = visit(other)
            if found:
                return found
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        found = visit(node)
        if found:
            return found
    return None


class LayerTests(TestCase):
    def setUp(self):
        self.layers = stated_layers((_ROOT / "README.rst").read_text())
        self.graph = import_graph()

    def test_every_module_is_in_a_layer_and_every_layer_entry_exists(self):
        units = {unit(module) for module in self.graph} - {"sslshare"}
        self.assertEqual(sorted(units - set(self.layers)), [],
                         "modules README.rst's Layout does not place")
        self.assertEqual(sorted(set(self.layers) - units), [],
                         "README.rst's Layout names modules that do not exist")

    def test_imports_point_down_the_layers(self):
        wrong = sorted(
            f"{module} -> {other} (layer {self.layers.get(unit(module))} "
            f"imports layer {self.layers.get(unit(other))})"
            for module, others in self.graph.items() for other in others
            if unit(module) != unit(other) and unit(module) != "sslshare"
            and self.layers.get(unit(other), 0)
            >= self.layers.get(unit(module), 0))
        self.assertEqual(wrong, [])

    def test_no_module_imports_itself_round_a_cycle(self):
        self.assertIsNone(cycle(self.graph))

    def test_the_record_digest_loads_no_libssl(self):
        # What "sslshare digest verify" needs must not load the engine.
        loaded = subprocess.run(
            [sys.executable, "-c", "import sys, sslshare.digest, "
             "sslshare.recovery; print(sorted(sys.modules))"],
            capture_output=True, text=True, check=True, cwd=_ROOT).stdout
        self.assertNotIn("'sslshare._openssl'", loaded)
        self.assertNotIn("'sslshare.tls'", loaded)


class CheckerTests(TestCase):
    """
    The checker itself finds what it is for.
    """

    def test_layers_are_read_from_the_layout_section(self):
        readme = ("Intro\n\nLayout\n------\n\nText::\n\n    1. a b\n    2. c\n"
                  "\n\nNext\n----\n\n    3. d\n")
        self.assertEqual(stated_layers(readme), {"a": 1, "b": 1, "c": 2})

    def test_a_cycle_is_found(self):
        self.assertEqual(cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}),
                         ["a", "b", "c", "a"])

    def test_a_graph_without_a_cycle_has_none(self):
        self.assertIsNone(cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}))
