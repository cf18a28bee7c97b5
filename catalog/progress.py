"""Progress bars: on a terminal only, never written into a log or a pipe."""

from __future__ import annotations


def hidden(progress: bool) -> bool | None:
    """tqdm's `disable` for a bar the caller wants (`progress`) or not: None hides it unless stderr is
    a terminal (tqdm's own rule), True always."""
    return None if progress else True
