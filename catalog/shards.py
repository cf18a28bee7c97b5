"""Writing one run's Parquet shards: temporary names, rename into place, manifest last.

A worker never touches the DuckDB file. It streams each table into
`staging/<run_id>/<table>.parquet.tmp` (row groups as they come), renames it when
the table is complete, and writes `manifest.json` last. A run without a
manifest is incomplete and can never be committed.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schema.derive import arrow_schema, to_arrow
from schema.tables import SCHEMA_VERSION, TABLES

MANIFEST = "manifest.json"
# Rows per Parquet row group: DuckDB reads a file in parallel by row group, and skips row groups
# by their statistics, so one big circuit must not be one row group (pyarrow's default is 1M rows).
ROW_GROUP = 128 * 1024


class TableWriter:
    """Streams rows of one table into a shard; visible under its final name only when closed."""

    def __init__(self, path: Path, table: str):
        self.table, self.path, self.rows = table, path, 0
        self.tmp = path.with_name(path.name + ".tmp")
        self._writer = pq.ParquetWriter(self.tmp, arrow_schema(table))

    def write(self, rows: list[dict] | pa.Table) -> None:
        data = rows if isinstance(rows, pa.Table) else to_arrow(self.table, rows)
        if len(data):
            self._writer.write_table(data.cast(arrow_schema(self.table)), row_group_size=ROW_GROUP)
            self.rows += len(data)

    def close(self) -> None:
        self._writer.close()
        os.replace(self.tmp, self.path)


class RunWriter:
    """All shards of one run, in `<catalog>/staging/<run_id>/`."""

    def __init__(self, root: Path, run_id: str):
        self.run_id = run_id
        self.dir = root / "staging" / run_id
        self.dir.mkdir(parents=True, exist_ok=False)
        self._open: dict[str, TableWriter] = {}
        self._done: dict[str, int] = {}

    def table(self, name: str) -> TableWriter:
        """The streaming writer of a table (opened on first use)."""
        if name not in TABLES:
            raise KeyError(f"unknown table {name}")
        if name not in self._open:
            self._open[name] = TableWriter(self.dir / f"{name}.parquet", name)
        return self._open[name]

    def write(self, name: str, rows: list[dict] | pa.Table) -> None:
        self.table(name).write(rows)

    def finish(self) -> Path:
        """Close every shard and write the manifest (last, atomically)."""
        for name, w in self._open.items():
            w.close()
            self._done[name] = w.rows
        self._open.clear()
        manifest = {"run_id": self.run_id, "schema_version": SCHEMA_VERSION,
                    "written_at": datetime.now(UTC).isoformat(),
                    "tables": {n: {"file": f"{n}.parquet", "rows": r} for n, r in self._done.items()}}
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.dir / MANIFEST)
        return self.dir

    def abort(self) -> None:
        """Drop the open writers' temporary files (the run stays invisible)."""
        for w in self._open.values():
            try:
                w._writer.close()
            finally:
                w.tmp.unlink(missing_ok=True)
        self._open.clear()
