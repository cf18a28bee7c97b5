"""What the tests expect of a command that fails, and of a folder that must not change."""

from __future__ import annotations


def one_line_error(r, *needles) -> None:
    """A failed command said one line on stderr, starting 'error:' and holding every needle, and no traceback."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.lower().startswith(("zoo model", "dictionaries"))]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0]


def snapshot(path) -> list:
    """Every file under a folder with its size (equal before and after: nothing was written)."""
    return sorted((p.relative_to(path), p.stat().st_size) for p in path.rglob("*") if p.is_file())
