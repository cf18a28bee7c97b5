"""Planted-circuit models: transformers whose circuit for a task is known by construction.

Both models solve one task, `sva_planted`: after "the cat near the dogs" the verb agrees with the
subject ("is"), not with the attractor; the patch prompt gives the subject the other number (and
perhaps the other animal). Two models:

- `handset`: every weight set by hand (no LayerNorm, ReLU MLPs, 18 named residual dimensions, one
  per signal; see `DIMS`). Two paths carry the subject's number to the verb. Head 0.0 moves it to
  the last position and MLP 1 turns it into the answer direction. Head 0.2 moves it too, for head
  1.2's query: head 1.2 attends to the subject when it is plural and to BOS when it is singular, with
  a saturated pattern, and what it reads there says which (the "gated" dimension, read as is/are).
  That head's pattern flips between clean and patch prompts while its gradient at either is nearly 0:
  the case where a first-order estimate (AtP) fails. Head 0.1 attends to the same subject but copies
  which animal it is; MLP 0 computes the animal's kind; heads 1.0 and 1.1 and a third MLP-1 neuron
  pass those on. They change between clean and patch prompts but never reach the verb's logits.
  Because every signal has its own dimension, the circuit is known down to its neurons (nodes of
  the identity dictionaries) and edges.
- `siit`: a trained transformer (LayerNorm, GELU) whose circuit is imposed by strict interchange
  intervention training (`compute.groundtruth.siit`, the InterpBench recipe): attn_0 at the last
  position must carry the subject's number, mlp_1 there the answer, and mlp_0 and attn_1 must not
  matter. Its circuit is known at the level of components (whole submodules), not neurons.

Each model is saved like the zoo (`compute.models.zoo.save_model`) and built, cached and loaded by
`compute.groundtruth.build`, so jobs take its handle as they take the zoo's; its truth is a `Truth`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compute.tasks import Task

TASK = "sva_planted"
NOUNS = {"cat": (-1, "cat"), "cats": (1, "cat"), "dog": (-1, "dog"), "dogs": (1, "dog")}  # number, animal
PREPOSITIONS = ("near", "by")
VOCABULARY = ["the", *PREPOSITIONS, *NOUNS, "is", "are"]
N_CTX = 6  # <bos> the N near the N
SUBJECT, LAST = 2, 5  # token positions of the subject and of the prediction
MODELS = ("handset", "siit")


@dataclass(frozen=True)
class Component:
    """A head or an MLP of a planted model, and whether the task's circuit runs through it."""

    name: str  # "attn_0 head 0", "mlp_1", "attn_1"
    site: str  # the submodule whose output it writes (a site name)
    in_circuit: bool
    role: str  # what it carries
    features: tuple[int, ...] | None = None  # its neurons at the site (identity dictionary); None: all


@dataclass(frozen=True)
class Truth:
    """What a planted model's circuit is: its components, and where defined its nodes and edges over
    neurons (identity dictionaries), keyed (site name, neuron); an edge's destination may be
    ("metric", 0)."""

    components: tuple[Component, ...]
    nodes: frozenset[tuple[str, int]] | None = None
    edges: frozenset[tuple[tuple[str, int], tuple[str, int]]] | None = None
    circuit_sites: tuple[str, ...] = ()  # where nodes are undefined: every neuron of these sites is in the circuit
    neuron_names: dict[int, str] = field(default_factory=dict)  # what each neuron (residual dimension) carries

    def circuit_nodes(self, widths: dict[str, int]) -> set[tuple[str, int]]:
        """The planted circuit's nodes over neurons (all neurons of `circuit_sites` when nodes are undefined)."""
        if self.nodes is not None:
            return set(self.nodes)
        return {(s, i) for s in self.circuit_sites for i in range(widths[s])}


def task_examples(seed: int = 0) -> list[dict]:
    """Every prompt of the task, each paired with a patch prompt whose subject has the other number
    (the animal drawn at random), all in the train split."""
    rng = torch.Generator().manual_seed(seed)
    rows = []
    for subject, prep, attractor in itertools.product(NOUNS, PREPOSITIONS, NOUNS):
        number = NOUNS[subject][0]
        other = [n for n, (num, _) in NOUNS.items() if num != number]
        patch = other[int(torch.randint(len(other), (1,), generator=rng))]
        answer = lambda num: "are" if num > 0 else "is"  # noqa: E731
        rows.append({"clean_prefix": f"the {subject} {prep} the {attractor}", "clean_answer": answer(number),
                     "patch_prefix": f"the {patch} {prep} the {attractor}", "patch_answer": answer(-number),
                     "case": f"{'plural' if number > 0 else 'singular'} subject", "split": "train"})
    return rows


