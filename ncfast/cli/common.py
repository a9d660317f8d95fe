"""What every subcommand shares: the user-error exception the command line prints as one line."""


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""
