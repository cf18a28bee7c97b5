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
    # job files: an option smuggled in as a positional argument, --help as an option, 10 lists of 10 values
    (d / "jobs_help.toml").write_text('[[job]]\ncommand = "circuits"\nargs = ["--help"]\n')
    (d / "jobs_help_flag.toml").write_text('[[job]]\ncommand = "circuits"\nhelp = true\n')
    (d / "jobs_huge.toml").write_text("[[job]]\ncommand = \"discover\"\n" + "".join(
        f"{k} = [{', '.join(str(v) for v in range(1, 11))}]\n"
        for k in ("examples", "steps", "node_threshold", "edge_threshold", "max_memory", "seed", "a", "b", "c", "e")))
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
    (["query", "INSTALL httpfs"], "INSTALL statements are not allowed; queries are read-only"),
    (["query", "USE memory"], "USE statements are not allowed"),
    (["query", "CHECKPOINT"], "CHECKPOINT statements are not allowed"),
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
    # 8. input that ended in a traceback, a message that misled, or a wait without end (issue 38)
    (["attribute", "--prompt", "when kate and mary went to the school , kate gave the letter to", "--target",
      "diff:mary:mary"], "two different tokens"),
    (["attribute", "--prompt", "the cat \udcff\udcfe"], "b'the cat \\xff\\xfe' is not UTF-8 text"),
    (["explain", "attn_1", "top", "--prompt", "the \udcfe cat"], "is not UTF-8 text"),
    (["query", "SELECT 1 AS \udcff"], "is not UTF-8 text"),
    (["decompose", "--model", "tms", "--features", "1000000"], "at most 10, the number of parameters"),
    (["query", "-- nothing"], "empty query: nothing but comments"),
    (["query", "SELECT " + "(" * 1100 + "1" + ")" * 1100], "a limit of the sandbox, whose settings are locked"),
    (["query", "SELECT count(*) FROM range(1000000000000)", "--timeout", "0.5"], "stopped after 0.5 s"),
    (["query", "SELECT 1", "--timeout", "0"], "--timeout"),
    (["run", "/dev/zero"], "/dev/zero is not a regular file"),
    (["run", "{out}/jobs_help.toml"], "positional arguments are not options"),
    (["run", "{out}/jobs_help_flag.toml"], "--help"),
    (["run", "{out}/jobs_huge.toml"], "more than 10,000 jobs (job 1 alone expands to 10,000,000,000)"),
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
    from commands import main

    before = _hashes(demo_catalog)
    full = _fill(args, demo_catalog, outside)
    r = CliRunner().invoke(main, full)
    assert r.exit_code == 1, (full, r.exit_code, r.output)
    assert isinstance(r.exception, SystemExit), r.exception  # no other exception escaped
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith(("zoo model", "its MLP", "dictionaries ("))]
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
    r = CliRunner().invoke(__import__("commands").main, ["--catalog", str(cat), "discover", "--task-file", str(f),
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


# ---- a damaged, duplicated or hostile catalogue never gives a wrong answer (issue 38) ------------

def _copy(demo_catalog: Path, tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "circuits"
    shutil.copytree(demo_catalog, root, symlinks=True)
    return root


def _runs_of_circuits(root: Path) -> list[tuple[str, str]]:
    import catalog

    return list(catalog.open(root).sql("SELECT circuit_id, run_id FROM circuits ORDER BY created_at")
                .itertuples(index=False, name=None))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_manifest(run: Path, **changes) -> None:
    from catalog.shards import MANIFEST

    m = json.loads((run / MANIFEST).read_text())
    m.update(changes)
    (run / MANIFEST).write_text(json.dumps(m))


SUM = "SELECT round(sum(effect), 6) AS s FROM nodes"


def test_a_flipped_byte_gives_no_wrong_number(demo_catalog, tmp_path):
    """One flipped byte in a shard: the run is left out of every view and named, the answer is the
    rest's exactly and marked partial (exit 3); --strict refuses it."""
    from conftest import run_cli

    import catalog

    root = _copy(demo_catalog, tmp_path)
    circuit, run = _runs_of_circuits(root)[2]
    _flip(root / "runs" / run / "nodes.parquet")
    r = run_cli("query", SUM, "--format", "csv", catalog=root)
    rest = catalog.open(demo_catalog).sql(SUM.replace("FROM nodes", "FROM nodes WHERE circuit_id <> ?"), [circuit])
    assert (r.returncode, r.stdout) == (3, f"s\n{rest.s[0]}\n"), (r.stdout, r.stderr)
    whole = catalog.open(demo_catalog).sql(SUM).s[0]
    assert rest.s[0] != whole
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("warning: partial answer") and run in line and "nodes.parquet: its content differs" in line
    r = run_cli("query", SUM, "--strict", catalog=root)
    assert r.returncode == 1 and r.stdout == "" and "refused (strict)" in r.stderr and run in r.stderr


def test_a_damaged_or_foreign_shard_never_breaks_a_query(demo_catalog, tmp_path):
    """A truncated shard and one that is no Parquet file at all, though its manifest agrees with it:
    every query still answers, from the rest, in one line each; so does the explorer, which says what it
    left out on every page."""
    from conftest import run_cli

    from catalog.explorer import create_app
    from catalog.shards import file_hash

    root = _copy(demo_catalog, tmp_path)
    (_, truncated), (_, foreign) = _runs_of_circuits(root)[:2]
    shard = root / "runs" / truncated / "nodes.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    junk = root / "runs" / foreign / "edges.parquet"
    junk.write_bytes(b"not parquet at all " * 50)
    m = json.loads((root / "runs" / foreign / "manifest.json").read_text())
    m["tables"]["edges"].update(bytes=junk.stat().st_size, sha256=file_hash(junk))
    (root / "runs" / foreign / "manifest.json").write_text(json.dumps(m))
    for sql in ("SELECT count(*) AS n FROM circuits", "SELECT count(*) AS n FROM edges", SUM):
        r = run_cli("query", sql, catalog=root)
        assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert truncated in line and foreign in line and "not a readable Parquet file" in line, line
    client = create_app(root).test_client()
    for page in ("/", "/sql?q=SELECT+count(*)+FROM+edges"):
        body = client.get(page).get_data(as_text=True)
        assert 'id="partial"' in body and truncated in body and foreign in body, page
    csv = client.get("/sql.csv?q=SELECT+1+AS+one")
    assert csv.status_code == 200 and truncated in csv.headers["X-Partial-Answer"]


def test_a_circuit_is_never_shown_twice_whichever_run_brings_it(demo_catalog, tmp_path):
    """A mirror that holds a committed circuit under another run id: the pull refuses that run. A copy
    made by hand inside the catalogue: queries leave it out and name it, `check` finds it, and
    `check --quarantine` moves it aside."""
    import shutil

    from conftest import run_cli

    root = _copy(demo_catalog, tmp_path)
    circuits = run_cli("query", "SELECT count(*) AS n FROM circuits", "--format", "csv", catalog=root).stdout
    _, run = _runs_of_circuits(root)[0]
    mirror = tmp_path / "mirror"
    assert run_cli("push", str(mirror), catalog=root).returncode == 0
    shutil.copytree(mirror / "runs" / run, mirror / "runs" / "run-copy-of-it")
    _rewrite_manifest(mirror / "runs" / "run-copy-of-it", run_id="run-copy-of-it")
    r = run_cli("pull", str(mirror), "--format", "csv", catalog=root)
    assert r.returncode == 1 and "1 refused" in r.stderr, r.stderr
    assert "run-copy-of-it,refused" in r.stdout and "is committed already" in r.stdout, r.stdout
    assert run_cli("query", "SELECT count(*) AS n FROM circuits", "--format", "csv", catalog=root).stdout == circuits
    shutil.copytree(root / "runs" / run, root / "runs" / "run-copy-by-hand")
    r = run_cli("query", "SELECT count(*) AS n FROM circuits", "--format", "csv", catalog=root)
    assert r.returncode == 3 and r.stdout == circuits and "run-copy-by-hand (repeats circuit" in r.stderr
    r = run_cli("check", catalog=root)
    assert r.returncode == 1 and "run-copy-by-hand" in r.stdout + r.stderr
    assert run_cli("check", "--quarantine", catalog=root).returncode == 1
    r = run_cli("query", "SELECT count(*) AS n FROM circuits", "--format", "csv", catalog=root)
    assert (r.returncode, r.stdout, r.stderr) == (0, circuits, "")


def test_a_symlinked_staged_run_is_never_committed(demo_catalog, tmp_path):
    """staging/ holding a link to a run folder outside the catalogue: `staging --clean` removes the link,
    never what it points to, and commits nothing; so does --discard."""
    import shutil

    from conftest import run_cli

    root = _copy(demo_catalog, tmp_path)
    _, run = _runs_of_circuits(root)[0]
    outside = tmp_path / "elsewhere"
    for name, flags in (("run-linked-in", ["--clean"]), ("run-linked-again", ["--clean", "--discard"])):
        shutil.copytree(root / "runs" / run, outside / name)
        _rewrite_manifest(outside / name, run_id=name)
        (root / "staging").mkdir(exist_ok=True)
        (root / "staging" / name).symlink_to(outside / name)
        before = _hashes(outside)
        r = run_cli("staging", *flags, "--format", "csv", catalog=root)
        assert r.returncode == 0, r.stderr
        assert f"{name}," in r.stdout and "symbolic link" in r.stdout, r.stdout
        assert not (root / "staging" / name).exists() and not (root / "staging" / name).is_symlink()
        assert not (root / "runs" / name).exists() and _hashes(outside) == before
    assert run_cli("check", catalog=root).returncode == 0


def test_a_run_without_a_manifest_is_never_read_or_packed(demo_catalog, tmp_path):
    from conftest import run_cli

    root = _copy(demo_catalog, tmp_path)
    circuit, run = _runs_of_circuits(root)[1]
    (root / "runs" / run / "manifest.json").unlink()
    r = run_cli("query", "SELECT count(*) AS n FROM circuits WHERE circuit_id = ?".replace("?", f"'{circuit}'"),
                "--format", "csv", catalog=root)
    assert r.returncode == 3 and r.stdout == "n\n0\n" and f"{run} (manifest.json missing)" in r.stderr, r.stderr
    def data() -> dict[str, str]:  # the catalogue's files but its (empty) lock files
        return {k: v for k, v in _hashes(root).items() if not k.endswith(".lock")}

    before = data()
    r = run_cli("compact", catalog=root)
    assert r.returncode == 1 and r.stderr.startswith(f"error: run {run} (manifest.json missing)"), r.stderr
    assert data() == before
    r = run_cli("check", "--format", "csv", catalog=root)
    assert r.returncode == 1 and f"{run},manifest.json,missing" in r.stdout


@pytest.mark.parametrize("damage", ["tables a list", "an entry without bytes", "not JSON"])
def test_a_malformed_manifest_is_one_line_everywhere(demo_catalog, tmp_path, damage):
    from conftest import run_cli

    root = _copy(demo_catalog, tmp_path)
    _, run = _runs_of_circuits(root)[0]
    manifest = root / "runs" / run / "manifest.json"
    m = json.loads(manifest.read_text())
    if damage == "tables a list":
        m["tables"] = list(m["tables"])
    elif damage == "an entry without bytes":
        del m["tables"]["nodes"]["bytes"]
    manifest.write_text(json.dumps(m) if damage != "not JSON" else "{ not json")
    for args, code in ((["check"], 1), (["compact"], 1), (["push", str(tmp_path / "mirror")], 1),
                       (["query", "SELECT count(*) FROM circuits"], 3)):
        r = run_cli(*args, catalog=root)
        assert r.returncode == code and "Traceback" not in r.stderr, (args, r.stderr)
        assert run in r.stdout + r.stderr and "manifest.json" in r.stdout + r.stderr, (args, r.stdout, r.stderr)


def test_a_mirror_whose_content_no_pull_can_read_is_named_not_skipped(demo_catalog, tmp_path):
    from conftest import run_cli

    root = _copy(demo_catalog, tmp_path)
    mirror = tmp_path / "mirror"
    (mirror / "runs" / "run with a space").mkdir(parents=True)
    (mirror / "runs" / "run with a space" / "manifest.json").write_text("{}")
    (mirror / "runs" / "run-a-file").write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (mirror / "runs" / "run-a-link").symlink_to(tmp_path / "elsewhere")
    r = run_cli("pull", str(mirror), "--format", "csv", catalog=root)
    assert r.returncode == 1 and "3 refused" in r.stderr, r.stderr
    for name, why in (("run with a space", "not a run id"), ("run-a-file", "a file"), ("run-a-link", "symbolic link")):
        assert any(line.startswith(f"{name},refused") and why in line for line in r.stdout.splitlines()), r.stdout
    (mirror / "runs" / "run-a-file").unlink()
    (mirror / "runs" / "run-a-link").unlink()
    import shutil

    shutil.rmtree(mirror / "runs")
    (mirror / "runs").write_text("a file where the runs should be")
    r = run_cli("pull", str(mirror), catalog=root)
    assert r.returncode == 1 and r.stderr.startswith("error: mirror") and "is a file" in r.stderr


def _as_in_a_terminal() -> None:
    """In the child, before it starts: Ctrl-C's signal as a terminal delivers it. A shell ignores SIGINT
    in the jobs it runs in the background, and children inherit that (a test run started so would
    otherwise see no SIGINT at all)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _querying(pid: int, timeout: float = 120.0) -> None:
    """Wait until a process runs a query: its query thread is named so (`catalog.store.stoppable`)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [p.read_text().strip() for p in Path(f"/proc/{pid}/task").glob("*/comm") if p.exists()]
        if "query" in names:
            return
        time.sleep(0.05)
    raise AssertionError("the query never started")


@pytest.mark.parametrize("sql", ["SELECT count(*) FROM range(1000000000000)",
                                 "SELECT count(*) FROM nodes a, nodes b, nodes c WHERE a.effect + b.effect > c.effect"])
@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_a_running_query_within_a_second(demo_catalog, sql, sig, code):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "--catalog", str(demo_catalog), "query", sql],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_in_a_terminal)
    try:
        _querying(p.pid)
        time.sleep(0.5)  # well into the query
        sent = time.monotonic()
        p.send_signal(getattr(signal, sig))
        out, err = p.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        p.kill()
    assert p.returncode == code and took < 1.0, (p.returncode, took, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and out == "", err


def _serve(root: Path, query_timeout: float):
    import threading

    from catalog.explorer import bind, create_app, url_of

    server = bind(create_app(root, query_timeout=query_timeout), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, url_of(server)


def test_the_explorer_bounds_every_query_and_stops_one_whose_client_went(demo_catalog):
    import socket
    import time
    import urllib.error
    import urllib.parse
    import urllib.request

    endless = urllib.parse.quote("SELECT count(*) FROM range(400000000000)")
    server, url = _serve(demo_catalog, query_timeout=1.5)
    try:
        start = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}sql.csv?q={endless}", timeout=30)
        assert e.value.code == 400 and "stopped after 1.5 s" in e.value.read().decode()
        assert time.monotonic() - start < 10
    finally:
        server.shutdown()
    server, url = _serve(demo_catalog, query_timeout=600)
    try:
        host, port = url.split("//")[1].rstrip("/").split(":")
        client = socket.create_connection((host, int(port)))
        client.sendall(f"GET /sql?q={endless} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        time.sleep(1.0)  # the query runs
        client.close()  # and its client goes
        time.sleep(2.0)
        cpu = time.process_time()
        time.sleep(1.0)
        assert time.process_time() - cpu < 0.3, "the query kept running after its client went"
    finally:
        server.shutdown()


def test_a_csv_download_that_fails_midway_is_cut_off_not_completed(demo_catalog, monkeypatch, capfd):
    import http.client

    import catalog.explorer.app as explorer
    from catalog.errors import UserError

    real = explorer.csv_chunks

    def failing(frames):
        chunks = real(frames)
        yield next(chunks)
        raise UserError("SQL error: boom after the first rows")

    monkeypatch.setattr(explorer, "csv_chunks", failing)
    server, url = _serve(demo_catalog, query_timeout=30)
    try:
        host, port = url.split("//")[1].rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/sql.csv?q=SELECT+1+AS+one")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):  # what curl reports as "transfer closed" (exit 18)
            response.read()
        monkeypatch.setattr(explorer, "csv_chunks", real)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/sql.csv?q=" + "SELECT+error('boom')")  # fails before the first byte: a page
        response = conn.getresponse()
        assert response.status == 400 and "boom" in response.read().decode()
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/faithfulness.png?errors=evil")
        response = conn.getresponse()
        assert response.status == 400 and "errors must be one of node, kept" in response.read().decode()
    finally:
        server.shutdown()
    err = capfd.readouterr().err
    assert "boom after the first rows; the download was cut off" in err and "Traceback" not in err


def test_an_interrupted_build_leaves_no_semaphore_behind():
    """Ctrl-C during a pinned build that shows a progress bar: no leaked-semaphore warning at exit."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    code = "from compute.cache import pinned; from tests.builds import slow_bar; pinned(slow_bar)"
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True, preexec_fn=_as_in_a_terminal)
    try:
        seen = b""
        while b"slow" not in seen:  # the build process shows its bar
            chunk = os.read(p.stderr.fileno(), 4096)
            assert chunk, "the build ended before it showed its bar"
            seen += chunk
        os.killpg(p.pid, signal.SIGINT)  # as Ctrl-C does: the whole process group
        err = seen.decode() + p.communicate(timeout=60)[1].decode()
    finally:
        p.kill()
    assert "KeyboardInterrupt" in err and "leaked semaphore" not in err, err
