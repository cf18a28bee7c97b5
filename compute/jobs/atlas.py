"""The atlas: one attribution graph per prompt of a data set, computed in one process.

A data set is a file of prompts (JSONL with a `prompt` field and optional `target`, `answer` and
`label` fields, or plain text with one prompt per line) or a task's examples. It is registered as
a task whose examples are its prompts (example_idx = the prompt's line in the file, from 0), so
every graph is a local circuit of one example, exactly what `attribute --prompt` commits for
the prompt alone, and the prompt's metadata (its root, the model's prediction and whether it is the
answer, its label) is a row of `prompts`.

The graphs are committed in chunks of the file's lines, each chunk one run whose id derives from
the data set, the settings and the chunk: a rerun after a kill commits only the chunks not yet
committed, and a chunk committed twice (a killed worker's staged copy) changes nothing. A prompt
the model cannot read as given is dropped and counted by reason, never altered.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from catalog.errors import UserError
from catalog.progress import hidden
from catalog.store import Catalog
from compute.inputs import read_bounded
from compute.jobs import lifecycle
from compute.jobs.lifecycle import job_runs, run, run_row
from compute.jobs.local import (
    attention_of,
    graph_circuit_row,
    node_rows,
    parse_root,
    prompt_problem,
    site_dictionaries,
)
from compute.jobs.rows import example_row, task_row, write_model_and_dictionaries
from compute.local.merge import MergedGraph, merge_graphs
from compute.local.prompt_graph import GraphParams, prompt_graph
from compute.local.replacement import Replacement
from compute.models.handle import ModelHandle
from compute.tasks import Task, str_tokens
from schema.derive import columns_to_arrow

KIND = "atlas"  # runs.kind of an atlas chunk
CHUNK = 500  # prompts (lines of the file) per committed run
MAX_FILE_BYTES = 1 << 30  # a prompts file is read whole: at most 1 GiB (millions of prompts)
MAX_LINE_BYTES = 64 * 1024  # a longer line is dropped before it is parsed (no prompt of any model's context is that long)
FIELDS = ("prompt", "target", "answer", "label")


@dataclass
class AtlasPrompt:
    idx: int  # its line in the file (from 0), or its example index in a task
    prompt: str
    target: str | None = None  # a root spec, as `attribute --target` takes it; None: the model's top token
    answer: str | None = None
    label: str | None = None
    fields: dict = field(default_factory=dict)  # the file's other fields


@dataclass
class Dropped:
    """Prompts dropped, by reason: how many, and the first few indices (lines from 0) of each."""

    counts: Counter = field(default_factory=Counter)
    where: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, idx: int) -> None:
        self.counts[reason] += 1
        if len(self.where.setdefault(reason, [])) < 5:
            self.where[reason].append(idx)

    def merge(self, other: Dropped) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            self.where[reason] = (self.where.get(reason, []) + other.where[reason])[:5]

    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self, unit: str = "line") -> str:
        return "; ".join(f"{n} {reason} ({unit} {', '.join(str(i + 1) for i in self.where[reason])}"
                         f"{', ...' if n > len(self.where[reason]) else ''})" for reason, n in self.counts.most_common())

    def as_params(self) -> dict:
        return {reason: {"count": n, "first": self.where[reason]} for reason, n in self.counts.items()}


def read_prompts(path: str | Path) -> tuple[list[AtlasPrompt], Dropped]:
    """A file's prompts (JSONL objects with a `prompt` string, or plain lines of text) and the lines
    that cannot be read as one, counted by reason; a file that cannot be read at all, or holds no
    prompt, is refused in one line."""
    path = Path(path)
    lines = read_bounded(path, MAX_FILE_BYTES, "prompts file").splitlines()
    first = next((raw.strip() for raw in lines if raw.strip()), b"")
    jsonl = path.suffix in (".jsonl", ".json") or first.startswith(b"{")
    prompts, dropped = [], Dropped()
    for idx, raw in enumerate(lines):
        if len(raw) > MAX_LINE_BYTES:
            dropped.add(f"over {MAX_LINE_BYTES} bytes", idx)
            continue
        try:
            line = raw.decode("utf-8-sig" if idx == 0 else "utf-8")
        except UnicodeDecodeError:
            dropped.add("not UTF-8 text", idx)
            continue
        if not line.strip():
            dropped.add("empty", idx)
            continue
        if not jsonl:
            prompts.append(AtlasPrompt(idx, line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            dropped.add("not valid JSON", idx)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            dropped.add("no prompt field (a string)", idx)
            continue
        known = {k: obj.get(k) for k in FIELDS[1:]}
        if any(v is not None and not isinstance(v, str | int | float | bool) for v in known.values()):
            dropped.add("target, answer or label not a string", idx)
            continue
        target, answer, label = (None if v is None else str(v) for v in known.values())
        prompts.append(AtlasPrompt(idx, obj["prompt"], target, answer, label,
                                   {k: v for k, v in obj.items() if k not in FIELDS}))
    if not prompts:
        why = f": {dropped.describe()}" if dropped.total() else ""
        raise UserError(f"prompts file {path} has no prompts{why}")
    return prompts, dropped


def task_prompts(task: Task) -> list[AtlasPrompt]:
    """A task's examples as an atlas's prompts: each clean prompt, rooted at logit(clean answer) -
    logit(patch answer) (the clean answer's logit without patch answers), its case as the label."""
    out = []
    for i, e in enumerate(task.examples):
        target = f"diff:{e['clean_answer']}:{e['patch_answer']}" if "patch_answer" in e else f"logit:{e['clean_answer']}"
        out.append(AtlasPrompt(i, e["clean_prefix"], target, e["clean_answer"], e.get("case"),
                               {"split": e.get("split", "train")}))
    return out


def atlas_task(name: str, prompts: list[AtlasPrompt], source: str) -> Task:
    """The data set as a task: one example per prompt, at its index (the lines dropped before the
    model saw them are left out; the content hash is over the prompts as read)."""
    examples = [{"clean_prefix": p.prompt, "clean_answer": p.answer, "case": p.label, "line": p.idx,
                 "target": p.target, **({"fields": p.fields} if p.fields else {})} for p in prompts]
    return Task(name, examples, source, f"atlas of {len(prompts)} prompts")


@dataclass
class AtlasResult:
    name: str
    n_graphs: int  # committed by this call
    n_done: int  # prompts whose graphs were committed before (skipped)
    dropped: Dropped
    seconds_graphs: float  # time spent computing the graphs themselves (forward, attribution, pruning)


def settings_key(name: str, handle: ModelHandle, dicts: dict, params: GraphParams, attention: dict,
                 content_hash: str) -> str:
    """An atlas's name and what makes its graphs comparable: the model, its dictionaries, the graph
    settings, how attention is treated and the prompts (its runs' and graphs' ids derive from it)."""
    blob = json.dumps([name, handle.model_id, sorted(d.dictionary_id for d in dicts.values()), asdict(params),
                       attention_of(attention), content_hash], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def atlas_job(cat: Catalog, handle: ModelHandle, transcoders: dict, attention: dict, name: str,
              prompts: list[AtlasPrompt], params: GraphParams, source: str, dropped: Dropped | None = None,
              chunk: int = CHUNK, progress: bool = True, task: Task | None = None,
              shard: tuple[int, int] = (0, 1)) -> AtlasResult:
    """Every prompt's graph, committed chunk by chunk; prompts whose graphs are committed already are
    skipped (a rerun after a kill computes the rest). `shard` (i, n): only the prompts whose index is i
    modulo n (the data set and its settings stay the whole file's: shards are one atlas)."""
    import time

    from tqdm.auto import tqdm

    if chunk < 1:
        raise UserError(f"the chunk size must be at least 1, not {chunk}")
    model = handle.model
    dropped = dropped or Dropped()
    if task is None:
        task = atlas_task(name, prompts, source)
        examples = {p.idx: e for p, e in zip(prompts, task.examples, strict=True)}
    else:
        examples = dict(enumerate(task.examples))
    cat.check_task(task.name, task.content_hash)
    dicts = site_dictionaries(transcoders, attention)
    key = settings_key(name, handle, dicts, params, attention, task.content_hash)
    held = cat.sql("SELECT DISTINCT params->>'settings' AS s FROM runs WHERE kind = ? AND params->>'atlas' = ? "
                   "AND status = 'ok'", [KIND, name])
    if len(held) and set(held.s) != {key}:
        raise UserError(f"atlas {name!r} already holds graphs of other prompts or settings (model, dictionaries, "
                        "budgets, attention); give this one another --name")
    committed = set(cat.sql("SELECT prompt_idx FROM prompts WHERE atlas_id = ? AND starts_with(circuit_id, ?)",
                            [name, circuit_id_of(key, "")]).prompt_idx)
    chunks: dict[int, list[AtlasPrompt]] = {}  # the prompts not committed yet, by the chunk of lines they are in
    mine = [p for p in prompts if p.idx % shard[1] == shard[0]]
    for p in mine:
        if p.idx not in committed:
            chunks.setdefault(p.idx // chunk, []).append(p)
    n_done = sum(p.idx in committed for p in mine)
    todo = sorted(chunks)
    result = AtlasResult(name, 0, n_done, Dropped(), 0.0)
    result.dropped.merge(dropped)
    bar = tqdm(total=sum(len(chunks[c]) for c in todo), desc=f"atlas {name}", unit="prompt", disable=hidden(progress))
    for c in todo:
        lost = Dropped()  # the prompts of this chunk the model cannot read as given
        writer = _ChunkWriter(handle, dicts, task, examples, name, key)
        row = run_row(KIND, {**asdict(params), "atlas": name, "settings": key, "source": source, "chunk": c,
                             "chunk_size": chunk, "attention": attention_of(attention),
                             "file_dropped": dropped.as_params()})
        # the same prompts to do give the same run id: a killed worker's staged copy is replaced, never added
        # (inside a job-file job, under the job's prefix: how its runner finds and pushes them)
        prefix = job_runs(lifecycle.JOB_KEY) if lifecycle.JOB_KEY else "run-"
        row["run_id"] = f"{prefix}atlas-{key}-" + hashlib.sha256(str([p.idx for p in chunks[c]]).encode()).hexdigest()[:8]
        with run(cat, row) as w:
            for p in chunks[c]:
                t0 = time.perf_counter()
                problem = prompt_problem(model, p.prompt)
                if problem is not None:
                    lost.add(problem[0], p.idx)
                    bar.update()
                    continue
                rep = Replacement(model, transcoders, attention, model.to_tokens(p.prompt))
                try:
                    root, metric = parse_root(rep, p.target)
                except UserError:
                    lost.add("target not usable", p.idx)
                    bar.update()
                    continue
                g = prompt_graph(rep, root, params)
                result.seconds_graphs += time.perf_counter() - t0
                writer.add(p, rep, g, merge_graphs([g], params), metric, params, row["run_id"])
                bar.update()
            row["params"]["dropped"] = lost.as_params()
            writer.write(w)
        result.n_graphs += writer.n
        result.dropped.merge(lost)
    bar.close()
    return result


def circuit_id_of(key: str, idx: int | str) -> str:
    """An atlas graph's circuit id: its data set and settings, and the prompt's index."""
    return f"circuit-atlas-{key}-{idx}"


class _ChunkWriter:
    """One chunk's rows (its many edges and activations gathered as columns), written once per table:
    one row group each, not one per prompt."""

    def __init__(self, handle: ModelHandle, dicts: dict, task: Task, examples: dict[int, dict], atlas: str, key: str):
        self.handle, self.dicts, self.task, self.atlas, self.key = handle, dicts, task, atlas, key
        self.task_examples = examples
        self.n_layers = handle.model.cfg.n_layers
        self.n = 0
        self.cols: dict[str, dict[str, list]] = {t: {} for t in ("edges", "activations")}
        self.nodes, self.circuits, self.prompts, self.examples = [], [], [], []

    def _extend(self, table: str, **columns) -> None:
        for k, v in columns.items():
            self.cols[table].setdefault(k, []).append(v)

    def add(self, p: AtlasPrompt, rep: Replacement, g, merged: MergedGraph, metric: str, params: GraphParams,
            run_id: str) -> None:
        model = self.handle.model
        cid = circuit_id_of(self.key, p.idx)
        self.nodes += node_rows(cid, merged, self.dicts, self.n_layers)
        e = merged.edges
        self._extend("edges", circuit_id=np.full(len(e), cid, dtype=object),
                     src_idx=np.array([r["src_idx"] for r in e], dtype=np.int64),
                     dst_idx=np.array([r["dst_idx"] for r in e], dtype=np.int64),
                     kind=np.array([r["kind"] for r in e], dtype=object),
                     weight=np.array([r["weight"] for r in e], dtype=np.float64),
                     head_layer=np.array([r["head_layer"] for r in e], dtype=object),
                     head=np.array([r["head"] for r in e], dtype=object),
                     key_position=np.array([r.get("key_position") for r in e], dtype=object))
        for name, act in rep.active.items():
            self._extend("activations", example_idx=np.full(len(act), p.idx, dtype=np.int64),
                         dictionary_id=np.full(len(act), self.dicts[name].dictionary_id, dtype=object),
                         feature_idx=act[:, 1].numpy(), position=act[:, 0].numpy(),
                         value=rep.values[name][act[:, 0], act[:, 1]].double().numpy())
        probs = rep.logits[0, -1].softmax(-1)
        top = int(probs.argmax())
        prediction = model.to_string([top])
        tokens = str_tokens(model, p.prompt)
        self.circuits.append(graph_circuit_row(cid, run_id, self.handle.model_id, self.task.name, merged, metric,
                                               params))
        self.prompts.append({
            "circuit_id": cid, "atlas_id": self.atlas, "prompt_idx": p.idx, "run_id": run_id, "n_tokens": len(tokens),
            "target": p.target, "root": root_name(rep, g.root), "root_value": g.root_value, "answer": p.answer,
            "prediction": prediction, "probability": float(probs[top]),
            "correct": None if p.answer is None else prediction.strip() == p.answer.strip(),
            "label": p.label, "fields": p.fields or None})
        self.examples.append(example_row(self.task.name, p.idx, self.task_examples[p.idx], tokens))
        self.n += 1

    def write(self, w) -> None:
        """Every table of the chunk: the model, dictionaries and the data set's task row, then the rows."""
        write_model_and_dictionaries(w, self.handle, self.dicts)
        w.write("tasks", [task_row(self.task)])
        w.write("examples", self.examples)
        w.write("circuits", self.circuits)
        w.write("nodes", self.nodes)
        w.write("prompts", self.prompts)
        for table, cols in self.cols.items():
            if cols:
                joined = {k: np.concatenate([np.asarray(v, dtype=object if k in _NULLABLE[table] else None)
                                             for v in parts]) for k, parts in cols.items()}
                if table == "activations":
                    joined["task_id"] = self.task.name
                n = len(next(iter(joined.values())))
                w.write(table, columns_to_arrow(table, joined, n))


# Columns gathered as Python objects (strings, or numbers that may be NULL)
_NULLABLE = {"edges": {"circuit_id", "kind", "head_layer", "head", "key_position"},
             "activations": {"dictionary_id"}}


def root_name(rep: Replacement, root) -> str:
    """A graph's root as `prompts.root` names it: a logit's token, 'A - B', or SITE/FEATURE@POSITION."""
    if root.site == "logit":
        decode = rep.model.to_string
        return decode([root.feature]) + ("" if root.minus is None else " - " + decode([root.minus]))
    return f"{root.site}/{root.feature}@{root.position}"


SUPERNODES = "supernodes"  # runs.kind of a supernode grouping


def supernodes_job(cat: Catalog, atlas: str, min_graphs: int = 10, min_jaccard: float = 0.5,
                   min_cosine: float = 0.3) -> str:
    """Group an atlas's recurrent features that play one role into supernodes, committed as a run:
    two features (each in the circuits of at least `min_graphs` graphs) are linked when they are in
    the same graphs (Jaccard >= min_jaccard) and write alike (decoder cosine >= min_cosine; both
    decoders write into the residual stream); a supernode is a connected group of two or more.
    Returns the run id (`supernode_graph` reads the atlas's newest)."""
    import networkx as nx

    from catalog import atlas as questions
    from catalog.diff import decoder, unit_rows

    questions.check(cat, atlas)
    pairs = questions.cooccurrence(cat, atlas, min_graphs)
    pairs = pairs[pairs.jaccard >= min_jaccard]
    feats = questions.recurrence(cat, atlas).query("n_graphs >= @min_graphs").set_index(["dictionary_id", "feature_idx"])
    paths = dict(cat.sql("SELECT dictionary_id, path FROM dictionaries").itertuples(index=False))
    cache: dict = {}

    def direction(d: str, f: int) -> np.ndarray:
        return unit_rows(decoder(cache, d, paths.get(d, ""))[[f]])[0]

    graph = nx.Graph()
    for p in pairs.itertuples():
        a, b = direction(p.dictionary_a, p.feature_a), direction(p.dictionary_b, p.feature_b)
        if a.shape == b.shape and float(a @ b) >= min_cosine:
            graph.add_edge((p.dictionary_a, p.feature_a), (p.dictionary_b, p.feature_b))
    groups = sorted((sorted(c, key=lambda k: -feats.loc[k].n_graphs) for c in nx.connected_components(graph)),
                    key=lambda g: -sum(feats.loc[k].n_graphs for k in g))
    row = run_row(SUPERNODES, {"atlas": atlas, "min_graphs": min_graphs, "min_jaccard": min_jaccard,
                               "min_cosine": min_cosine, "n_supernodes": len(groups)})
    rows = []
    for k, members in enumerate(groups, start=1):
        f = [feats.loc[m] for m in members]
        name = f"S{k} " + "+".join(f"{x.component}_{x.layer}/{m[1]}" for x, m in zip(f[:3], members, strict=False)) + \
            ("+..." if len(members) > 3 else "")
        rows += [{"run_id": row["run_id"], "atlas_id": atlas, "supernode": name, "dictionary_id": m[0],
                  "feature_idx": int(m[1]), "component": x.component, "layer": int(x.layer),
                  "n_graphs": int(x.n_graphs)} for m, x in zip(members, f, strict=True)]
    with run(cat, row) as w:
        w.write(SUPERNODES, rows)
    return row["run_id"]
