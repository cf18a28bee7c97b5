"""The exception types for what the user should see as one line: bad input, and a stop signal."""


class UserError(Exception):
    """A problem the user can fix (bad file, unknown name, misfit dictionary)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that a job removes what it staged."""
