"""The decomposition job: parameter-space features of a toy or the zoo, registered as a dictionary of
kind `parameter` with their per-example curvatures as activations.

Each direction is a feature: `features` holds its density and largest curvature, `activations` its
curvature on each example (and token) it was evaluated on, so `cli.py feature` shows its top
examples. For zoo tasks, each task also gets a circuit (method `curvature`) whose nodes are the
directions with their mean curvature at the answer position, so `compare` and `diff` set the
directions two tasks use side by side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from catalog.errors import UserError
from catalog.progress import hidden
from catalog.store import Catalog, new_id
from compute.cache import cache_path, cached_dir, config_hash, pinned
from compute.jobs.lifecycle import run, run_row
from compute.jobs.rows import circuit_row, write_activation_values
from compute.parameters.decomposition import DecompositionConfig
from compute.parameters.storage import ParameterDictionary, load
from compute.tasks import Task

MODELS = ("xor", "tms", "zoo")
DEFAULT_PARAMS = {"xor": ("W", "b"), "tms": ("W",), "zoo": ("blocks.0.attn.W_K[0]",)}
# Per model: the seed's three XOR directions, one per TMS feature; the zoo's steps are fewer and batched
# (a step there costs a forward-mode pass of the transformer per direction).
DEFAULT_CONFIGS = {"xor": DecompositionConfig(n_features=3), "tms": DecompositionConfig(n_features=5),
                   "zoo": DecompositionConfig(n_features=8, steps=300, restarts=1, batch_size=32)}
FIRES = 0.1  # a direction "fires" on a sample whose curvature is at least this fraction of its largest


@dataclass(frozen=True)
class DecomposeSpec:
    """One decomposition: the model, the parameters, the settings and the data it trains on."""

    model: str  # xor, tms or zoo
    params: tuple[str, ...] = ()  # default: DEFAULT_PARAMS[model]
    config: DecompositionConfig | None = None  # default: DEFAULT_CONFIGS[model]
    zoo: str = "default"  # which zoo, for model 'zoo'
    n_train: int = 128  # zoo: corpus sentences trained on (toys: their own training inputs)

    def resolved(self) -> DecomposeSpec:
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        return DecomposeSpec(self.model, tuple(self.params) or DEFAULT_PARAMS[self.model],
                             self.config or DEFAULT_CONFIGS[self.model], self.zoo, self.n_train)


TRAIN_CORPUS_SEED = 5  # the zoo's decompositions train on grammar sentences the dashboards (seed 3) do not show


def _model_and_target(spec: DecomposeSpec):
    """(the zoo or toy, the target over the spec's parameters, the model's row) of a spec."""
    from compute.parameters.targets import lm_target, toy_target

    if spec.model == "zoo":
        from compute.models.zoo import build_zoo, zoo_config

        zoo = build_zoo(zoo_config(spec.zoo))
        return zoo, lm_target(zoo.model, spec.params), zoo.handle.row()
    from compute.parameters.toys import build_toy

    toy = build_toy(spec.model)
    return toy, toy_target(toy, spec.params), toy.row()


def _training_data(spec: DecomposeSpec, subject) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, mask of the positions that count) a decomposition trains on."""
    if spec.model == "zoo":
        from compute.models import grammar

        model = subject.model
        toks = model.to_tokens(grammar.corpus(spec.n_train, TRAIN_CORPUS_SEED), padding_side="right")
        return toks, trained_positions(model, toks, True)
    return subject.training_inputs(), None


def trained_positions(model, toks: torch.Tensor, whole_sentences: bool) -> torch.Tensor:
    """Positions whose next-token prediction the model was trained on: not padding, and for whole
    sentences not the last token (the zoo never learnt what follows a sentence, so its prediction
    there is arbitrary and would dominate every direction's curvature)."""
    real = toks != model.tokenizer.pad_token_id
    if whole_sentences:
        real = real & torch.nn.functional.pad(real[:, 1:], (0, 1), value=False)
    return real


def _build(folder: Path, spec: DecomposeSpec) -> None:
    """Decompose and save (runs pinned, in a build process: see compute.cache)."""
    from compute.parameters.decomposition import decompose
    from compute.parameters.storage import save

    subject, target, model_row = _model_and_target(spec)
    inputs, mask = _training_data(spec, subject)
    d = decompose(target, inputs, spec.config, mask, progress=True)
    save(folder, d.directions, target.w0, {
        "model": spec.model, "model_id": model_row["model_id"], "parameters": target.layout(),
        "divergence": target.divergence, "decomposition": asdict(spec.config),
        "data": {"model": spec.model, "n_inputs": len(inputs), **({"corpus_sentences": spec.n_train,
                                                                   "corpus_seed": TRAIN_CORPUS_SEED}
                                                                  if spec.model == "zoo" else {})},
        "high": d.high, "interference": d.interference, "restart": d.restart, "losses": d.losses})


