"""The ``ncfast`` command line (``python -m ncfast`` works the same).

Each subcommand lives in the module that implements it, which provides ``CLI_HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Bad input is one line on stderr and
exit code 2 (:class:`CLIError`)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module implementing it
SUBCOMMANDS: dict[str, str] = {
    "demo": "ncfast.demo",
    "metrics": "ncfast.ncstats",
    "train": "ncfast.train",
    "ufm": "ncfast.ufm",
}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ncfast", description="Fused losses and neural-collapse metrics.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.CLI_HELP, description=module.CLI_HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CLIError as error:
        print(f"ncfast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
