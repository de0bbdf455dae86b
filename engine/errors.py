"""One exception type for mistakes a user can fix, shown as one line and exit code 2, and the CLI wrapper that
shows it."""

import functools
import sys


class UserError(Exception):
    """Bad input: the message names the problem and the fix; the CLI prints it and exits with code 2."""


def cli_entry(main):
    """Wrap a command's main() so a UserError becomes one stderr line and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def first_line(err: Exception) -> str:
    """An exception's first line of text (its type's name when it has none): the reason inside a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
