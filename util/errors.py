"""Expected failures and the one top-level handler that reports them.

An expected failure (a bad flag, an unreadable or mismatched file, a full disk) ends the program with one line,
`<prog>: error: <what went wrong and what to do>`, and a non-zero exit code, never a traceback. Anything else is
a bug and keeps its traceback.

Exit codes: 2 for bad settings or inputs (ValueError, TypeError, a missing or misplaced file), 1 for failures
while running (other OSErrors such as a full disk, the project's `RunError`s such as a non-finite loss), 143 after
a SIGTERM-triggered save (128 + SIGTERM), 130 after Ctrl-C (SIGINT).
"""
from __future__ import annotations

import errno
import re
import sys
from collections.abc import Callable


class RunError(RuntimeError):
    """A failure while running whose message says what happened (a corrupt image, diverged ranks, ...)."""

    exit_code = 1


class Preempted(RunError):
    """SIGTERM was received; the run saved its state and stops."""

    exit_code = 143


_PLAIN_OS_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EROFS: "read-only file system",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
}


def os_error_cause(error: BaseException) -> OSError | None:
    """The first OSError in ``error``'s chain (torch.save reports a full disk as a RuntimeError caused by one)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


# How torch re-raises, in the main process, an exception of a data-loader worker: its type, where, and the worker's
# whole traceback, whose last line is the original message.
_WORKER_ERROR = re.compile(r"^Caught (\w+) (in DataLoader worker process \d+)\.\nOriginal Traceback.*"
                           r"\n(?:[\w.]+\.)?\1: (?P<message>.*)\Z", re.DOTALL)


def describe(error: BaseException) -> str:
    """One line for an expected failure; OS errors in plain words with the file they concern; an error raised in a
    data-loader worker by its own message and the worker it came from."""
    worker = _WORKER_ERROR.match(str(error))
    if worker:
        return f"{worker['message'].strip()} ({worker[2]})"
    os_error = error if isinstance(error, OSError) else None
    if os_error is not None and os_error.errno in _PLAIN_OS_ERRORS:
        where = os_error.filename or ""
        return f"{_PLAIN_OS_ERRORS[os_error.errno]}" + (f": {where}" if where else "") + (
            f" ({error})" if not os_error.filename and str(error) else "")
    return str(error).strip() or type(error).__name__


def run_cli(prog: str, run: Callable[[], None]) -> None:
    """Call ``run()``; report an expected failure in one line and exit with its code (130 after Ctrl-C)."""
    try:
        run()
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted (SIGINT); every file written so far is complete\n")
        sys.exit(130)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        sys.stderr.write(f"{prog}: error: {describe(error)}\n")
        sys.exit(2)
    except RunError as error:
        sys.stderr.write(f"{prog}: {'error: ' if error.exit_code != 143 else ''}{describe(error)}\n")
        sys.exit(error.exit_code)
    except OSError as error:
        sys.stderr.write(f"{prog}: error: {describe(error)}\n")
        sys.exit(1)
