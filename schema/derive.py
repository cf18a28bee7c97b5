"""What derives from the table definitions: Arrow schemas of shards and DuckDB view SQL."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
from sqlalchemy import JSON, Boolean, DateTime, Double, Integer, String, Table
from sqlalchemy.types import ARRAY

from schema.tables import DIMENSIONS, TABLES


def _arrow_type(col_type) -> pa.DataType:
    if isinstance(col_type, ARRAY):
        return pa.list_(_arrow_type(col_type.item_type))
    for sa_type, arrow in ((Boolean, pa.bool_()), (Integer, pa.int64()), (Double, pa.float64()),
                           (DateTime, pa.timestamp("us")), (JSON, pa.string()), (String, pa.string())):
        if isinstance(col_type, sa_type):
            return arrow
    raise TypeError(f"no Arrow type for {col_type!r}")


def _duckdb_type(col_type) -> str:
    if isinstance(col_type, ARRAY):
        return _duckdb_type(col_type.item_type) + "[]"
    for sa_type, name in ((Boolean, "BOOLEAN"), (Integer, "BIGINT"), (Double, "DOUBLE"),
                          (DateTime, "TIMESTAMP"), (JSON, "JSON"), (String, "VARCHAR")):
        if isinstance(col_type, sa_type):
            return name
    raise TypeError(f"no DuckDB type for {col_type!r}")


def arrow_schema(table: str | Table) -> pa.Schema:
    t = TABLES[table] if isinstance(table, str) else table
    return pa.schema([pa.field(c.name, _arrow_type(c.type), nullable=not c.primary_key) for c in t.columns])


def to_arrow(table: str, rows: list[dict]) -> pa.Table:
    """Rows (dicts) -> an Arrow table of the table's schema; JSON columns are serialised."""
    t = TABLES[table]
    cols = {}
    for c in t.columns:
        values = [r.get(c.name) for r in rows]
        if isinstance(c.type, JSON):  # NaN is not JSON: a value that could not be computed is null
            values = [None if v is None else json.dumps(v, allow_nan=False) for v in values]
        cols[c.name] = values
    return pa.table(cols, schema=arrow_schema(t))


def columns_to_arrow(table: str, columns: dict, n: int) -> pa.Table:
    """Columns (arrays of length n, or scalars repeated n times) -> an Arrow table of the table's
    schema; columns not given are NULL. What writers of many rows use instead of row dicts."""
    schema = arrow_schema(table)
    arrays = []
    for f in schema:
        if f.name in columns:
            v = columns[f.name]
            arrays.append(pa.array(np.broadcast_to(v, n) if np.ndim(v) == 0 else v, type=f.type))
        else:
            arrays.append(pa.nulls(n, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def view_sql(table: str, files: str | list[str] | tuple[str, ...]) -> str:
    """CREATE VIEW over the committed shards of a table (a glob, or a list of files), typed by the schema.

    `union_by_name` reads older shards that lack newer columns as NULL.
    Dimension tables keep one row per primary key, since many runs register the
    same model, dictionary or task (and concurrent runs of one new task write its
    examples and activations twice).
    """
    t = TABLES[table]
    casts = ", ".join(f'CAST("{c.name}" AS {_duckdb_type(c.type)}) AS "{c.name}"' for c in t.columns)
    quoted = ["'" + f.replace("'", "''") + "'" for f in ([files] if isinstance(files, str) else files)]
    source = quoted[0] if isinstance(files, str) else "[" + ", ".join(quoted) + "]"
    distinct = ""
    if table in DIMENSIONS:  # DISTINCT ON: half the time of a row_number() window on a full scan
        distinct = "DISTINCT ON (" + ", ".join(f'"{c.name}"' for c in t.primary_key.columns) + ") "
    body = f"SELECT {distinct}{casts} FROM read_parquet({source}, union_by_name = true)"
    return f'CREATE OR REPLACE VIEW "{table}" AS {body}'


def column_docs() -> dict[str, list[tuple[str, str, str]]]:
    """(column, DuckDB type, comment) for every table, for the tables reference (docs/reference/tables.md, `commands.reference`)."""
    return {name: [(c.name, _duckdb_type(c.type), c.comment or "") for c in t.columns]
            for name, t in TABLES.items()}
