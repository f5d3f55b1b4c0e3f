"""The one base class for problems a user can fix.

Every error that reaches the user derives from :class:`UserError`; the CLI prints its message
(one line per problem, naming the field or file and what to do) and exits with code 2 instead of
showing a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class UserError(Exception):
    """A problem with the recipe, the data, the model files or the run directory."""


class DataError(UserError):
    """A data problem the user can fix: names the file, the row and the field."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of a library's exception, for a one-line message that names our context."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


def exit_on_user_error(fn: Callable[[], T]) -> T:
    """Run ``fn``; on a :class:`UserError` print it on stderr and exit with code 2."""
    from rich.markup import escape

    from ftl.console import console_err

    try:
        return fn()
    except UserError as err:
        # A RecipeError holds one problem per line already; other messages end lines with newlines.
        for line in getattr(err, "problems", None) or str(err).split("\n") or [type(err).__name__]:
            # A user's value may hold control characters (a key named '\r'): show them, don't obey them.
            shown = _CONTROL.sub(lambda m: repr(m.group())[1:-1], line)
            console_err.print(f"[bold red]error:[/] {escape(shown)}", markup=True, soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
