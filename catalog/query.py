"""The read-only guard for user SQL, and output formats that fit pipes.

User SQL meets two locks. This module's guard lets through only statements that read
(SELECT and its relatives: DESCRIBE, SHOW, SUMMARIZE, FROM, VALUES, PIVOT) and EXPLAIN of
such a statement (EXPLAIN ANALYZE runs what it explains, so its statement is checked too).
Then the statement runs in the catalogue's sandboxed DuckDB instance (`catalog.store`),
which can open no file but the catalogue's shards and whose configuration is locked.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import duckdb
import pandas as pd

from catalog.errors import UserError, first_line

FORMATS = ("table", "csv", "json")


def check_read_only(sql: str) -> None:
    """Refuse anything but statements that only read, one line naming what was refused."""
    statements = _statements(sql)
    if not statements:
        raise UserError("empty query: nothing but comments or spaces")
    for s in statements:
        _check_statement(s)


def _statements(sql: str) -> list:
    try:
        return duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise UserError(sql_error(e)) from None


def sql_error(e: duckdb.Error) -> str:
    """DuckDB's error as one line, without its advice to change a setting (`Use "SET x TO y" to ...`),
    which the sandbox's locked configuration refuses: the limit is said to be the sandbox's instead."""
    message = first_line(e)
    cut = re.sub(r'\s*Use "SET [^"]*"[^.]*\.?', "", message)
    if cut != message:
        message = f"{cut.rstrip('. ')} (a limit of the sandbox, whose settings are locked)"
    return f"SQL error: {message}"


def _check_statement(s) -> None:
    if s.type == duckdb.StatementType.SELECT:
        return
    if s.type == duckdb.StatementType.EXPLAIN:
        inner = _explained(s.query)
        if inner is not None:
            parts = _statements(inner)
            if len(parts) == 1 and parts[0].type == duckdb.StatementType.SELECT:
                return
        raise UserError("refused: EXPLAIN is allowed for SELECT statements only (EXPLAIN ANALYZE runs the "
                        "statement it explains); queries are read-only")
    raise UserError(f"refused: {_named(s)} statements are not allowed; queries are read-only")


def _named(s) -> str:
    """What a statement is called by its first word (DuckDB files INSTALL under LOAD, USE and RESET under
    SET, CHECKPOINT under CALL), or by its type when that word is WITH."""
    tokens = duckdb.tokenize(s.query)
    if tokens and tokens[0][1] == duckdb.token_type.keyword:
        end = tokens[1][0] if len(tokens) > 1 else len(s.query)
        word = s.query[tokens[0][0]:end].strip().split()[0].upper()
        if word.isalpha() and word != "WITH":
            return word
    return s.type.name.replace("_", " ")


def _explained(sql: str) -> str | None:
    """The statement an EXPLAIN statement explains: the text after `EXPLAIN`, its options in
    parentheses and ANALYZE (comments skipped), or None when it cannot be told."""
    tokens = [(pos, kind) for pos, kind in duckdb.tokenize(sql) if kind != duckdb.token_type.comment]

    def word(i: int) -> str:
        pos = tokens[i][0]
        end = tokens[i + 1][0] if i + 1 < len(tokens) else len(sql)
        return sql[pos:end].split("--")[0].split("/*")[0].strip().upper()

    if not tokens or word(0) != "EXPLAIN":
        return None
    i = 1
    if i < len(tokens) and word(i) == "(":  # EXPLAIN (ANALYZE, FORMAT json) ...
        depth = 0
        while i < len(tokens):
            depth += {"(": 1, ")": -1}.get(word(i), 0)
            i += 1
            if depth == 0:
                break
    while i < len(tokens) and word(i) in ("ANALYZE", "ANALYSE"):
        i += 1
    return sql[tokens[i][0]:] if i < len(tokens) else None


def csv_chunks(frames) -> Iterator[str]:
    """DataFrames (a result's chunks) as CSV text, the header once (`format_frame`'s CSV is this of one frame)."""
    for i, df in enumerate(frames):
        yield df.to_csv(index=False, header=i == 0)


def format_frame(df: pd.DataFrame, fmt: str) -> str:
    """Render a result as an aligned table, CSV, or JSON records."""
    if fmt == "csv":
        return "".join(csv_chunks([df]))
    if fmt == "json":
        return df.to_json(orient="records", date_format="iso") + "\n"
    if df.empty:  # the columns' names, then how many rows (pandas would print its own "Empty DataFrame")
        return "(no rows)\n" if len(df.columns) == 0 else "  ".join(map(str, df.columns)) + "\n(0 rows)\n"
    return df.to_string(index=False, max_colwidth=60) + "\n"
