"""Parameter types and the option sets several commands share (a discovery, a model, a local graph,
a selection of circuits). Choices are read from the module that owns them when first used, so that
the CLI imports PyTorch only for the commands that need it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import click


class OutPath(click.Path):
    """A file (or folder) the command will write: refused up front when it cannot be, so that no
    work is done for an output that would fail at the end."""

    def __init__(self, folder: bool = False):
        super().__init__(path_type=Path)
        self.folder = folder

    def convert(self, value, param, ctx):
        path = Path(super().convert(value, param, ctx))
        if path.exists() and path.is_dir() != self.folder:
            self.fail(f"{path} is a {'file' if self.folder else 'folder'}", param, ctx)
        if path.exists() and not os.access(path, os.W_OK):
            self.fail(f"{path} cannot be written", param, ctx)
        above = next(p for p in path.absolute().parents if p.exists())
        if not above.is_dir():
            self.fail(f"{above} is a file, so nothing can be written under it", param, ctx)
        if not os.access(above, os.W_OK | os.X_OK):
            self.fail(f"cannot write in {above}", param, ctx)
        return path


class Threshold(click.ParamType):
    """A finite number >= 0 (click's FloatRange lets inf through)."""

    name = "threshold"

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v) or v < 0:
            self.fail(f"{value!r} is not a finite number >= 0", param, ctx)
        return v