def _key(spec: DecomposeSpec) -> str:
    """A spec's cache key: its settings and the model (the zoo's id, or the toy's configuration). Names
    that are not the model's parameters are refused here, before any work."""
    from compute.parameters.targets import make_target
    from compute.parameters.toys import blank_params, toy_key

    if spec.model == "zoo":
        subject, target, _ = _model_and_target(spec)
        model = subject.model_id
    else:  # a toy is not trained just to check names: its parameters' shapes are enough
        target = make_target(blank_params(spec.model), spec.params, lambda p, x: x, "mse")
        model = toy_key(spec.model)
    n_params = target.w0.numel()
    if spec.config.n_features > n_params:  # eigen-directions of a P-dimensional space: at most P
        raise UserError(f"--features {spec.config.n_features}: at most {n_params}, the number of parameters "
                        "decomposed")
    return f"{spec.model}-{config_hash({'spec': asdict(spec), 'model': model, 'version': 3})}"


def _build_missing(items: list[tuple[str, DecomposeSpec]]) -> None:
    for key, spec in items:
        cached_dir("decompositions", key, _build, spec)


def build_decompositions(specs: list[DecomposeSpec]) -> list[ParameterDictionary]:
    """The decompositions of these specs, each computed once on the pinned kernels (the missing ones
    in one build process) and cached by its settings and model."""
    specs = [s.resolved() for s in specs]
    keys = [_key(s) for s in specs]
    missing = [(k, s) for k, s in zip(keys, specs, strict=True) if not cache_path("decompositions", k).exists()]
    if missing:
        pinned(_build_missing, missing)
    return [load(cache_path("decompositions", k)) for k in keys]


N_EVAL = 300  # zoo: dashboard-corpus sentences each direction's curvature is stored for
TASK_EXAMPLES = 64  # zoo: train examples per task


def toy_task(toy, inputs: torch.Tensor) -> Task:
    """A toy's inputs as a task of plain examples (the prompt is the input vector, e.g. '(1, 0)')."""
    texts = ["(" + ", ".join(f"{v:g}" if v in (0.0, 1.0) else f"{v:.2f}" for v in x.tolist()) + ")" for x in inputs]
    return Task(name=f"{toy.name}-inputs", source=f"{toy.name} toy ({toy.path.name})",
                description=f"inputs of the {toy.name} toy model",
                examples=[{"clean_prefix": t, "clean_answer": "", "split": "corpus"} for t in texts])


def _write_curvatures(table, task_id: str, dictionary_id: str, c: torch.Tensor, example_idx: torch.Tensor) -> None:
    """Curvatures c [N, T, K] of these examples as activations (position t; only values > 0)."""
    n, t, k = c.nonzero(as_tuple=True)
    keep = c[n, t, k] > 0
    n, t, k = n[keep], t[keep], k[keep]
    write_activation_values(table, task_id, dictionary_id, example_idx[n], k, t, c[n, t, k])


def _lm_curvature(model, target, prompts: list[str], directions: torch.Tensor, whole_sentences: bool,
                  batch: int = 64) -> torch.Tensor:
    """Curvature of every token of each prompt [N, T, K] (0 where the prediction is untrained), in batches."""
    out = []
    for i in range(0, len(prompts), batch):
        toks = model.to_tokens(prompts[i: i + batch], padding_side="right")
        with torch.no_grad():
            c = target.curvature(toks, directions) * trained_positions(model, toks, whole_sentences)[..., None]
        out.append(torch.nn.functional.pad(c, (0, 0, 0, model.cfg.n_ctx - c.shape[1])))
    return torch.cat(out)


