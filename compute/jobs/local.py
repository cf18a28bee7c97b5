"""Local-circuit jobs: one prompt's attribution graph, or a task's (the mean over its prompts), one run.

A prompt is registered as a task of one example (named `prompt-<hash>`), so a per-prompt graph
is a circuit like any other: its nodes carry positions, its edges are direct contributions
(kind attribution), their split per head (ov) and the attention-score decompositions of the
strongest head moves (qk, qk_query, qk_key). `compare`, `diff`, `paths` and `render` read them
unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

from catalog.errors import UserError, first_line
from catalog.progress import hidden
from catalog.shards import RunWriter
from catalog.store import Catalog, new_id
from compute.dictionaries.kinds import TrainedDictionary
from compute.jobs.lifecycle import run, run_row
from compute.jobs.rows import (
    EDGE_ROWS,
    circuit_row,
    require_usable_examples,
    write_activation_values,
    write_model_and_dictionaries,
    write_task,
)
from compute.local.contributions import Target, feature_target, logit_target, node_label
from compute.local.merge import MergedGraph, merge_graphs
from compute.local.prompt_graph import GraphParams, PromptGraph, prompt_graph
from compute.local.replacement import EMBED, Replacement
from compute.models.handle import ModelHandle
from compute.tasks import Task, encode, tokenize, unknown_token
from schema.sites import ERROR, METRIC, block_input, site, transcoder_site

METHOD = "local"  # circuits.method of local circuits (hierarchical attribution in the replacement model)
# The zoo's MLP transcoders: 1000 steps at twice the SAEs' learning rate reach what 2000 steps at
# theirs do (held out, the released ones: variance explained 0.973 / 0.981, L0 4.4 / 4.1, loss
# recovered 0.999 / 0.966 for mlp_0 / mlp_1; measured before the release: 2000 steps gave 0.976 /
# 0.983, 3.9-4.2, 1.000 / 0.971) in half the time.
ZOO_TRANSCODERS = {"architecture": "transcoder", "steps": 1000, "lr": 4e-3}


def zoo_local_set(zoo, progress: bool = True) -> tuple[dict[int, TrainedDictionary], dict[int, TrainedDictionary]]:
    """The zoo's local replacement dictionaries: its MLP transcoders (trained and cached on first
    use) and the attention-output SAEs of its own set."""
    from compute.dictionaries.building import build_dictionaries
    from compute.dictionaries.training import SAEConfig

    n = zoo.model.cfg.n_layers
    transcoders = build_dictionaries(zoo, SAEConfig(**ZOO_TRANSCODERS), progress)
    attention = build_dictionaries(zoo, progress=progress)
    return ({i: transcoders[transcoder_site(i).name] for i in range(n)},
            {i: attention[site("attn", i).name] for i in range(n)})


ATTENTION_MODES = ("auto", "saes", "frozen")


def local_model(zoo_name: str, model_name: str | None, dictionary_set: Path | None, dictionary_spec: Path | None,
                device: str, dtype: str, prompts: list[str], attention_mode: str = "auto"):
    """(model handle, zoo or None, transcoders, attention SAEs by layer): the zoo's, or a checkpoint's
    from its dictionary set (which must hold a transcoder at every MLP, and an SAE at every
    attention output or at none; the replacement model names what is missing). Attention mode
    `frozen` leaves the attention SAEs out (attention is then a frozen linear path), `saes`
    requires them, `auto` takes them when the set has any."""
    from compute.jobs.loading import checkpoint_and_dictionaries, say, zoo_and_dictionaries

    if attention_mode not in ATTENTION_MODES:
        raise UserError(f"attention mode {attention_mode!r}: choose from {', '.join(ATTENTION_MODES)}")
    if model_name is None:
        if dictionary_set or dictionary_spec:
            raise UserError("--dictionaries and --dictionary-spec go with --model")
        zoo, _, _ = zoo_and_dictionaries(zoo_name)
        say("its MLP transcoders and attention SAEs ...")
        handle, transcoders, attention = zoo.handle, *zoo_local_set(zoo)
    else:
        if dictionary_set is None:
            raise UserError("--model needs --dictionaries DIR (its MLP transcoders, and attention SAEs if any)")
        handle, dicts = checkpoint_and_dictionaries(model_name, device, dtype, dictionary_set, dictionary_spec, False,
                                                    prompts)
        by = {(d.site.component, d.site.layer): d for d in dicts.values()}
        n = handle.model.cfg.n_layers
        zoo = None
        transcoders = {i: by[("mlp", i)] for i in range(n) if ("mlp", i) in by}
        attention = {i: by[("attn", i)] for i in range(n) if ("attn", i) in by}
    if attention_mode == "saes" and not attention:
        raise UserError("--attention saes: the dictionary set has no attention SAEs (--attention frozen makes "
                        "attention a frozen path)")
    return handle, zoo, transcoders, {} if attention_mode == "frozen" else attention


def attention_of(attention: dict) -> str:
    """How a local circuit treats attention, as a run's params record it: as the nodes of its SAEs, or
    (none given) as a frozen path."""
    return "saes" if attention else "frozen"


def parse_root(rep: Replacement, spec: str | None) -> tuple[Target, str]:
    """A graph's root from its spec, and the metric it names: none (the model's top next token),
    'logit:TOKEN', 'diff:TOKEN:OTHER' (logit(TOKEN) - logit(OTHER)) at the last position, or a
    feature 'SITE/FEATURE@POSITION' such as mlp_1/12@4 (FEATURE 'top': the site's strongest feature there)."""
    model = rep.model
    if spec is None:
        return logit_target(rep, int(rep.logits[0, -1].argmax())), "logit"
    kind, _, rest = spec.partition(":")
    if kind == "logit" and rest:
        return logit_target(rep, _token(model, rest)), "logit"
    if kind == "diff" and rest.count(":") == 1:
        a, b = (_token(model, t) for t in rest.split(":"))
        if a == b:
            raise UserError(f"target {spec!r}: a logit difference needs two different tokens")
        return logit_target(rep, a, minus=b), "logit_diff"
    where, slash, what = spec.partition("/")
    feature, at, position = what.partition("@")
    if slash and at and (feature.isdigit() or feature == "top") and position.lstrip("-").isdigit():
        if feature == "top":  # the feature with the largest value there (none firing: refused below)
            at_position = feature_target(rep, where, 0, int(position))
            feature = str(int(rep.values[at_position.site][at_position.position].argmax()))
        t = feature_target(rep, where, int(feature), int(position))
        if rep.values[t.site][t.position, t.feature] == 0:
            here = rep.values[t.site][t.position]
            firing = ", ".join(str(i) for i in here.nonzero()[:, 0][here[here != 0].argsort(descending=True)][:8].tolist())
            raise UserError(f"{t.site}/{t.feature} does not fire at position {t.position}; "
                            f"features of {t.site} that do: {firing or 'none'}")
        return t, "feature"
    raise UserError(f"target {spec!r}: give logit:TOKEN, diff:TOKEN:OTHER or SITE/FEATURE@POSITION (e.g. mlp_1/12@4, "
                    "or mlp_1/top@4 for the site's strongest feature there)")


def _token(model, text: str) -> int:
    """The one token a target names; a text of several tokens or an unknown word is refused."""
    ids = tokenize(model, text, bos=False)
    if len(ids) != 1:
        raise UserError(f"{text!r} is {len(ids)} tokens for this model's tokenizer, not one")
    if ids[0] == unknown_token(model):
        raise UserError(f"{text!r} is a word this model's tokenizer does not know")
    return ids[0]


def check_prompt(model, prompt: str) -> None:
    """Refuse a prompt the model cannot read as given (`prompt_problem` says why)."""
    problem = prompt_problem(model, prompt)
    if problem is not None:
        raise UserError(f"the prompt {problem[1]}")


def prompt_problem(model, prompt: str) -> tuple[str, str] | None:
    """Why the model cannot read a prompt as given, as (reason, what exactly): empty, longer than its
    context, or with words its tokenizer does not know (they would become the unknown token); None
    when it can."""
    if not prompt.strip():
        return "empty", "is empty"
    ids = tokenize(model, prompt)
    if len(ids) > model.cfg.n_ctx:
        return "longer than the model's context", f"is {len(ids)} tokens; the model reads at most {model.cfg.n_ctx}"
    unk = unknown_token(model)
    if unk is not None and unk in ids[1:]:
        words = [w for w in prompt.split() if tokenize(model, w, bos=False) == [unk]]
        return "words the tokenizer does not know", f"has words this model's tokenizer does not know: {', '.join(words)}"
    return None


def prompt_task(prompt: str, answer: str) -> Task:
    """A prompt as a task of one example (its name is a hash of the prompt), with the model's answer."""
    name = "prompt-" + hashlib.sha256(prompt.encode()).hexdigest()[:12]
    return Task(name, [{"clean_prefix": prompt, "clean_answer": answer}], "prompt", prompt)


def prompt_job(cat: Catalog, handle: ModelHandle, transcoders: dict, attention: dict, prompt: str,
               target: str | None, params: GraphParams, progress: bool = True) -> tuple[str, PromptGraph]:
    """One prompt's attribution graph, committed as one run (a circuit of one example)."""
    model = handle.model
    check_prompt(model, prompt)
    rep = Replacement(model, transcoders, attention, model.to_tokens(prompt))
    task = prompt_task(prompt, model.to_string(rep.logits[0, -1].argmax().reshape(1)))
    root, metric = parse_root(rep, target)
    cat.check_task(task.name, task.content_hash)
    row = run_row("attribute", {**asdict(params), "prompt": prompt, "target": target, "attention": attention_of(attention)})
    with run(cat, row) as w:
        g = prompt_graph(rep, root, params, progress)
        circuit_id = new_id("circuit")
        dicts = site_dictionaries(transcoders, attention)
        write_model_and_dictionaries(w, handle, dicts)
        write_task(w, handle, task)
        _write_activations(w, task.name, 0, rep, dicts)
        _write_graph(w, circuit_id, row["run_id"], handle, task, merge_graphs([g], params), metric, params, dicts)
    return circuit_id, g


def steer_job(cat: Catalog, handle: ModelHandle, transcoders: dict, attention: dict, prompt: str, target: str | None,
              given: list[tuple[str, str]]):
    """Interventions (mode, SITE/FEATURE@POSITION[=VALUE]) on a prompt, measured in the real model beside
    the graph's predictions, and committed as a run of kind steer (its params hold every number)."""
    from compute.local.steering import parse_intervention, steer

    model = handle.model
    check_prompt(model, prompt)
    rep = Replacement(model, transcoders, attention, model.to_tokens(prompt))
    root, _ = parse_root(rep, target)
    interventions = [parse_intervention(rep, mode, spec) for mode, spec in given]
    result = steer(rep, root, interventions)
    tokens = [model.to_string([t]) for t in (root.feature, root.minus) if t is not None]
    row = run_row("steer", {"prompt": prompt, "model_id": handle.model_id, "target": target, "root": " - ".join(tokens),
                            "attention": attention_of(attention),
                            "before": result.before, "after": result.after, "predicted": result.predicted_joint,
                            "interventions": result.rows,
                            "dictionaries": sorted({rep.dicts[iv.site].dictionary_id for iv in interventions})})
    with run(cat, row):
        pass  # the run's row is the record
    return row["run_id"], result


def task_job(cat: Catalog, handle: ModelHandle, transcoders: dict, attention: dict, task: Task, n_examples: int,
               params: GraphParams, progress: bool = True) -> tuple[str, list[PromptGraph]]:
    """A task's local circuit: each usable train example's graph of logit(clean answer) -
    logit(patch answer) on its clean prompt, and their mean (node influences and edge weights),
    one run. Examples are read as discovery reads them (`encode`: what cannot be used is dropped
    and counted)."""
    from tqdm.auto import tqdm

    model = handle.model
    cat.check_task(task.name, task.content_hash)
    if not task.has_patch:
        raise UserError(f"task {task.name}: a local circuit needs examples with patch answers")
    data = encode(model, task, "train", n_examples)
    require_usable_examples(task, data)
    row = run_row("attribute", {**asdict(params), "task": task.name, "n_examples": data.n_examples,
                                "dropped": data.dropped, "attention": attention_of(attention)})
    examples = [(int(b.example_idx[i]), b.clean[i], int(b.clean_answer[i]), int(b.patch_answer[i]))
                for b in data.batches for i in range(len(b))]
    graphs = []
    with run(cat, row) as w:
        dicts = site_dictionaries(transcoders, attention)
        for idx, tokens, answer, other in tqdm(examples, desc=f"{task.name}: prompts", unit="prompt",
                                               disable=hidden(progress)):
            rep = Replacement(model, transcoders, attention, tokens)
            graphs.append(prompt_graph(rep, logit_target(rep, answer, minus=other), params))
            _write_activations(w, task.name, idx, rep, dicts)
        circuit_id = new_id("circuit")
        write_model_and_dictionaries(w, handle, dicts)
        write_task(w, handle, task)
        _write_graph(w, circuit_id, row["run_id"], handle, task, merge_graphs(graphs, params), "answer_logit_diff",
                     params, dicts,
                     sum(data.dropped.values()))
    return circuit_id, graphs


def inputs_of_root(g: PromptGraph) -> list[dict]:
    """What feeds a graph's root, strongest direct contribution first: each kept node with its token,
    its direct contribution, its influence, and the head that moves most of it (`explain`'s table)."""
    rep = g.rep
    into = {src: w for src, dst, w in g.edges if dst == g.root_node}
    heads: dict[int, list] = {}
    for src, dst, head, w in g.ov:
        if dst == g.root_node:
            heads.setdefault(src, []).append((abs(w), head, w))
    layer, tokens = g.root.component_layer[1], rep.model.to_str_tokens(rep.tokens[0])
    rows = [{"node": node_label(rep, i), "token": tokens[rep.nodes[i].position], "direct": into.get(i, 0.0),
             "influence": float(g.influence[i]),
             "top_head": (f"{layer}.{max(heads[i])[1]} ({max(heads[i])[2]:+.3f})" if i in heads else "")}
            for i in g.kept]
    return sorted(rows, key=lambda r: -abs(r["direct"]))


def score_parts(g: PromptGraph, top: int = 3) -> list[tuple[str, str, str]]:
    """Each decomposed attention score of a graph: (the head's move and score, its strongest query-side
    parts, its strongest key-side parts), as `explain` prints them."""
    rep = g.rep

    def label(n) -> str:
        return "bias" if n.site == "bias" else node_label(rep, rep.index[n])

    def strongest(nodes, marginals) -> str:
        ranked = sorted(zip(nodes, marginals.tolist(), strict=True), key=lambda t: -abs(t[1]))[:top]
        return ", ".join(f"{label(n)} {m:+.3f}" for n, m in ranked)

    return [(f"head {q.layer}.{q.head} attends from {q.query} to {q.key}: score {q.score:+.3f}",
             strongest(q.query_nodes, q.query_marginals), strongest(q.key_nodes, q.key_marginals)) for _, q in g.qk]


def site_dictionaries(transcoders: dict, attention: dict) -> dict[str, TrainedDictionary]:
    """A local model's dictionaries by site name (attn_0, mlp_0, ...)."""
    return {d.site.name: d for d in [*attention.values(), *transcoders.values()]}


def _write_activations(w: RunWriter, task_id: str, example_idx: int, rep: Replacement, dicts: dict) -> None:
    """The prompt's nonzero feature values (what `features` dashboards and 'why does it fire' read)."""
    table = w.table("activations")
    for name, act in rep.active.items():
        write_activation_values(table, task_id, dicts[name].dictionary_id, example_idx, act[:, 1], act[:, 0],
                                rep.values[name][act[:, 0], act[:, 1]])


def _write_graph(w: RunWriter, circuit_id: str, run_id: str, handle: ModelHandle, task: Task, graph: MergedGraph,
                 metric: str, params: GraphParams, dicts: dict, n_dropped: int = 0) -> None:
    """A merged graph's nodes, its edges (streamed in batches) and the circuit's row."""
    _write_nodes(w, circuit_id, graph, dicts, handle.model.cfg.n_layers)
    table = w.table("edges")
    for i in range(0, len(graph.edges), EDGE_ROWS):
        table.write([{"circuit_id": circuit_id, **r} for r in graph.edges[i:i + EDGE_ROWS]])
    w.write("circuits", [graph_circuit_row(circuit_id, run_id, handle.model_id, task.name, graph, metric, params,
                                           n_dropped)])


def graph_circuit_row(circuit_id: str, run_id: str, model_id: str, task_id: str, graph: MergedGraph, metric: str,
                      params: GraphParams, n_dropped: int = 0) -> dict:
    """The `circuits` row of a local circuit."""
    return circuit_row(
        circuit_id, run_id, model_id, task_id, METHOD, aggregation="none" if graph.positions else "sum",
        metric=metric, node_threshold=params.threshold, n_examples=graph.n_prompts, n_dropped=n_dropped,
        metric_clean=graph.effect[graph.root_key], n_nodes=len(graph.in_circuit), n_edges=graph.n_edges,
        evaluation_note="a local circuit is not ablated: its edges are exact direct contributions in the "
                        "replacement model")


def _write_nodes(w: RunWriter, circuit_id: str, graph: MergedGraph, dicts: dict, n_layers: int) -> None:
    w.write("nodes", node_rows(circuit_id, graph, dicts, n_layers))


def node_rows(circuit_id: str, graph: MergedGraph, dicts: dict, n_layers: int) -> list[dict]:
    """A merged graph's `nodes` rows, the root first (a logit's root is the metric node)."""
    rows = []
    for i, (name, feature, position) in enumerate(graph.keys):
        if name == "root":
            row = {"component": METRIC, "layer": n_layers, "is_error": False}
        elif name == EMBED:  # feature: the token (NULL for a position's embeddings across prompts)
            row = {"component": "embed", "layer": -1, "hook_name": block_input(0), "feature_idx": feature,
                   "is_error": False}
        else:
            d = dicts[name]
            row = {"component": d.site.component, "layer": d.site.layer, "hook_name": d.site.hook_out,
                   "dictionary_id": d.dictionary_id, "feature_idx": None if feature == ERROR else feature,
                   "is_error": feature == ERROR}
        rows.append({**row, "circuit_id": circuit_id, "node_idx": i, "position": position,
                     "effect": graph.effect.get((name, feature, position), 0.0),
                     "in_circuit": (name, feature, position) in graph.in_circuit})
    return rows


class PromptGrapher:
    """New prompts' graphs for a running explorer: the model and its dictionaries loaded once (in the
    background from `start`), one graph computed at a time, each committed as `attribute --prompt`
    commits it. `load` returns what `local_model` does."""

    def __init__(self, load, params: GraphParams | None = None):
        import threading

        self._load, self.params = load, params or GraphParams()
        self._loaded: tuple | None = None
        self._error: Exception | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()

    def start(self) -> None:
        import threading

        threading.Thread(target=self._loading, daemon=True, name="prompt-grapher").start()

    def _loading(self) -> None:
        try:
            self._loaded = self._load()
        except Exception as e:  # said when a graph is asked for
            self._error = e
        finally:
            self._done.set()

    def __call__(self, cat: Catalog, prompt: str, target: str | None) -> str:
        """Commit the prompt's graph (waiting for the model on the first call); its circuit id."""
        if not self._done.wait(timeout=600):
            raise UserError("the model is still loading; try again in a moment")
        if self._error is not None:
            raise UserError(f"the model could not be loaded: {first_line(self._error)}")
        handle, _, transcoders, attention = self._loaded
        with self._lock:
            circuit_id, _ = prompt_job(cat, handle, transcoders, attention, prompt, target, self.params, progress=False)
        return circuit_id