class Size(click.ParamType):
    """A memory size: 8G, 512M, 2.5GiB or bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        from compute.attribution.budget import parse_size

        try:
            return value if isinstance(value, float) else parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Choices(click.Choice):
    """The choices a module constant lists ("module:NAME"), read when a command first uses them, so
    that the CLI imports a pipeline stage (and PyTorch) only for the commands that need it."""

    def __init__(self, ref: str):
        self.ref, self.case_sensitive = ref, True

    @property
    def choices(self) -> tuple:
        import importlib

        module, name = self.ref.split(":")
        return tuple(getattr(importlib.import_module(module), name))


class FeatureOrTop(click.ParamType):
    """A feature index (0 or more), or 'top': the strongest at the place asked about."""

    name = "FEATURE|top"

    def convert(self, value, param, ctx):
        text = str(value)
        if text == "top" or text.isdigit():
            return text
        self.fail(f"{value!r} is neither a feature index (0, 1, ...) nor 'top'", param, ctx)


class Text(click.ParamType):
    """Text given on the command line, which must be UTF-8 (other bytes reach Python as lone surrogates,
    which no tokenizer or SQL parser takes)."""

    name = "text"

    def convert(self, value, param, ctx):
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError:
            self.fail(f"{os.fsencode(str(value))[:60]!r} is not UTF-8 text", param, ctx)
        return value


TEXT = Text()
FEATURE_OR_TOP = FeatureOrTop()
THRESHOLD = Threshold()
POSITIVE = click.IntRange(min=1)


FORMAT = click.option("--format", "fmt", type=Choices("catalog.query:FORMATS"), default="table",
                      show_default=True, help="output format")


def options(*given):
    """A decorator applying click options in the order given (as they appear in --help)."""
    def apply(f):
        for opt in reversed(given):
            f = opt(f)
        return f
    return apply


DISCOVERY_OPTIONS = options(
    click.option("--method", type=Choices("compute.attribution.discovery:METHODS"), default="ig", show_default=True,
                 help="node effects: integrated gradients, attribution patching or exact patching"),
    click.option("--steps", "ig_steps", type=POSITIVE,
                 help="integrated-gradients steps (default 20)"),
    click.option("--ig-rule", type=Choices("compute.attribution.ig:RULES"),
                 help="integrated-gradients quadrature (default midpoint; left is Sparse Feature Circuits' "
                      "left Riemann sum)"),
    click.option("--aggregation", type=Choices("compute.attribution.discovery:AGGREGATIONS"), default="sum",
                 show_default=True,
                 help="sum effects over positions, or keep a node per position (none: keeps only "
                      "the shortest prompts, as SFC does)"),
    click.option("--node-threshold", default=0.1, show_default=True, type=THRESHOLD,
                 help="nodes with |effect| above it are in the circuit"),
    click.option("--edge-threshold", default=0.01, show_default=True, type=THRESHOLD,
                 help="edges with |weight| above it are kept"),
    click.option("--examples", "n_examples", default=64, show_default=True, type=POSITIVE,
                 help="train examples used"),
    click.option("--ablation", "ablations", multiple=True, type=Choices("compute.attribution.faithfulness:ABLATIONS"),
                 help="ablations for the faithfulness sweep (repeatable; default mean)"),
    click.option("--full-eval", is_flag=True,
                 help="the full faithfulness sweep: mean, zero and resample ablation, three random node sets "
                      "per size (the default, mean and one draw, costs less than discovery)"),
    click.option("--max-memory", type=Size(),
                 help="memory budget for discovery (e.g. 8G): batches sized to it, and the states of all "
                      "examples never held at once beyond it"),
    click.option("--errors", type=Choices("compute.attribution.faithfulness:ERROR_MODES"), default="node",
                 show_default=True, help="error terms in the faithfulness sweep"),
    click.option("--no-eval", is_flag=True, help="skip the faithfulness/completeness sweep"),
)


def check_release(ctx=None, param=None, value=None):
    """Check the released zoo's files against its manifest before a command that may load it does
    anything: a damaged one is one line naming it, and nothing is written."""
    from compute import release

    release.check()
    return value


ZOO = click.option("--zoo", "zoo_name", type=Choices("compute.models.zoo:ZOOS"), default="default", show_default=True,
                   callback=check_release, help="zoo model: default, or cued (a spurious preposition cue; task sva_pp_cue)")


def model_options(used_with: str) -> list:
    """The options that run a command on a checkpoint instead of the zoo."""
    return [
        click.option("--model", "model_name", metavar="PATH_OR_NAME",
                     help="a Hugging Face checkpoint directory, or a TransformerLens model name in the local Hugging "
                          f"Face cache, instead of the zoo (with {used_with})"),
        click.option("--dictionaries", "dictionary_set", type=click.Path(path_type=Path),
                     help="with --model: a directory of its dictionaries (SAELens or dictionary_learning layout)"),
        click.option("--dictionary-spec", type=click.Path(path_type=Path),
                     help="JSON file mapping the set's folders to submodules, for layouts that cannot be guessed"),
        click.option("--device", type=Choices("compute.models.checkpoints:DEVICES"), default="cpu",
                     show_default=True, help="with --model: where it runs"),
        click.option("--dtype", type=Choices("compute.models.checkpoints:DTYPES"), default="float32",
                     show_default=True, help="with --model: its weights' type"),
    ]


LOCAL_OPTIONS = options(
    ZOO,
    *model_options("--prompt and --dictionaries"),
    click.option("--node-budget", default=48, show_default=True, type=POSITIVE,
                 help="nodes kept (features, error terms, embeddings), by influence on the root"),
    click.option("--edge-budget", default=256, show_default=True, type=POSITIVE,
                 help="edges kept, by how much of the root flows along them"),
    click.option("--threshold", default=0.0, show_default=True, type=THRESHOLD,
                 help="hierarchical attribution: features whose attribution is under it pass nothing upstream "
                      "(0: every path counts)"),
    click.option("--qk-scores", default=4, show_default=True, type=click.IntRange(min=0),
                 help="attention scores (the strongest head moves) decomposed into query x key pairs"),
    click.option("--attention", "attention_mode", type=click.Choice(["auto", "saes", "frozen"]), default="auto",
                 show_default=True,
                 help="attention outputs as nodes of their SAEs, or as a frozen linear path between nodes (as in "
                      "circuit-tracer; no OV/QK edges); auto: SAEs when the dictionary set has them"),
    FORMAT,
)


def graph_params(node_budget: int, edge_budget: int, threshold: float, qk_scores: int):
    """GraphParams from the local-graph options."""
    from compute.local.prompt_graph import GraphParams

    return GraphParams(node_budget=node_budget, edge_budget=edge_budget, threshold=threshold, qk_scores=qk_scores)


def discovery_params(options: dict):
    """DiscoveryParams from the discovery options given (those left out: its defaults)."""
    from compute.attribution.discovery import FULL_EVALUATION, DiscoveryParams

    no_eval, chosen, full = options.pop("no_eval"), tuple(options.pop("ablations")), options.pop("full_eval")
    given = {k: v for k, v in options.items() if v is not None}  # the rest: DiscoveryParams' defaults
    if full:
        given.update(FULL_EVALUATION)
    if no_eval or chosen:
        given["ablations"] = () if no_eval else chosen
    return DiscoveryParams(**given)


# The circuits a command reads: ids, or --task, --method, --model, --sql (default all).
CIRCUIT_SELECTION = options(
    click.argument("circuit_ids", nargs=-1),
    click.option("--task", "tasks", multiple=True, help="circuits of this task (repeatable)"),
    click.option("--method", "methods", multiple=True, help="circuits found by this method (repeatable)"),
    click.option("--model", "models", multiple=True, help="circuits of this model (repeatable)"),
    click.option("--sql", "select_sql", type=TEXT, help="read-only query returning the circuit_id column"),
)
