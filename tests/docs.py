"""The documentation as the tests read it: the README and the pages under docs/, by file name,
their sections and their code blocks (every block the tests run is found through here)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@cache
def page(name: str) -> str:
    """README.md, or a page under docs/ by its path there (e.g. "sweeps.md", "reference/cli.md")."""
    return (ROOT / name if name == "README.md" else DOCS / name).read_text()


def pages() -> list[str]:
    """Every page: the README, then docs/ in path order."""
    return ["README.md", *sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))]


def section(text: str, heading: str) -> str:
    """The section of a page whose `##` heading starts with `heading`, up to the next `##` heading."""
    return "## " + heading + text.split("\n## " + heading, 1)[1].split("\n## ", 1)[0]


def blocks(lang: str, text: str) -> list[str]:
    """The code blocks of a language (```sql, ```python, ```bash, ```toml) in a text."""
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)
