"""Hostile and broken input, as an attacker or a careless user would give it.

Every case is one command line against the demo catalogue. Each must end in one line on
stderr that starts with `error:` and exit code 1, with no traceback; no file outside the
catalogue may be read (a canary file's secret never shows) or written (no output appears),
and every file of the catalogue must be byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

SECRET = "CANARY-7f3a9c-do-not-leak"


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder outside the catalogue: canary files to read, places an attacker would write to."""
    d = tmp_path_factory.mktemp("outside")
    (d / "secret.txt").write_text(f"{SECRET}\n")
    (d / "secret.csv").write_text(f"circuit_id\n{SECRET}\n")
    (d / "secret.json").write_text(json.dumps({"circuit_id": SECRET}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"circuit_id": [SECRET]}), d / "secret.parquet")
    (d / "a_folder").mkdir()
    (d / "copy.sql").write_text(f"COPY (SELECT 1) TO '{d / 'from_file.csv'}'")
    # a task file that is not UTF-8, one whose prompts are longer than the zoo's context (24),
    # one whose words the zoo's tokenizer does not know, one whose two answers are both unknown
    (d / "latin1.jsonl").write_bytes('{"clean_prefix": "the caf\xe9", "clean_answer": " runs"}\n'.encode("latin-1"))
    long = " ".join(["the cat near the dog"] * 6)
    _jsonl(d / "too_long.jsonl", [{"clean_prefix": long, "patch_prefix": long.replace("cat", "cats", 1),
                                   "clean_answer": " runs", "patch_answer": " run"}] * 3)
    _jsonl(d / "unknown_words.jsonl", [{"clean_prefix": "the platypus", "patch_prefix": "the platypi",
                                        "clean_answer": " runs", "patch_answer": " run"}] * 3)
    _jsonl(d / "unknown_answers.jsonl", [{"clean_prefix": "the cat", "patch_prefix": "the cats",
                                          "clean_answer": " zooms", "patch_answer": " zoom"}] * 3)
    # dictionaries whose files are garbage, or whose weights are NaN
    from compute.dictionaries.formats import save_dictionary
    from compute.dictionaries.kinds import SAE

    save_dictionary(SAE(64, 128, "blocks.0.hook_resid_post"), d / "garbage_saelens")
    (d / "garbage_saelens" / "sae_weights.safetensors").write_bytes(b"\x00\x01 not a safetensors file" * 10)
    (d / "garbage_ae").mkdir()
    (d / "garbage_ae" / "ae.pt").write_bytes(b"PK\x03\x04 not a torch file" * 10)
    (d / "garbage_ae" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    nan = SAE(64, 128, "blocks.0.hook_resid_post")
    import torch

    with torch.no_grad():
        nan.W_dec[3, 5] = float("nan")
    save_dictionary(nan, d / "nan_saelens")
    return d


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _a_shard(cat: Path) -> Path:
    return next(p for p in sorted((cat / "runs").glob("run-*/nodes.parquet")))


# (arguments, words the error line must hold); {cat} is the catalogue, {out} a folder outside it,
# {shard} a committed shard, {circuit} a circuit of the demo catalogue, {traversal} the canary
# reached from runs/ by ../
CASES = [
    # 1. SQL that writes, or reads what is not the catalogue: every way in (query, --file, compare --sql,
    #    edit --features-sql), in upper and lower case, with comments, CTEs, several statements
    (["query", "EXPLAIN ANALYZE COPY (SELECT 1) TO '{shard}'"], "EXPLAIN"),
    (["query", "explain /* harmless */ analyze -- really\n copy (select 1) to '{out}/pwn.csv'"], "EXPLAIN"),
    (["query", "EXPLAIN (ANALYZE, FORMAT JSON) COPY (SELECT 1) TO '{cat}/catalog.duckdb'"], "EXPLAIN"),
    (["query", "SELECT 1; EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/pwn.csv'"], "EXPLAIN"),
    (["query", "EXPLAIN SELECT 1; COPY nodes TO '{out}/pwn.csv'"], "read-only"),
    (["query", "COPY (SELECT * FROM nodes) TO '{shard}' (FORMAT parquet)"], "read-only"),
    (["query", "copy nodes to '{out}/pwn.csv'"], "read-only"),
    (["query", "EXPORT DATABASE '{out}/pwn_db'"], "read-only"),
    (["query", "ATTACH '{out}/pwn.duckdb' AS pwn"], "read-only"),
    (["query", "CREATE TEMP TABLE t AS SELECT 1"], "read-only"),
    (["query", "SET enable_external_access = true"], "read-only"),
    (["query", "reset lock_configuration"], "read-only"),
    (["query", "INSTALL httpfs"], "read-only"),
    (["query", "LOAD httpfs"], "read-only"),
    (["query", "PRAGMA database_list"], "read-only"),
    (["query", "CALL pragma_version()"], "read-only"),
    (["query", "SELECT * FROM query('COPY (SELECT 1) TO ''{out}/pwn.csv''')"], "SQL error"),
    (["query", "SELECT * FROM read_text('{out}/secret.txt')"], "Permission"),
    (["query", "SELECT content FROM read_blob('{out}/secret.txt')"], "Permission"),
    (["query", "WITH x AS (SELECT * FROM read_csv('{out}/secret.csv')) SELECT * FROM x"], "Permission"),
    (["query", "SELECT * FROM read_csv_auto('{out}/secret.csv')"], "Permission"),
    (["query", "SELECT * FROM sniff_csv('{out}/secret.csv')"], "Permission"),
    (["query", "SELECT * FROM read_json('{out}/secret.json')"], "Permission"),
    (["query", "SELECT * FROM read_json_auto('{out}/secret.json')"], "Permission"),
    (["query", "SELECT * FROM read_ndjson('{out}/secret.json')"], "Permission"),
    (["query", "SELECT * FROM read_parquet('{out}/secret.parquet')"], "Permission"),
    (["query", "SELECT * FROM parquet_metadata('{out}/secret.parquet')"], "Permission"),
    (["query", "SELECT * FROM parquet_schema('{out}/secret.parquet')"], "Permission"),
    (["query", "SELECT * FROM '{out}/secret.csv'"], "Permission"),
    (["query", "SELECT * FROM glob('{out}/*')"], "Permission"),
    (["query", "SELECT * FROM read_text('{traversal}')"], "Permission"),
    (["query", "SELECT * FROM read_text('{cat}/catalog.duckdb')"], "Permission"),
    (["query", "SELECT * FROM read_text('/proc/self/environ')"], "Permission"),
    (["query", "SELECT * FROM read_csv('https://example.com/x.csv')"], "Permission"),
    (["query", "--file", "{out}/copy.sql"], "read-only"),
    (["compare", "--sql", "COPY (SELECT 1) TO '{out}/pwn.csv'"], "read-only"),
    (["compare", "--sql", "SELECT circuit_id FROM read_csv('{out}/secret.csv')"], "Permission"),
    (["edit", "--task", "sva_simple", "--features-sql", "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/pwn.csv'"],
     "EXPLAIN"),
    (["edit", "--task", "sva_simple", "--features-sql", "SELECT * FROM read_text('{out}/secret.txt')"], "Permission"),
    # 2. and 3. prompts longer than the context, words and answers the tokenizer does not know
    (["discover", "--task-file", "{out}/too_long.jsonl"], "longer than the model's context"),
    (["discover", "--task-file", "{out}/unknown_words.jsonl"], "does not know"),
    (["discover", "--task-file", "{out}/unknown_answers.jsonl"], "not a single known token"),
    # 6. input that used to end in a traceback
    (["discover", "--task-file", "{out}/latin1.jsonl"], "latin1.jsonl:1: not UTF-8"),
    (["--catalog", "{out}/secret.txt", "discover", "--task", "sva_simple"], "is a file"),
    (["--catalog", "{out}/secret.txt/inside", "query", "SELECT 1"], "is a file"),
    (["render", "{circuit}", "--out", "{out}/secret.txt/circuit.html"], "is a file"),
    (["render", "{circuit}", "--out", "{out}/a_folder"], "is a folder"),
    (["render", "{circuit}", "--out", "/proc/circuit.html"], "/proc/circuit.html"),
    (["export", "{circuit}", "--out", "{out}/a_folder"], "is a folder"),
    (["plot", "--out", "{out}/secret.txt/x.png"], "is a file"),
    (["diff", "{circuit}", "{circuit}", "--out", "{out}/secret.txt"], "is a file"),
    (["compare", "--matrix", "{out}/a_folder"], "is a folder"),
    (["compare", "--out", "{out}/secret.txt/x.png"], "is a file"),
    (["edit", "--task", "sva_simple", "--features-sql", "SELECT 1", "--out", "{out}/a_folder"], "is a folder"),
    (["benchmark", "toy", "--out", "{out}/secret.txt/x.png"], "is a file"),
    (["dictionaries", "import", "{out}/garbage_saelens"], "not a readable safetensors file"),
    (["dictionaries", "import", "{out}/garbage_ae"], "cannot read the dictionary_learning files"),
    # 7. settings that used to give silently wrong numbers, and weights that would
    (["discover", "--task", "sva_simple", "--steps", "0"], "--steps"),
    (["discover", "--task", "sva_simple", "--examples", "-5"], "--examples"),
    (["discover", "--task", "sva_simple", "--examples", "0"], "--examples"),
    (["discover", "--task", "sva_simple", "--node-threshold", "nan"], "--node-threshold"),
    (["discover", "--task", "sva_simple", "--edge-threshold", "inf"], "--edge-threshold"),
    (["discover", "--task", "sva_simple", "--node-threshold", "-1"], "--node-threshold"),
    (["dictionaries", "train", "--steps", "0"], "--steps"),
    (["benchmark", "toy", "--size", "0"], "--size"),
    (["paths", "{circuit}", "-k", "0"], "-k"),
    (["neighbours", "{circuit}", "0", "--hops", "0"], "--hops"),
    (["render", "{circuit}", "--max-per-row", "0", "--out", "{out}/c.html"], "--max-per-row"),
    (["diff", "{circuit}", "{circuit}", "--min-similarity", "2"], "--min-similarity"),
    (["dictionaries", "import", "{out}/nan_saelens"], "NaN"),
]


def _fill(args: list[str], cat: Path, out: Path) -> list[str]:
    import catalog

    circuit = catalog.open(cat).sql("SELECT circuit_id FROM circuits ORDER BY created_at LIMIT 1").circuit_id[0]
    traversal = f"{cat}/runs/{os.path.relpath(out / 'secret.txt', cat / 'runs')}"  # runs/../../..
    subst = {"{cat}": str(cat), "{out}": str(out), "{shard}": str(_a_shard(cat)), "{circuit}": circuit,
             "{traversal}": traversal}
    filled = []
    for a in args:
        for k, v in subst.items():
            a = a.replace(k, v)
        filled.append(a)
    return filled if filled[0] == "--catalog" else ["--catalog", str(cat), *filled]


def _written_outside(out: Path) -> list[str]:
    """Files that showed up in the outside folder (what an attack would have written)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.startswith(("pwn", "from_file")) or p.name.endswith((".html", ".png")))


def test_there_are_enough_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("args,needle", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_hostile_input_gets_one_line_and_changes_nothing(demo_catalog, outside, args, needle):
    from cli import main

    before = _hashes(demo_catalog)
    full = _fill(args, demo_catalog, outside)
    r = CliRunner().invoke(main, full)
    assert r.exit_code == 1, (full, r.exit_code, r.output)
    assert isinstance(r.exception, SystemExit), r.exception  # no other exception escaped
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith(("zoo model", "dictionaries ("))]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.output
    assert SECRET not in r.output and SECRET not in r.stderr
    assert _written_outside(outside) == []
    assert _hashes(demo_catalog) == before


# ---- input that cannot be used as given is dropped with a count and a reason, never altered ----

def test_unusable_examples_are_dropped_and_counted_with_their_reason(zoo):
    from compute.tasks import Task, encode

    ok = {"clean_prefix": "the cat", "patch_prefix": "the cats", "clean_answer": " runs", "patch_answer": " run"}
    long = " ".join(["the cat near the dog"] * 6)  # 31 tokens with BOS; the zoo's context is 24
    task = Task("mixed", [
        ok, ok,
        {**ok, "clean_prefix": long, "patch_prefix": long.replace("cat", "cats", 1)},
        {**ok, "clean_prefix": "the platypus"},
        {**ok, "patch_prefix": "the wombats"},
        {**ok, "clean_answer": " zooms"},
        {**ok, "clean_answer": " zooms", "patch_answer": " zoom"},  # both unknown: once the same token
        {**ok, "patch_answer": " runs"},
    ])
    enc = encode(zoo.model, task)
    assert enc.n_examples == 2 and [b.clean.shape[1] for b in enc.batches] == [3]
    assert enc.dropped == {"prompt longer than the model's context (24 tokens)": 1,
                           "prompt has words the tokenizer does not know": 2,
                           "answer is not a single known token": 2,
                           "clean and patch answers are the same token": 1}


def test_a_tokenizer_whose_unknown_token_is_a_special_one_has_none(tmp_path):
    """GPT-2's unk_token is its end-of-text token, which byte-level BPE never produces for text:
    such a tokenizer has no unknown token of its own, so no prompt is dropped for one."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from compute.tasks import unknown_token

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    assert unknown_token(SimpleNamespace(tokenizer=gpt2_like)) is None
    own = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", unk_token="a")
    assert unknown_token(SimpleNamespace(tokenizer=own)) == 1


def test_a_one_example_task_is_stored_without_nan(tmp_path, dicts):
    """Mean and resample ablation of a single example change nothing, so its faithfulness has no
    denominator: those curves are stored as not computed, with the reason; zero ablation works."""
    import catalog

    f = tmp_path / "single.jsonl"
    f.write_text(json.dumps({"clean_prefix": "the cat", "patch_prefix": "the cats", "clean_answer": " runs",
                             "patch_answer": " run"}) + "\n")
    cat = tmp_path / "cat"
    r = CliRunner().invoke(__import__("cli").main, ["--catalog", str(cat), "discover", "--task-file", str(f),
                                                    "--full-eval"])
    assert r.exit_code == 0, r.output
    assert "not evaluated: mean ablation of every node leaves the metric unchanged" in r.stderr
    c = catalog.open(cat)
    row = c.sql("SELECT faithfulness, completeness, evaluation_note FROM circuits").iloc[0]
    assert row.faithfulness is None or row.faithfulness != row.faithfulness  # NULL, read as None or NaN by pandas
    assert c.sql("SELECT faithfulness IS NULL AS null FROM circuits").null[0]
    assert "one example" in row.evaluation_note and "resample ablation" in row.evaluation_note
    assert set(c.sql("SELECT DISTINCT ablation FROM evaluations").ablation) == {"zero"}
    assert c.sql("SELECT count(*) AS n FROM evaluations WHERE isnan(value)").n[0] == 0