def planted_task() -> Task:
    return Task(TASK, task_examples(), source="planted models",
                description="subject-verb agreement across a prepositional phrase, in models whose circuit is "
                            "planted (compute/groundtruth/planted.py)")


def prompts() -> list[str]:
    """The task's distinct prompts (what the planted models' identity dictionaries are measured on)."""
    return sorted({e[k] for e in task_examples() for k in ("clean_prefix", "patch_prefix")})


# ---- the hand-set model ----------------------------------------------------------------------------

# The hand-set model's residual dimensions, one per signal.
DIMS = {"number": 0, "cat": 1, "dog": 2, **{f"pos{p}": 3 + p for p in range(N_CTX)}, "subject number": 9,
        "misc": 10, "kind": 11, "answer": 12, "copied cat": 13, "copied dog": 14, "echo": 15, "gate number": 16,
        "gated": 17}
SHARP = 40.0  # query-key product of a head's one attended position: attention there is 1 - 5e-9
GAIN = 2.0  # logit(are) - logit(is) = 2 GAIN x (the answer dimension + the gated dimension)
GATE = 9.0  # head 1.2's query-key product: attention 0.9995 on its chosen position, a derivative of 0.005 there


def handset_truth() -> Truth:
    d = DIMS
    number, subj, answer = d["number"], d["subject number"], d["answer"]
    gate, gated = d["gate number"], d["gated"]
    nodes = {("embed", number), ("attn_0", subj), ("resid_0", subj), ("mlp_1", answer), ("resid_1", answer),
             ("attn_0", gate), ("resid_0", gate), ("attn_1", gated), ("resid_1", gated)}
    edges = {(("embed", number), ("attn_0", subj)), (("attn_0", subj), ("resid_0", subj)),
             (("resid_0", subj), ("mlp_1", answer)), (("mlp_1", answer), ("resid_1", answer)),
             (("resid_1", answer), ("metric", 0)),
             (("embed", number), ("attn_0", gate)), (("attn_0", gate), ("resid_0", gate)),
             (("resid_0", gate), ("attn_1", gated)), (("attn_1", gated), ("resid_1", gated)),
             (("resid_1", gated), ("metric", 0))}
    components = (
        Component("attn_0 head 0", "attn_0", True, "moves the subject's number to the last position", (subj,)),
        Component("attn_0 head 1", "attn_0", False, "copies which animal the subject is",
                  (d["copied cat"], d["copied dog"])),
        Component("attn_0 head 2", "attn_0", True, "moves the subject's number to the last position, for head "
                  "1.2's query", (gate,)),
        Component("mlp_0", "mlp_0", False, "computes each noun's kind (cat - dog)", (d["kind"],)),
        Component("attn_1 head 0", "attn_1", False, "echoes the last noun's kind", (d["echo"],)),
        Component("attn_1 head 1", "attn_1", False, "reads the copied animal at the subject", (d["misc"],)),
        Component("attn_1 head 2", "attn_1", True, "attends to the subject if it is plural, to BOS if not "
                  "(a saturated pattern), and writes which", (gated,)),
        Component("mlp_1", "mlp_1", True, "turns the subject's number into the answer direction",
                  (answer, d["misc"])),
    )
    return Truth(components, frozenset(nodes), frozenset(edges), neuron_names={i: k for k, i in DIMS.items()})


def handset_config(d_vocab: int):
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=2, d_model=len(DIMS), n_heads=3, d_head=4, d_mlp=4, n_ctx=N_CTX, d_vocab=d_vocab, act_fn="relu",
        normalization_type=None, positional_embedding_type="standard", default_prepend_bos=True, seed=0,
        model_name="planted-handset")


