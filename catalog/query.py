"""The read-only guard for user SQL, and output formats that fit pipes."""

from __future__ import annotations

import duckdb
import pandas as pd

from catalog.errors import UserError

READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
FORMATS = ("table", "csv", "json")


def check_read_only(sql: str) -> None:
    """Refuse anything but SELECT-like statements (DESCRIBE, SHOW, SUMMARIZE, EXPLAIN included)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise UserError(f"SQL error: {str(e).strip().splitlines()[0]}") from None
    if not statements:
        raise UserError("empty query")
    for s in statements:
        if s.type not in READ_ONLY:
            kind = s.type.name.replace("_", " ")
            raise UserError(f"refused: {kind} statements are not allowed; queries are read-only")


def format_frame(df: pd.DataFrame, fmt: str) -> str:
    """Render a result as an aligned table, CSV, or JSON records."""
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return df.to_json(orient="records", date_format="iso") + "\n"
    if df.empty:
        return "(no rows)\n" if len(df.columns) == 0 else df.to_string(index=False) + "\n(0 rows)\n"
    return df.to_string(index=False, max_colwidth=60) + "\n"
