"""What the subcommands share: the user-error exception printed as one line, the loss flags, and
the note printed when figures cannot be drawn."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from ..figures import INSTALL_HINT, figures_available
from ..loss_choices import HYPERPARAMETERS, LOSS_CHOICES, LOSS_NAMES

# hyper-parameter -> its symbol in the help text
_SYMBOLS = {"label_smoothing": "α", "gamma": "γ", "kappa": "κ", "beta": "β"}


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's ValueError/TypeError for bad input into a :class:`CLIError`."""
    try:
        yield
    except (ValueError, TypeError) as error:
        raise CLIError(str(error)) from None


def add_loss_arguments(parser, default: str) -> None:
    """``--loss`` (a name of :mod:`ncfast.loss_choices`) and one flag per hyper-parameter."""
    parser.add_argument("--loss", choices=LOSS_NAMES, default=default, help=f"the loss (default {default})")
    for name in HYPERPARAMETERS:
        defaults = ", ".join(f"{choice.name} {choice.defaults[name]:g}" for choice in LOSS_CHOICES.values()
                             if name in choice.defaults)
        parser.add_argument(f"--{name.replace('_', '-')}", type=float,
                            help=f"{_SYMBOLS[name]} of the loss (defaults: {defaults})")


def loss_overrides(args) -> dict:
    """The hyper-parameters given on the command line (None: the loss's default)."""
    return {name: getattr(args, name) for name in HYPERPARAMETERS}


def figures_note() -> Optional[str]:
    """The line saying how to get figures, or None when matplotlib is installed."""
    return None if figures_available() else f"figures not drawn (matplotlib is not installed): {INSTALL_HINT}"
