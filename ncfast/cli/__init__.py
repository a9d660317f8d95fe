"""The ``ncfast`` command line (``python -m ncfast`` works the same).

One module per subcommand, each providing ``CLI_HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. These modules are the only code that knows about argv and exit codes: the
library raises ``ValueError``/``TypeError`` and never imports this package. Bad input is one line
on stderr and exit code 2 (:class:`CLIError`)."""

from __future__ import annotations

import argparse
import sys

from . import demo, metrics, train, ufm
from .common import CLIError

# subcommand -> module implementing it
SUBCOMMANDS = {"demo": demo, "metrics": metrics, "train": train, "ufm": ufm}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ncfast", description="Fused losses and neural-collapse metrics.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=module.CLI_HELP, description=module.CLI_HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CLIError as error:
        print(f"ncfast {args.command}: error: {error}", file=sys.stderr)
        return 2