def decomposition_job(cat: Catalog, spec: DecomposeSpec, tasks: list[Task] = (), node_threshold: float | None = None,
                      progress: bool = True) -> tuple[str, ParameterDictionary, list[str]]:
    """Decompose (or take the cached decomposition), then commit as one run: the model, the dictionary
    of kind `parameter` with its features and their curvature on the evaluation examples, and for
    each zoo task a circuit of the directions' mean curvature at the answer position. Returns
    (run_id, the decomposition, circuit ids)."""
    from compute.jobs.rows import write_task

    spec = spec.resolved()
    if tasks and spec.model != "zoo":
        raise UserError("tasks need a language model: use --model zoo")
    for task in tasks:
        cat.check_task(task.name, task.content_hash)
    pd_ = build_decompositions([spec])[0]
    subject, target, model_row = _model_and_target(spec)
    u = pd_.directions.to(target.w0.dtype)
    dict_id = pd_.dictionary_id
    row = run_row("decompose", {"model": spec.model, "params": list(spec.params), "zoo": spec.zoo,
                                "n_train": spec.n_train, "decomposition": asdict(spec.config),
                                "tasks": [t.name for t in tasks], "node_threshold": node_threshold})
    if spec.model == "zoo":
        from compute.dictionaries.dashboards import corpus_task

        evaluation = corpus_task()
    else:
        inputs = subject.examples()
        evaluation = toy_task(subject, inputs)
    cat.check_task(evaluation.name, evaluation.content_hash)
    circuit_ids = []
    with run(cat, row) as writer:
        writer.write("models", [model_row])
        if spec.model == "zoo":
            prompts = [e["clean_prefix"] for e in evaluation.examples[:N_EVAL]]
            c = _lm_curvature(subject.model, target, prompts, u, whole_sentences=True)
            write_task(writer, subject.handle, evaluation)
        else:
            with torch.no_grad():
                c = target.curvature(inputs, u)[:, None, :]  # one "token" per input
            c = torch.nn.functional.pad(c, (0, 0, 1, 0))  # the input at position 1, as after a BOS
            write_task(writer, None, evaluation, tokens=lambda text: ["<input>", text])
        flat = c.reshape(-1, c.shape[-1])
        largest = flat.max(0).values
        writer.write("dictionaries", [_dictionary_row(pd_, spec, model_row["model_id"], target)])
        writer.write("features", [{"dictionary_id": dict_id, "feature_idx": k, "max_activation": float(largest[k]),
                                   "density": float(((flat[:, k] >= FIRES * largest[k]) & (flat[:, k] > 0)).sum()
                                                    / max(int((c.sum(-1) != 0).sum()), 1))}
                                  for k in range(u.shape[0])])
        acts = writer.table("activations")
        _write_curvatures(acts, evaluation.name, dict_id, c, torch.arange(len(c)))
        effects = {}
        for task in tqdm(tasks, desc="tasks", unit="task", disable=hidden(progress and bool(tasks))):
            chosen = task.split("train")[:TASK_EXAMPLES]
            if not chosen:
                raise UserError(f"task {task.name} has no train examples")
            idx = torch.tensor([i for i, _ in chosen])
            prompts = [e["clean_prefix"] for _, e in chosen]
            c = _lm_curvature(subject.model, target, prompts, u, whole_sentences=False)
            last = torch.tensor([len(subject.model.to_tokens(p)[0]) - 1 for p in prompts])
            effects[task.name] = (c[torch.arange(len(c)), last].mean(0), len(chosen))
            write_task(writer, subject.handle, task)
            _write_curvatures(acts, task.name, dict_id, c, idx)
        if effects:
            threshold = (FIRES * max(float(e.max()) for e, _ in effects.values()) if node_threshold is None
                         else node_threshold)
            for name, (effect, n) in effects.items():
                circuit_ids.append(_write_curvature_circuit(writer, row["run_id"], model_row["model_id"], name,
                                                            dict_id, pd_, effect, n, threshold))
    return row["run_id"], pd_, circuit_ids


def site_of(params: list[str]) -> tuple[str, int]:
    """(component, layer) of the decomposed parameters: attn/mlp and the block when they all lie in
    one block's attention or MLP, embed for the embeddings, else params (layer -1)."""
    import re

    found = set()
    for p in params:
        m = re.match(r"blocks\.(\d+)\.(attn|mlp)\.", p)
        found.add((m[2], int(m[1])) if m else ("embed", -1) if p.startswith(("embed.", "pos_embed.")) else ("params", -1))
    return found.pop() if len(found) == 1 else ("params", -1)


