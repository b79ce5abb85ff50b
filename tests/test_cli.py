"""
The C{sslshare} command's own help: every command, action and argument
says what it is for in C{--help}.
"""

from __future__ import annotations

import argparse

from twisted.trial.unittest import SynchronousTestCase

from sslshare import cli


def _without_help(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """
    The commands and arguments under C{parser} (named C{path}) that have
    no help text.
    """
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            described = {choice.dest for choice in action._choices_actions
                         if choice.help}
            for name, subparser in action.choices.items():
                if name not in described:
                    missing.append(f"{path} {name}")
                missing += _without_help(subparser, f"{path} {name}")
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


class HelpTests(SynchronousTestCase):

    def test_every_command_and_argument_has_help(self):
        self.assertEqual(_without_help(cli._parser(), "sslshare"), [])

    def test_a_missing_help_is_found(self):
        parser = argparse.ArgumentParser(prog="x")
        commands = parser.add_subparsers()
        command = commands.add_parser("quiet")
        command.add_argument("thing")
        self.assertEqual(_without_help(parser, "x"),
                         ["x quiet", "x quiet thing"])
