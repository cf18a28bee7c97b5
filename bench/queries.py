"""Query-layer benchmark: diff of two circuits and comparison of 100 circuits, DuckDB against pandas.

    python -m bench.queries                 # 1M edges, then 10M
    python -m bench.queries --scales 1e6    # one scale
    python -m bench.queries --ops diff      # the diff only
    python -m bench.queries --ops verify    # what verifying the shards costs a query
    python -m bench.queries --scales 1e8    # 100M edges over 10,000 runs, before and after compaction

Synthetic circuits are written into a temporary catalogue as Parquet shards, exactly as a
worker writes them. At each scale E:
- diff: circuits A and B of E edges each over E/50 nodes; B renumbers every node (so nodes must
  be matched by key), drops 10% of A's nodes' circuit membership, changes half of the edge
  weights, removes 10% of the edges and adds as many new ones.
- compare: 100 circuits of E/100 in-circuit features each, drawn from a shared pool so that a
  feature sits in about 10 of them: shared features, pairwise Jaccard and rank correlation
  (the comparison reads nodes only; the circuits' edges play no part in it).
At 1e8 and above (`--runs`, default 10,000): a catalogue of that many edges spread over that many
runs (one circuit each, written and committed one after another, so memory stays flat), the
named queries timed on it, then `cli.py compact`'s compaction, and the same queries again; the
answers before and after must be equal.
verify: the diff with every shard checked against its manifest (`catalog.verified`) the first time a
process reads the catalogue with no verification cache (every shard hashed), warm (every shard
stat-ed; taken in turns with the unverified diff in one process), and as a new process's first query
(the verdicts read from the cache), each beside the same diff over unchecked shards.
DuckDB runs the catalogue's own macros (`diff_summary`, what `cli.py diff` reports: node_diff
and edge_diff's joined edge pairs, counted with the total |delta|; `feature_overlap`); pandas does
the same computation, the same way, with merges and group-bys on the same shards. Beside them, in
the same run: DuckDB on one thread (pandas' single core; the ratio of the two DuckDB times is what
more cores buy), and the diff's floor: a full join of two edge sets of that size whose edges match
(A's edges with themselves), with nothing else (no node matching, no labels; any edge diff joins
its two edge sets at least once). Each measurement runs
in a fresh process (best of 3 for the time; peak memory = the process's peak RSS above its
resident size before the first run), and both answers are checked to agree. Each DuckDB run
opens the catalogue anew; the process holds its DuckDB instance from the first run on, as a
session does (every run still reads the shards and computes the whole diff).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import catalog
from tests.synthetic import layered_circuit, write_circuit

SUBS = [("embed", -1)] + [(c, i) for i in range(6) for c in ("attn", "mlp", "resid")]


def _nodes(rng, n: int, pool: int, in_circuit: np.ndarray | None = None) -> dict:
    sub = rng.integers(0, len(SUBS), n)
    feats = np.empty(n, dtype=np.int64)
    for s in range(len(SUBS)):  # distinct features within each submodule
        idx = np.flatnonzero(sub == s)
        feats[idx] = rng.choice(pool, size=len(idx), replace=False)
    return {"node_idx": np.arange(n), "component": np.array([SUBS[s][0] for s in sub], dtype=object),
            "layer": np.array([SUBS[s][1] for s in sub]), "dictionary_id": np.array([f"d{s}" for s in sub], dtype=object),
            "feature_idx": feats, "is_error": np.zeros(n, bool), "position": np.array([None] * n, dtype=object),
            "effect": rng.normal(size=n), "in_circuit": np.ones(n, bool) if in_circuit is None else in_circuit}


def _edges(rng, n_nodes: int, n_edges: int) -> tuple[np.ndarray, np.ndarray]:
    codes = np.unique(rng.integers(0, n_nodes * n_nodes, int(n_edges * 1.1)))
    codes = rng.permutation(codes)[:n_edges]
    return codes // n_nodes, codes % n_nodes


def build(root: Path, n_edges: int, n_circuits: int = 100, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    cat = catalog.init(root)
    n = max(n_edges // 50, 100)
    a_nodes = _nodes(rng, n, pool=4 * n)
    src, dst = _edges(rng, n, n_edges)
    w = rng.normal(size=n_edges)
    write_circuit(cat, a_nodes, {"src_idx": src, "dst_idx": dst, "weight": w}, circuit_id="A")
    perm = rng.permutation(n)  # B's node perm[i] is A's node i
    b_nodes = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in a_nodes.items()}
    for k in b_nodes:
        if k != "node_idx":
            b_nodes[k] = np.empty_like(a_nodes[k])
            b_nodes[k][perm] = a_nodes[k]
    b_nodes["in_circuit"] = rng.random(n) > 0.1
    b_nodes["effect"] = b_nodes["effect"] + rng.normal(scale=0.1, size=n) * (rng.random(n) < 0.5)
    keep = rng.random(n_edges) > 0.1
    wb = np.where(rng.random(n_edges) < 0.5, w + rng.normal(scale=0.1, size=n_edges), w)[keep]
    new_src, new_dst = _edges(rng, n, int((~keep).sum()))
    write_circuit(cat, b_nodes, {"src_idx": np.concatenate([perm[src[keep]], perm[new_src]]),
                                 "dst_idx": np.concatenate([perm[dst[keep]], perm[new_dst]]),
                                 "weight": np.concatenate([wb, rng.normal(size=len(new_src))])}, circuit_id="B")
    m = max(n_edges // 100, 50)
    empty = {"src_idx": np.zeros(0, np.int64), "dst_idx": np.zeros(0, np.int64), "weight": np.zeros(0)}
    others = [{"circuit_id": f"c{i:03d}", "nodes": _nodes(rng, m, pool=max(10 * m // len(SUBS), m)), "edges": empty,
               "task_id": f"task{i:03d}"} for i in range(1, n_circuits)]
    write_circuit(cat, _nodes(rng, m, pool=max(10 * m // len(SUBS), m)), empty, circuit_id="c000",
                  extra_circuits=others)


# ---- the two engines ---------------------------------------------------------------------

def duckdb_diff(root: Path, threads: int | None = None) -> dict:
    cat = _open(root, threads)
    return _summary(cat.sql("SELECT * FROM diff_summary('A', 'B')"))


def duckdb_compare(root: Path, threads: int | None = None):
    cat = _open(root, threads)
    ids = [f"c{i:03d}" for i in range(100)]
    ov = cat.sql("SELECT circuit_a, circuit_b, n_shared, jaccard, rank_corr FROM feature_overlap(?)", [ids])
    return ov.sort_values(["circuit_a", "circuit_b"]).reset_index(drop=True)


def edge_join(root: Path, threads: int | None = None) -> int:
    """The diff's floor: a full join of two 10M-edge sets whose edges match, read from the shards
    (A's edges with themselves, on one BIGINT key per edge as the diff joins), the pairs counted."""
    return int(_open(root, threads).sql(
        "WITH ea AS (SELECT src_idx::BIGINT * 4294967296 + dst_idx AS k, weight FROM edges WHERE circuit_id = 'A'), "
        "eb AS (SELECT src_idx::BIGINT * 4294967296 + dst_idx AS k, weight FROM edges WHERE circuit_id = 'A') "
        "SELECT count(*) AS n, sum(ea.weight) AS wa, sum(eb.weight) AS wb FROM ea FULL JOIN eb USING (k)").n[0])


def diff_unverified(root: Path) -> dict:
    """The diff with the views over every shard unchecked (what queries read before they verified)."""
    import catalog.store

    catalog.store.readable = _unchecked
    return duckdb_diff(root)


def _unchecked(generation: Path):
    from catalog.verified import Readable
    from schema.tables import TABLES

    return Readable({t: tuple(sorted(str(p) for p in Path(generation).glob(f"*/{t}.parquet"))) for t in TABLES})


def diff_alternating(root: Path, repeat: int) -> dict:
    """The warm verified diff and the unverified one taken in turns in one process (so that the machine's
    drift falls on both alike): the best of each, and the answers."""
    import catalog.store

    checked, best = catalog.store.readable, {"verified": [], "unverified": []}
    duckdb_diff(root)  # the shards verified once, as any first query does
    for _ in range(repeat):
        for mode, fn in (("unverified", _unchecked), ("verified", checked)):
            catalog.store.readable = fn
            t = time.perf_counter()
            answer = duckdb_diff(root)
            best[mode].append(time.perf_counter() - t)
    catalog.store.readable = checked
    return {"unverified": min(best["unverified"]), "verified": min(best["verified"]), "answer": answer}


def diff_cold(root: Path) -> dict:
    """The diff as the first query on a catalogue no process has verified: every shard hashed."""
    import catalog.verified

    catalog.verified._memo.clear()
    os.environ["CIRCUIT_VERIFIED_CACHE"] = tempfile.mkdtemp()
    return duckdb_diff(root)


def diff_warm(root: Path) -> dict:
    """The diff in a process whose first query finds the verdicts in the verification cache."""
    return duckdb_diff(root)


def _open(root: Path, threads: int | None):
    """The catalogue, its DuckDB instance limited to `threads` (the sandbox locks its settings, so
    the limit goes in as the instance starts; measurements run in processes of their own)."""
    import duckdb

    if threads and not getattr(duckdb.connect, "limited", False):
        connect = duckdb.connect

        def limited(*args, **kwargs):
            con = connect(*args, **kwargs)
            con.execute(f"SET threads = {int(threads)}")
            return con

        limited.limited = True
        duckdb.connect = limited
    return catalog.open(root)


KEY = ["component", "layer", "dict_key", "feat_key", "is_error", "pos_key"]


def _keyed(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(dict_key=df.dictionary_id.fillna(""), feat_key=df.feature_idx.fillna(-1).astype("int64"),
                     pos_key=df.position.fillna(-1).astype("int64"))


def _read(root: Path, table: str, ids: list[str], columns: list[str]) -> pd.DataFrame:
    """One table's rows of some circuits, from every committed shard (what the DuckDB view reads)."""
    import pyarrow.dataset as ds

    data = ds.dataset(sorted(str(f) for f in root.glob(f"runs/*/{table}.parquet")), format="parquet")
    return data.to_table(columns=columns, filter=ds.field("circuit_id").isin(ids)).to_pandas()


def pandas_diff(root: Path) -> dict:
    """diff_summary in pandas, the same way: nodes outer-merged on their key; B's nodes take the
    node_idx of A's node with the same key (or a new id past A's); edges outer-merged on the ids."""
    nodes = _keyed(_read(root, "nodes", ["A", "B"], ["circuit_id", "node_idx", "component", "layer", "dictionary_id",
                                                     "feature_idx", "is_error", "position", "effect", "in_circuit"]))
    edges = _read(root, "edges", ["A", "B"], ["circuit_id", "src_idx", "dst_idx", "kind", "weight"])
    na, nb = nodes[nodes.circuit_id == "A"], nodes[nodes.circuit_id == "B"]
    j = na.merge(nb, on=KEY, how="outer", suffixes=("_a", "_b"))
    in_a, in_b = j.in_circuit_a.fillna(False).astype(bool), j.in_circuit_b.fillna(False).astype(bool)
    delta = j.effect_b.fillna(0) - j.effect_a.fillna(0)
    status = np.select([in_a & ~in_b, in_b & ~in_a, delta.abs() > 1e-9], ["removed", "added", "changed"], "same")
    rows = [pd.DataFrame({"element": "nodes", "status": status, "delta": delta})[(in_a | in_b).values]]
    m = nb[["node_idx", *KEY]].merge(na[["node_idx", *KEY]], on=KEY, how="left", suffixes=("", "_a"))
    new = m.node_idx_a.isna().values
    kid = m.node_idx_a.values.copy()
    kid[new] = (na.node_idx.max() if len(na) else -1) + 1 + np.arange(new.sum())
    kb = pd.Series(kid.astype("int64"), index=m.node_idx.values)
    ea, eb = edges[edges.circuit_id == "A"], edges[edges.circuit_id == "B"]
    eb = eb.assign(src_idx=eb.src_idx.map(kb), dst_idx=eb.dst_idx.map(kb))
    je = ea.merge(eb, on=["src_idx", "dst_idx", "kind"], how="outer", suffixes=("_a", "_b"))
    d = je.weight_b.fillna(0) - je.weight_a.fillna(0)
    estatus = np.select([je.weight_b.isna(), je.weight_a.isna(), d.abs() > 1e-9], ["removed", "added", "changed"],
                        "same")
    rows.append(pd.DataFrame({"element": "edges", "status": estatus, "delta": d}))
    out = pd.concat(rows).groupby(["element", "status"]).agg(n=("delta", "size"),
                                                              total_abs_delta=("delta", lambda x: x.abs().sum()))
    return _summary(out.reset_index())


def pandas_compare(root: Path):
    ids = [f"c{i:03d}" for i in range(100)]
    nodes = _read(root, "nodes", ids, ["circuit_id", "dictionary_id", "feature_idx", "effect", "in_circuit"])
    f = (nodes[nodes.in_circuit & nodes.feature_idx.notna()]
         .groupby(["circuit_id", "dictionary_id", "feature_idx"], as_index=False).effect.sum())
    sizes = f.groupby("circuit_id").size()
    s = f.merge(f, on=["dictionary_id", "feature_idx"], suffixes=("_a", "_b"))
    s = s[s.circuit_id_a < s.circuit_id_b]
    g = s.groupby(["circuit_id_a", "circuit_id_b"])
    s = s.assign(ra=g.effect_a.rank(method="min"), rb=g.effect_b.rank(method="min"))
    s = s.assign(xy=s.ra * s.rb, xx=s.ra * s.ra, yy=s.rb * s.rb)
    agg = s.groupby(["circuit_id_a", "circuit_id_b"]).agg(n=("ra", "size"), x=("ra", "sum"), y=("rb", "sum"),
                                                         xy=("xy", "sum"), xx=("xx", "sum"), yy=("yy", "sum"))
    cov = agg.xy / agg.n - agg.x * agg.y / agg.n**2
    corr = cov / np.sqrt((agg.xx / agg.n - (agg.x / agg.n) ** 2) * (agg.yy / agg.n - (agg.y / agg.n) ** 2))
    out = agg.reset_index().rename(columns={"circuit_id_a": "circuit_a", "circuit_id_b": "circuit_b", "n": "n_shared"})
    out["jaccard"] = out.n_shared / (out.circuit_a.map(sizes).values + out.circuit_b.map(sizes).values - out.n_shared)
    out["rank_corr"] = corr.values
    return out[["circuit_a", "circuit_b", "n_shared", "jaccard", "rank_corr"]].sort_values(
        ["circuit_a", "circuit_b"]).reset_index(drop=True)


def _summary(df: pd.DataFrame) -> dict:
    """(element, status) -> (count, total |delta|)."""
    return {(r.element, r.status): (int(r.n), float(r.total_abs_delta)) for r in df.itertuples()}


def _same_summary(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and np.isclose(a[k][1], b[k][1]) for k in a)


# ---- many runs: 1e8 edges over 10,000 runs, before and after compaction --------------------------

def build_many(root: Path, n_edges: int, n_runs: int, seed: int = 0) -> tuple[list[float], int]:
    """One circuit per run (layered like a 6-layer model's: a DAG, as the path queries expect), each
    written and committed before the next is drawn; returns the process's peak RSS (MiB) after each
    tenth of the runs (flat: nothing accumulates) and the number of edges written."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    cat = catalog.init(root)
    per = n_edges // n_runs
    # layered_circuit draws `gap` edges between consecutive rows and `width` into the metric: choose
    # the width so that the run holds exactly `per` edges (and each gap has enough node pairs)
    width = int(np.sqrt(per / len(SUBS))) + 4
    width += (per - width) % (len(SUBS) - 1)
    gap = (per - width) // (len(SUBS) - 1)
    dictionaries = {s: f"d{i}" for i, s in enumerate(SUBS)}
    peaks, total = [], 0
    for i in tqdm(range(n_runs), desc="writing runs", unit="run", leave=False):
        nodes, edges = layered_circuit(rng, 6, width, gap * len(SUBS), dictionaries, feature_pool=4 * width)
        write_circuit(cat, nodes, edges, task_id=f"task{i % 100:02d}", circuit_id=f"m{i:05d}")
        total += len(edges["src_idx"])
        if (i + 1) % max(n_runs // 10, 1) == 0:
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return peaks, total


def many_queries(n_runs: int) -> dict[str, str]:
    """The named queries timed on the many-runs catalogue (and a full scan)."""
    ids = [f"m{i:05d}" for i in range(0, n_runs, max(n_runs // 100, 1))][:100]
    return {"full scan: count and sum of every edge": "SELECT count(*) AS n, sum(weight) AS w FROM edges",
            "circuit_list()": "SELECT * FROM circuit_list()",
            "feature_overlap, 100 circuits": f"SELECT * FROM feature_overlap({ids})",
            "shared_features, 100 circuits": f"SELECT * FROM shared_features({ids})",
            "diff_summary of two circuits": f"SELECT * FROM diff_summary('{ids[0]}', '{ids[1]}')",
            "circuit_paths of one circuit": f"SELECT * FROM circuit_paths('{ids[-1]}', 5)",
            "one circuit's nodes": f"SELECT * FROM nodes WHERE circuit_id = '{ids[50]}'"}


def sql(root: Path, query: str) -> pd.DataFrame:
    return catalog.open(root).sql(f"SELECT * FROM ({query}) ORDER BY ALL")


def compaction(root: Path) -> dict:
    from catalog.compaction import compact

    r = compact(catalog.open(root), progress=False)
    return {"packs": len(r.packs), "runs": r.runs_packed, "shards": sum(p["shards"] for p in r.packs)}


def _same_frame(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Equal up to floating-point summation order."""
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return False
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number):
            if not np.allclose(x, y, rtol=1e-9, atol=1e-12, equal_nan=True):
                return False
        elif [str(v) for v in x] != [str(v) for v in y]:
            return False
    return True


def many_runs(n_edges: int, n_runs: int, repeat: int, timeout: float, where: Path) -> None:
    root = where / "catalog"
    t = time.perf_counter()
    peaks, total = build_many(root, n_edges, n_runs)
    files = sum(1 for _ in root.glob("runs/*/*.parquet"))
    print(f"{total:,} edges over {n_runs:,} runs: written in {time.perf_counter() - t:.0f} s, {files:,} shards, "
          f"{sum(f.stat().st_size for f in root.rglob('*.parquet')) / 2**30:.2f} GiB of Parquet; peak RSS after each "
          f"tenth of the runs (MiB): {', '.join(f'{p:.0f}' for p in peaks)}", flush=True)
    queries = many_queries(n_runs)
    before = {name: measure("sql", root, repeat, timeout, q) for name, q in queries.items()}
    for name, m in before.items():
        print(f"  before compaction: {name}: {m[0]:.2f} s" if m else f"  before compaction: {name}: timed out", flush=True)
    c = measure("compaction", root, 1, timeout * 4)
    after_files = sum(1 for _ in root.glob("runs/*/*.parquet"))
    print(f"compaction: {c[0]:.0f} s, peak {c[1]:.0f} MiB above start; {c[2]['runs']:,} runs into {c[2]['packs']} packs; "
          f"{files:,} shards -> {after_files:,}", flush=True)
    rows = []
    for name, q in queries.items():
        a = measure("sql", root, repeat, timeout, q)
        b = before[name]
        rows.append({"query": name, "before_s": round(b[0], 2) if b else None, "after_s": round(a[0], 2) if a else None,
                     "speedup": round(b[0] / a[0], 1) if a and b else None,
                     "after_peak_MiB": round(a[1]) if a else None,
                     "answers_equal": _same_frame(b[2], a[2]) if a and b else None})
        print(pd.DataFrame([rows[-1]]).to_string(index=False, header=len(rows) == 1), flush=True)
    df = pd.DataFrame(rows)
    print("\n" + df.to_string(index=False))
    assert df.answers_equal.all(), "an answer changed with compaction"


# ---- measuring -------------------------------------------------------------------------------

def _measure(fn_name: str, root: str, repeat: int, q: mp.Queue, *args) -> None:
    fn = globals()[fn_name]
    page_kib = resource.getpagesize() / 1024
    base = int(Path("/proc/self/statm").read_text().split()[1]) * page_kib  # resident now, KiB
    times, result = [], None
    try:
        for _ in range(repeat):
            t = time.perf_counter()
            result = fn(Path(root), *args)
            times.append(time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001  (reported, not hung on)
        q.put(None)
        print(f"{fn_name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    q.put((min(times), peak / 1024, result))


def measure(fn_name: str, root: Path, repeat: int, timeout: float, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(fn_name, str(root), repeat, q, *args))
    p.start()
    try:
        return q.get(timeout=timeout)
    except Exception:  # noqa: BLE001  (timed out)
        return None
    finally:
        p.kill()
        p.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", nargs="+", type=float, default=[1e6, 1e7], help="edges per circuit")
    ap.add_argument("--ops", nargs="+", choices=("diff", "compare", "verify"), default=["diff", "compare", "verify"],
                    help="what to time at scales below 1e8 (verify: what checking the shards costs a query)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600, help="seconds before a measurement is stopped")
    ap.add_argument("--runs", type=int, default=10_000, help="runs the edges are spread over, at 1e8 and above")
    ap.add_argument("--dir", type=Path, help="where to write the catalogues (default: a temporary folder)")
    args = ap.parse_args()
    os.environ["CIRCUIT_VERIFIED_CACHE"] = tempfile.mkdtemp(prefix="verified-")  # this run's own, inherited
    rows, verified_rows = [], []
    for scale in args.scales:
        if scale >= 1e8:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                many_runs(int(scale), args.runs, args.repeat, args.timeout, Path(tmp))
            continue
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            root = Path(tmp) / "catalog"
            t = time.perf_counter()
            build(root, int(scale))
            print(f"{int(scale):,} edges per circuit: catalogue written in {time.perf_counter() - t:.1f}s "
                  f"({sum(f.stat().st_size for f in root.rglob('*.parquet')) / 2**20:.0f} MiB of Parquet)", flush=True)
            for op in args.ops:
                if op == "verify":
                    verify_row(root, scale, args, verified_rows)
                    continue
                d = measure(f"duckdb_{op}", root, args.repeat, args.timeout)
                d1 = measure(f"duckdb_{op}", root, args.repeat, args.timeout, 1)
                p = measure(f"pandas_{op}", root, args.repeat, args.timeout)
                floor = measure("edge_join", root, args.repeat, args.timeout) if op == "diff" else None
                same = _same_summary if op == "diff" else _same_overlap
                if d and p:
                    assert same(d[2], p[2]), f"{op}: DuckDB and pandas disagree"
                if d and d1:
                    assert same(d[2], d1[2]), f"{op}: DuckDB on one thread and on {_threads()} disagree"
                if d and op == "diff":
                    print("  diff: " + ", ".join(f"{e} {s} {n}" for (e, s), (n, _) in sorted(d[2].items())), flush=True)
                rows.append({"edges": f"{int(scale):,}", "op": op,
                             "duckdb_s": _s(d), "duckdb_1_thread_s": _s(d1), "threads_gain": _ratio(d1, d),
                             "pandas_s": _s(p), "speedup": _ratio(p, d), "speedup_1_thread": _ratio(p, d1),
                             "edge_join_s": _s(floor), "x_floor": _ratio(d, floor),
                             "duckdb_peak_MiB": round(d[1]) if d else None, "pandas_peak_MiB": round(p[1]) if p else None,
                             "answers_agree": bool(d and p)})
                print(pd.DataFrame([rows[-1]]).to_string(index=False, header=len(rows) == 1), flush=True)
    if verified_rows:
        v = pd.DataFrame(verified_rows)
        print("\n" + v.to_string(index=False))
        for r in v.itertuples():
            print(f"goal: a warm verified query at {r.edges} edges <= 1.05x the unverified one: {r.warm_x}x "
                  f"({'met' if r.warm_x is not None and r.warm_x <= 1.05 else 'missed'}); the first costs {r.cold_x}x")
    if not rows:
        return
    df = pd.DataFrame(rows)
    print("\n" + df.to_string(index=False))
    threads = _threads()
    for op, goal, scale in (("diff", "<= 1 s", 1e7), ("compare", ">= 5x pandas", 1e6)):
        at = df[(df.op == op) & (df.edges == f"{int(scale):,}")]
        if len(at):
            r = at.iloc[0]
            met = (r.duckdb_s or 99) <= 1 if op == "diff" else (r.speedup or 0) >= 5
            where = (f"a bare full join of two such edge sets, without which no diff is possible, takes "
                     f"{r.edge_join_s} s here ({r.x_floor}x)" if op == "diff" else
                     f"{r.speedup_1_thread}x pandas on one thread, as pandas runs")
            print(f"goal: {op} at {r.edges} edges {goal}: {r.duckdb_s} s, {r.speedup}x pandas "
                  f"({'met' if met else 'missed'}); {where}; DuckDB's {threads} threads made it "
                  f"{r.threads_gain}x faster than one")


def verify_row(root: Path, scale: float, args, out: list) -> None:
    """The diff with its shards verified, cold (every shard hashed), warm in the process (stat-ed), and
    in a new process (the verdicts read from the verification cache), beside the unverified diff."""
    off = measure("diff_unverified", root, args.repeat, args.timeout)
    cold = measure("diff_cold", root, args.repeat, args.timeout)
    turns = measure("diff_alternating", root, 1, args.timeout, args.repeat)  # warm and unverified in turns
    fresh = measure("diff_warm", root, 1, args.timeout)  # one query in a new process: the verdicts from disk
    off1 = measure("diff_unverified", root, 1, args.timeout)  # and its twin: one unverified query in a new one
    for m in (cold, fresh, off1):
        assert m and off and _same_summary(m[2], off[2]), "verified and unverified diffs disagree"
    assert turns and _same_summary(turns[2]["answer"], off[2]), "verified and unverified diffs disagree"
    warm, unverified = (turns[2]["verified"],), (turns[2]["unverified"],)
    out.append({"edges": f"{int(scale):,}", "unverified_s": _s(off), "cold_s": _s(cold), "cold_x": _ratio(cold, off),
                "warm_s": _s(warm), "unverified_in_turn_s": _s(unverified), "warm_x": _ratio(warm, unverified),
                "new_process_s": _s(fresh), "unverified_new_process_s": _s(off1),
                "new_process_x": _ratio(fresh, off1),
                "parquet_MiB": round(sum(f.stat().st_size for f in root.rglob("*.parquet")) / 2**20)})
    print(pd.DataFrame([out[-1]]).to_string(index=False, header=len(out) == 1), flush=True)


def _s(m) -> float | None:
    return round(m[0], 3) if m else None


def _ratio(slow, fast) -> float | None:
    return round(slow[0] / fast[0], 2) if slow and fast else None


def _threads() -> int:
    import duckdb

    return int(duckdb.connect().execute("SELECT current_setting('threads')").fetchall()[0][0])


def _same_overlap(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return (len(a) == len(b) and (a.circuit_a.values == b.circuit_a.values).all()
            and (a.n_shared.values == b.n_shared.values).all()
            and np.allclose(a.jaccard.values, b.jaccard.values)
            and np.allclose(a.rank_corr.values, b.rank_corr.values, equal_nan=True, atol=1e-9))


if __name__ == "__main__":
    main()