def handset_weights(model, tokenizer) -> None:
    """Set every weight of the hand-set model (all others zero)."""
    d, tok = DIMS, tokenizer.convert_tokens_to_ids
    params = dict(model.named_parameters())
    sd = {k: torch.zeros_like(v) if k in params else v for k, v in model.state_dict().items()}  # buffers kept
    for noun, (number, animal) in NOUNS.items():
        sd["embed.W_E"][tok(noun), d["number"]] = number
        sd["embed.W_E"][tok(noun), d[animal]] = 1.0
    for p in range(N_CTX):
        sd["pos_embed.W_pos"][p, d[f"pos{p}"]] = 1.0

    def head(layer: int, h: int, query: int, key: int, reads: list[int], writes: list[int], signs=None):
        """Head `layer.h` attends from position `query` to `key` and copies dims `reads` into `writes`."""
        a = f"blocks.{layer}.attn."
        sd[a + "W_Q"][h, d[f"pos{query}"], 0] = 1.0
        sd[a + "W_K"][h, d[f"pos{key}"], 0] = SHARP * model.cfg.d_head ** 0.5  # scores are divided by sqrt(d_head)
        for j, (r, w) in enumerate(zip(reads, writes, strict=True)):
            sd[a + "W_V"][h, r, j] = 1.0
            sd[a + "W_O"][h, j, w] = 1.0 if signs is None else signs[j]

    head(0, 0, LAST, SUBJECT, [d["number"]], [d["subject number"]])
    head(0, 1, LAST, SUBJECT, [d["cat"], d["dog"]], [d["copied cat"], d["copied dog"]])
    head(1, 0, LAST, LAST, [d["kind"]], [d["echo"]])
    head(1, 1, LAST, SUBJECT, [d["copied cat"], d["copied dog"]], [d["misc"], d["misc"]], signs=[1.0, -1.0])
    head(0, 2, LAST, SUBJECT, [d["number"]], [d["gate number"]])
    # head 1.2: its query is the gate number g, its keys +GATE at the subject and -GATE at BOS, so it attends
    # to the subject when g = +1 and to BOS when g = -1; its value is +1 at the subject, -1 at BOS
    a, scale = "blocks.1.attn.", model.cfg.d_head ** 0.5
    sd[a + "W_Q"][2, d["gate number"], 0] = 1.0
    sd[a + "W_K"][2, d[f"pos{SUBJECT}"], 0] = GATE * scale
    sd[a + "W_K"][2, d["pos0"], 0] = -GATE * scale
    sd[a + "W_V"][2, d[f"pos{SUBJECT}"], 0] = 1.0
    sd[a + "W_V"][2, d["pos0"], 0] = -1.0
    sd[a + "W_O"][2, 0, d["gated"]] = 1.0

    def neuron(layer: int, i: int, reads: dict[int, float], writes: dict[int, float]):
        for r, w in reads.items():
            sd[f"blocks.{layer}.mlp.W_in"][r, i] = w
        for r, w in writes.items():
            sd[f"blocks.{layer}.mlp.W_out"][i, r] = w

    neuron(0, 0, {d["cat"]: 1.0, d["dog"]: -1.0}, {d["kind"]: 1.0})
    neuron(0, 1, {d["cat"]: -1.0, d["dog"]: 1.0}, {d["kind"]: -1.0})
    neuron(1, 0, {d["subject number"]: 1.0}, {d["answer"]: 1.0})
    neuron(1, 1, {d["subject number"]: -1.0}, {d["answer"]: -1.0})
    neuron(1, 2, {d["echo"]: 1.0}, {d["misc"]: 1.0})
    for dim in (d["answer"], d["gated"]):
        sd["unembed.W_U"][dim, tok("are")] = GAIN
        sd["unembed.W_U"][dim, tok("is")] = -GAIN
    for noun, (_, animal) in NOUNS.items():  # the animals' dimensions predict nouns (unrelated to the verb)
        sd["unembed.W_U"][d[animal], tok(noun)] = 1.0
    model.load_state_dict(sd)


def build_handset(out: Path) -> None:
    from transformer_lens import HookedTransformer

    from compute.models.zoo import build_tokenizer, save_model

    tokenizer = build_tokenizer(out / "tokenizer", VOCABULARY)
    model = HookedTransformer(handset_config(len(tokenizer)), tokenizer=tokenizer)
    handset_weights(model, tokenizer)
    save_model(model, out)
