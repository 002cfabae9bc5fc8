"""User-facing errors: one line that names the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input that they can fix; the message says what and how."""


def error_reason(err: BaseException) -> str:
    """The first line of a library's error, or its type when it has no message: enough for a one-line error."""
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a CLI body, turning a UserError into one line on stderr and exit code 2."""
    try:
        return main() or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
