"""Top activating examples of many features, kept across the requests of one process.

The explorer labels every drawn feature with its top examples, and a large atlas puts millions of
rows in `activations`, so reading them all for each page is the slowest step of opening a graph.
Committed shards never change (each is checked against its manifest's checksum before a query
reads it), so a feature's top examples over a set of shards stay right as long as no shard goes:
when runs are committed, only their activation shards are read and merged in; when a shard goes
(compaction repacks them, a damaged run is left out), the feature is read again from all of them.
"""

from __future__ import annotations

import threading

import pandas as pd

from catalog.store import Catalog

COLUMNS = ["dictionary_id", "feature_idx", "task_id", "example_idx", "position", "token", "value", "text"]
_ORDER = (["value", "task_id", "example_idx"], [False, True, True])


class TopExamples:
    """Each feature's top `n` examples (as the named query `features_examples` gives them), remembered
    with the shards they were read from."""

    def __init__(self, n: int = 3):
        self.n = n
        self._top: dict[tuple[str, int], tuple[frozenset, pd.DataFrame]] = {}
        self._lock = threading.Lock()

    def get(self, cat: Catalog, keys: list[tuple[str, int]]) -> pd.DataFrame:
        """The top examples of these (dictionary_id, feature_idx) features, strongest first per feature."""
        shards = frozenset(cat.shards("activations"))
        with self._lock:
            known = {k: self._top.get(k) for k in keys}
        fresh = [k for k, v in known.items() if v is None or not v[0] <= shards]  # new, or a shard went
        if fresh:
            self._store(shards, self._read(cat, "features_examples(?::VARCHAR[], ?::BIGINT[], n := ?)", fresh), fresh)
        # the rest, brought up to date in one read of every shard committed since the earliest of them was
        # (merging in a shard a feature already reflects changes nothing: its rows are there or below its top n)
        stale = [k for k, v in known.items() if k not in fresh and shards - v[0]]
        if stale:
            new = set().union(*(shards - known[k][0] for k in stale))
            rows = self._read(cat, "features_examples_in(?::VARCHAR[], ?::VARCHAR[], ?::BIGINT[], n := ?)", stale,
                              sorted(new))
            with self._lock:
                old = pd.concat([self._top[k][1] for k in stale])
            self._store(shards, self._merge(old, rows), stale)
        with self._lock:
            parts = [self._top[k][1] for k in keys]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)

    def _read(self, cat: Catalog, call: str, keys: list, files: list[str] | None = None) -> pd.DataFrame:
        params = [[d for d, _ in keys], [int(f) for _, f in keys], self.n]
        return cat.sql(f"SELECT * FROM {call}", ([files] if files else []) + params)[COLUMNS]

    def _merge(self, old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
        """The top n per feature of both, one row per example (its strongest position, the first of equals)."""
        both = pd.concat([old, new], ignore_index=True)
        both = both.sort_values(["value", "position"], ascending=[False, True]).drop_duplicates(
            ["dictionary_id", "feature_idx", "task_id", "example_idx"])
        both = both.sort_values(_ORDER[0], ascending=_ORDER[1], kind="stable")
        return both.groupby(["dictionary_id", "feature_idx"], sort=False).head(self.n)

    def _store(self, shards: frozenset, rows: pd.DataFrame, keys: list) -> None:
        by_key = dict(iter(rows.groupby(["dictionary_id", "feature_idx"], sort=False)))
        with self._lock:
            for k in keys:
                self._top[k] = (shards, by_key.get((k[0], int(k[1])), pd.DataFrame(columns=COLUMNS)))


_CACHES: dict[tuple[str, int], TopExamples] = {}  # (catalogue, n) -> its cache, for this process
_CACHES_LOCK = threading.Lock()


def top_examples(cat: Catalog, keys: list[tuple[str, int]], n: int = 3) -> pd.DataFrame:
    """The top n examples of these features in this catalogue (see the module docstring)."""
    with _CACHES_LOCK:
        cache = _CACHES.setdefault((str(cat.root.resolve()), n), TopExamples(n))
    return cache.get(cat, keys)
