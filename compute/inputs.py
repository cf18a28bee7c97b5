"""Files a user names (a job file, a graph file): read whole only when they are regular files of
bounded size, so that a device, a pipe, a folder or a huge file is one line, never a hang."""

from __future__ import annotations

import stat
from pathlib import Path

from catalog.errors import UserError


def read_bounded(path: Path, max_bytes: int, kind: str) -> bytes:
    """The bytes of a regular file of at most max_bytes; anything else is a UserError naming it as a `kind`."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{path} is not a regular file; a {kind} is read only from one")
        if st.st_size > max_bytes:
            raise UserError(f"{path} has {st.st_size:,} bytes; a {kind} has at most {max_bytes:,}")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise UserError(f"cannot read {kind} {path}: {e.strerror or e}") from None
    if len(data) > max_bytes:  # it grew while being read
        raise UserError(f"{path} has more than {max_bytes:,} bytes; a {kind} has at most {max_bytes:,}")
    return data
