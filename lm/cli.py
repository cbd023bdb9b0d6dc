"""What every command line of the project (``precompute``, ``train``, ``store``) does when its work fails.

:func:`run_reported` runs a command's work and turns what goes wrong into one
line on stderr that names the command, and an exit status:

- 2: the user's mistake or the world's (a bad value, a missing store or model, a
  file that cannot be read or written): the exception's message, on one line;
- 3: anything else, a bug of ours: its type and message, and how to see more;
- 130: interrupted (Ctrl-C), with what the command says about going on.

``DISTILL_DEBUG=1`` shows the traceback instead of the line. A ``click.BadParameter``
raised by the work (a value read from ``--config`` or parsed late, such as
``--storage-option``) is one line too; click's own usage errors stay click's.
Whatever is printed goes through the command's ``redact`` first, so a credential
given as an option or inside a location is never printed.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

import click

__all__ = ["run_reported", "one_line", "USER_ERRORS", "EXIT_ERROR", "EXIT_INTERNAL", "EXIT_INTERRUPTED",
           "DEBUG_ENV"]

EXIT_ERROR = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
DEBUG_ENV = "DISTILL_DEBUG"
#: what every command reports as a refusal (the packages' own errors mostly subclass ValueError; a command
#: names the others it expects)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)

T = TypeVar("T")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def run_reported(command: str, run: Callable[[], T], *, expected: tuple[type[BaseException], ...] = (),
                 redact: Callable[[str], str] | None = None, interrupted: str = "interrupted") -> T:
    """``run()``'s result; a failure ends the process with one line ``COMMAND: message`` (module docstring).

    ``command``: how the line names the command (``"train student"``); ``expected``: the exception types
    reported as a refusal besides :data:`USER_ERRORS`; ``redact``: applied to every line printed;
    ``interrupted``: the line's message on Ctrl-C. An exception with a true ``quiet`` attribute
    (another process of the same run reported it) ends the process with status 2 and prints nothing.
    """
    def fail(message: str, status: int):
        line = f"{command}: {message}"
        click.echo(redact(line) if redact else line, err=True)
        sys.exit(status)

    debug = bool(os.environ.get(DEBUG_ENV))
    try:
        return run()
    except click.BadParameter as exc:
        if debug:
            raise
        fail(exc.format_message(), EXIT_ERROR)
    except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except KeyboardInterrupt:
        fail(interrupted, EXIT_INTERRUPTED)
    except (*USER_ERRORS, *expected) as exc:
        if getattr(exc, "quiet", False):
            sys.exit(EXIT_ERROR)
        if debug:
            raise
        fail(one_line(exc), EXIT_ERROR)
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line, and how to see more
        if debug:
            raise
        fail(f"internal error {type(exc).__name__}: {one_line(exc)} ({DEBUG_ENV}=1 shows the traceback)",
             EXIT_INTERNAL)
