"""circuit-tracer's half of `bench/ct_parity.py`: run in circuit-tracer's own virtual environment
(it pins other transformers/TransformerLens versions), on files our half wrote; imports nothing of
this project.

    <ct venv>/bin/python bench/circuit_tracer_side.py WORK_DIR SET RUNS

WORK_DIR holds `model.safetensors` and `model.json` (a HookedTransformer's weights and config),
`tokenizer/` (tokenizer.json), the transcoder set `SET/` (circuit-tracer's config.yaml and
layer_{i}.safetensors) and `prompts.json` (token ids and the logit to explain). For each prompt k it
writes `SET_{k}.safetensors` (the dense adjacency, the active features, the tokens) and times
`circuit_tracer.attribute` (one thread, the min of RUNS runs) into `SET_times.json`; for the set
`transcoders` it also writes the graph JSON of the first two prompts with circuit-tracer's own
`create_graph_files`, and the graphs themselves (`Graph.to_pt`), for import-graph.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

import circuit_tracer
import torch
import yaml
from circuit_tracer import attribute
from circuit_tracer.attribution.targets import CustomTarget
from circuit_tracer.replacement_model.replacement_model_transformerlens import (
    TransformerLensReplacementModel,
)
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from circuit_tracer.utils.create_graph_files import create_graph_files
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformerConfig
from transformers import PreTrainedTokenizerFast


def main(work: Path, name: str, runs: int) -> None:
    torch.set_num_threads(1)
    spec = json.loads((work / "model.json").read_text())
    spec["tokenizer_name"] = str(work / "tokenizer")
    cfg = HookedTransformerConfig(**spec)
    ct = yaml.safe_load((work / name / "config.yaml").read_text())
    hooks, cpu = (ct["feature_input_hook"], ct["feature_output_hook"]), torch.device("cpu")
    if ct["model_kind"] == "cross_layer_transcoder":
        transcoders = load_clt(str(work / name), *hooks, scan="zoo", device=cpu, dtype=torch.float32,
                               lazy_decoder=False)
    else:
        paths = {i: str(work / name / f"layer_{i}.safetensors") for i in range(cfg.n_layers)}
        transcoders = load_transcoder_set(paths, "zoo", *hooks, device=cpu, lazy_encoder=False, lazy_decoder=False)
    model = TransformerLensReplacementModel(cfg)  # what from_config does, with the weights loaded in between
    missing, unexpected = model.load_state_dict(load_file(str(work / "model.safetensors")), strict=False)
    weights = [k for k in missing if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))]
    if weights or unexpected:
        raise SystemExit(f"the weights do not fit: missing {weights}, unexpected {unexpected}")
    model._configure_replacement_model(transcoders)
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(work / "tokenizer" / "tokenizer.json"),
                                              bos_token="<bos>", unk_token="<unk>")
    times = []
    for k, p in enumerate(json.loads((work / "prompts.json").read_text())):
        tokens = torch.tensor(p["tokens"])
        target = [CustomTarget(p["target_str"], 1.0, model.unembed.W_U[:, p["target"]].detach().clone())]

        graph = partial(attribute, tokens, model, attribution_targets=target, batch_size=256)
        g = graph()
        spent = []
        for _ in range(runs):
            start = time.perf_counter()
            graph()
            spent.append(time.perf_counter() - start)
        times.append(min(spent))
        save_file({"adjacency": g.adjacency_matrix.float().contiguous(),
                   "active_features": g.active_features.long().contiguous(),
                   "selected_features": g.selected_features.long().contiguous(),
                   "activation_values": g.activation_values.float().contiguous(),
                   "input_tokens": g.input_tokens.long().contiguous()}, str(work / f"{name}_{k}.safetensors"))
        if k < 2 and name == "transcoders":
            g.cfg.tokenizer_name = str(work / "tokenizer")
            create_graph_files(g, slug=f"ct-prompt-{k}", output_path=str(work / "graphs"), scan="zoo",
                               node_threshold=0.8, edge_threshold=0.98)
            g.to_pt(str(work / "graphs" / f"ct-prompt-{k}.pt"))
    (work / f"{name}_times.json").write_text(json.dumps({"version": circuit_tracer.__version__, "seconds": times}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
