"""The CLI's one error boundary: input errors become one line on stderr and exit 2; bugs stay bugs.

What counts as bad input (``kvtrap`` exit 2): a dump kvtrap cannot read (:class:`DumpError`), a bad
setting (:class:`ConfigError`), a bad option (click's usage errors, already exit 2), and an OS error on a
file the user named (no permission, a full disk). Anything else is a bug in kvtrap and keeps its
traceback. A closed stdout (``kvtrap dump ls | head``) ends the command quietly.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from kvtrap.config import ConfigError
from kvtrap.record.dumpfile import DumpError

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2


class InputFailure(click.ClickException):
    """Bad input, said in one line as ``kvtrap: error: ...``; exit 2."""

    exit_code = EXIT_INPUT

    def show(self, file: Any = None) -> None:
        click.echo(f"kvtrap: error: {self.format_message()}", err=True)


def os_error_text(exc: OSError) -> str:
    """``path: reason`` for an OS error, with the OS's own words for the cause."""
    where = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}" if where else reason


def _quiet_broken_pipe() -> None:
    # The reader went away (``| head``): point stdout at devnull so the interpreter's final flush does
    # not print a second error, and stop with the conventional status of a closed pipe.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (click's test runner)
        pass
    sys.exit(EXIT_OK)


class BoundaryGroup(click.Group):
    """A click group whose commands run inside the boundary (used by ``kvtrap`` and its sub-groups)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            out = super().invoke(ctx)
            sys.stdout.flush()  # a reader that went away shows up here, not at interpreter exit
            return out
        except BrokenPipeError:
            _quiet_broken_pipe()
        except (DumpError, ConfigError) as exc:
            raise InputFailure(str(exc)) from None
        except click.BadParameter as exc:  # an option value a command checked itself: one line, no usage
            raise InputFailure(exc.format_message()) from None
        except OSError as exc:
            raise InputFailure(os_error_text(exc)) from None
