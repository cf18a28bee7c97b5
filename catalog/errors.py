"""The one exception type for bad user input: the CLI prints its message as one line."""


class UserError(Exception):
    """A problem the user can fix (bad file, unknown name, misfit dictionary)."""