def _dictionary_row(pd_: ParameterDictionary, spec: DecomposeSpec, model_id: str, target) -> dict:
    component, layer = site_of(pd_.params)
    return {"dictionary_id": pd_.dictionary_id, "model_id": model_id, "hook_name": ",".join(pd_.params),
            "hook_name_out": None, "component": component, "layer": layer, "kind": "parameter",
            "architecture": "hessian", "d_in": int(target.w0.numel()), "d_sae": int(pd_.directions.shape[0]),
            "path": str(pd_.path), "metrics": {"divergence": pd_.cfg["divergence"], "high": pd_.cfg["high"],
                                               "interference": pd_.cfg["interference"]}}


def _write_curvature_circuit(writer, run_id: str, model_id: str, task_id: str, dict_id: str,
                             pd_: ParameterDictionary, effect: torch.Tensor, n_examples: int, threshold: float) -> str:
    """A task's circuit over parameter features: one node per direction, its mean curvature at the answer
    position as the effect, in the circuit above the threshold."""
    component, layer = site_of(pd_.params)
    circuit_id = new_id("circuit")
    writer.write("nodes", [{"circuit_id": circuit_id, "node_idx": k, "component": component, "layer": layer,
                            "hook_name": ",".join(pd_.params), "dictionary_id": dict_id, "feature_idx": k,
                            "is_error": False, "position": None, "effect": float(e), "in_circuit": float(e) > threshold}
                           for k, e in enumerate(effect.tolist())])
    writer.write("circuits", [circuit_row(
        circuit_id, run_id, model_id, task_id, "curvature", aggregation="last", metric="kl", node_threshold=threshold,
        n_examples=n_examples, n_dropped=0, n_nodes=int((effect > threshold).sum()), n_edges=0,
        evaluation_note="parameter features: directions in weight space are not ablated, so there is no "
                        "faithfulness curve")])
    return circuit_id


CHECKS = {"xor": "three directions whose top inputs are three different non-zero inputs",
          "tms": "on the one-hot inputs, each of the five features is the top input of exactly one direction"}
PUBLISHED = {"APD": (0.998, 0.893), "SPD": (1.000, 0.993)}  # TMS 5-2 (MMCS, ML2R), as their papers report


def top_inputs_hold(toy: str, top: list[int]) -> bool:
    """The seed's check on each direction's top input (indices into XOR's inputs (0,0), (0,1), (1,0), (1,1),
    or into TMS's one-hot inputs)."""
    if toy == "xor":
        return len(top) == 3 and len(set(top)) == 3 and 0 not in top
    return sorted(top) == list(range(len(top)))


def parameter_benchmark_job(cat: Catalog, progress: bool = True) -> tuple[str, list[dict]]:
    """Decompose XOR and TMS with their default settings (each registered by a decomposition run),
    check what seed 002 reports, score TMS against its true components, and commit the rows of
    `parameter_benchmarks` as one run. Each returned row also holds the inputs checked and their
    curvature along each direction ([inputs][directions]), for the picture."""
    from compute.parameters.toys import component_scores, true_components

    results = []
    build_decompositions([DecomposeSpec("xor"), DecomposeSpec("tms")])  # one build process for both
    for name in ("xor", "tms"):
        spec = DecomposeSpec(name).resolved()
        _, pd_, _ = decomposition_job(cat, spec, progress=progress)
        toy, target, _ = _model_and_target(spec)
        shown = toy.examples()[: 4 if name == "xor" else toy.config.n_features]  # XOR's inputs; TMS's one-hots
        with torch.no_grad():
            c = target.curvature(shown, pd_.directions.to(target.w0.dtype))  # [inputs, K]
        top = c.argmax(0).tolist()
        texts = toy_task(toy, shown).examples
        scores = ({"mmcs": None, "ml2r": None} if name == "xor" else
                  component_scores(pd_.directions.to(target.w0.dtype), target.w0, true_components(toy)))
        passed = top_inputs_hold(name, top)
        results.append({"toy": name, "dictionary_id": pd_.dictionary_id, "n_features": len(top),
                        "n_parameters": int(target.w0.numel()), "check": CHECKS[name], "passed": passed,
                        "top_inputs": [texts[i]["clean_prefix"] for i in top], **scores,
                        "high": pd_.cfg["high"], "interference": pd_.cfg["interference"],
                        "inputs": [e["clean_prefix"] for e in texts], "curvature": c.tolist()})
    row = run_row("benchmark", {"benchmark": "parameters"})
    with run(cat, row) as writer:
        writer.write("parameter_benchmarks", [{**{k: v for k, v in r.items() if k not in ("inputs", "curvature")},
                                               "run_id": row["run_id"]} for r in results])
    return row["run_id"], results
