"""The exception types for what the user should see as one line: bad input, a partial answer, and a stop
signal."""


class UserError(Exception):
    """A problem the user can fix (bad file, unknown name, misfit dictionary)."""


class PartialAnswer(UserWarning):
    """A query answered without the runs it could not trust (damaged, or repeating another's circuits),
    which its message names (`catalog.verified`)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that a job removes what it staged."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (a library's error can span many), without PyTorch's
    request to report its message."""
    text = str(e).strip()
    return text.splitlines()[0].split("  (Could this error message be improved?")[0] if text else type(e).__name__
