"""The one base class for problems a user can fix.

Every error that reaches the user derives from :class:`UserError`; the CLI prints its message
(one line per problem, naming the field or file and what to do) and exits with code 2 instead of
showing a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the recipe, the data, the model files or the run directory."""


def exit_on_user_error(fn: Callable[[], T]) -> T:
    """Run ``fn``; on a :class:`UserError` print it on stderr and exit with code 2."""
    from ftl.console import console_err

    try:
        return fn()
    except UserError as err:
        for line in str(err).splitlines() or [type(err).__name__]:
            console_err.print(f"[bold red]error:[/] {line}", highlight=False, markup=True, soft_wrap=True)
        sys.exit(EXIT_USER_ERROR)
