"""Every catalogue table, defined once (SQLAlchemy Core).

The DuckDB views and the Arrow schemas of the Parquet shards derive from these
definitions (see `schema.derive`). Table names and the listed columns are a
public contract: add columns, never rename or drop them without a migration.
"""

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Double,
    Integer,
    MetaData,
    String,
    Table,
)
from sqlalchemy.types import ARRAY

SCHEMA_VERSION = 1

metadata = MetaData()

models = Table(
    "models", metadata,
    Column("model_id", String, primary_key=True, comment="stable id: zoo-<config hash> or a name"),
    Column("name", String, comment="human name"),
    Column("source", String, comment="where it came from (zoo, local path)"),
    Column("n_layers", Integer),
    Column("d_model", Integer),
    Column("d_vocab", Integer),
    Column("config", JSON, comment="the model configuration"),
    Column("weights_hash", String, comment="sha256 prefix of the weights file"),
)

dictionaries = Table(
    "dictionaries", metadata,
    Column("dictionary_id", String, primary_key=True, comment="sae-<weights hash>"),
    Column("model_id", String),
    Column("hook_name", String, comment="TransformerLens hook the dictionary reads"),
    Column("component", String, comment="embed | attn | mlp | resid"),
    Column("layer", Integer, comment="block index; -1 for the embedding"),
    Column("kind", String, comment="sae | transcoder | identity"),
    Column("architecture", String, comment="standard (ReLU + L1), ..."),
    Column("d_in", Integer),
    Column("d_sae", Integer),
    Column("path", String, comment="where the SAELens-format files are"),
    Column("metrics", JSON, comment="mse, fraction_variance_explained, l0, dead_fraction, dense_fraction"),
)

features = Table(
    "features", metadata,
    Column("dictionary_id", String, primary_key=True),
    Column("feature_idx", Integer, primary_key=True),
    Column("density", Double, comment="fraction of tokens on which it fires"),
    Column("max_activation", Double),
    Column("label", String, comment="human label, if any"),
)

tasks = Table(
    "tasks", metadata,
    Column("task_id", String, primary_key=True, comment="the task's name"),
    Column("name", String),
    Column("source", String, comment="file or generator it came from"),
    Column("description", String),
    Column("content_hash", String, comment="hash of the examples; a changed file is a new task"),
    Column("n_examples", Integer),
)

examples = Table(
    "examples", metadata,
    Column("task_id", String, primary_key=True),
    Column("example_idx", Integer, primary_key=True, comment="line order in the task file"),
    Column("split", String, comment="train | test"),
    Column("case", String),
    Column("clean_prefix", String),
    Column("patch_prefix", String),
    Column("clean_answer", String),
    Column("patch_answer", String),
    Column("clean_tokens", ARRAY(String), comment="clean prompt tokens; position 0 is BOS"),
)

runs = Table(
    "runs", metadata,
    Column("run_id", String, primary_key=True),
    Column("kind", String, comment="discover, ..."),
    Column("status", String, comment="ok | failed"),
    Column("params", JSON),
    Column("code_version", String),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("error", String),
)

circuits = Table(
    "circuits", metadata,
    Column("circuit_id", String, primary_key=True),
    Column("run_id", String),
    Column("model_id", String),
    Column("task_id", String),
    Column("method", String, comment="ig | atp"),
    Column("ig_steps", Integer),
    Column("aggregation", String, comment="sum (over positions) | none"),
    Column("metric", String, comment="logit_diff = logit(patch answer) - logit(clean answer)"),
    Column("node_threshold", Double),
    Column("edge_threshold", Double),
    Column("n_examples", Integer),
    Column("n_dropped", Integer, comment="examples the loader could not use"),
    Column("metric_clean", Double, comment="mean metric on clean prompts"),
    Column("metric_patch", Double, comment="mean metric on patch prompts"),
    Column("accuracy", Double, comment="model accuracy on the task's test split"),
    Column("n_nodes", Integer, comment="nodes in the circuit"),
    Column("n_edges", Integer),
    Column("faithfulness", Double),
    Column("completeness", Double),
    Column("created_at", DateTime),
)

nodes = Table(
    "nodes", metadata,
    Column("circuit_id", String, primary_key=True),
    Column("node_idx", Integer, primary_key=True),
    Column("component", String, comment="embed | attn | mlp | resid | metric"),
    Column("layer", Integer, comment="-1 embedding, n_layers for the metric"),
    Column("hook_name", String),
    Column("dictionary_id", String),
    Column("feature_idx", Integer, comment="NULL for error terms and the metric"),
    Column("is_error", Boolean),
    Column("position", Integer, comment="token position; NULL when aggregated over positions"),
    Column("effect", Double, comment="indirect effect on the metric, mean over examples"),
    Column("in_circuit", Boolean, comment="|effect| > node_threshold"),
)

edges = Table(
    "edges", metadata,
    Column("circuit_id", String, primary_key=True),
    Column("src_idx", Integer, primary_key=True),
    Column("dst_idx", Integer, primary_key=True),
    Column("kind", String, primary_key=True, comment="attribution | ov | qk"),
    Column("weight", Double),
)

activations = Table(
    "activations", metadata,
    Column("task_id", String, primary_key=True),
    Column("example_idx", Integer, primary_key=True),
    Column("dictionary_id", String, primary_key=True),
    Column("feature_idx", Integer, primary_key=True),
    Column("position", Integer, primary_key=True, comment="token position in the clean prompt"),
    Column("value", Double),
)

evaluations = Table(
    "evaluations", metadata,
    Column("circuit_id", String, primary_key=True),
    Column("kind", String, primary_key=True, comment="faithfulness | completeness | ..."),
    Column("ablation", String, primary_key=True, comment="mean | zero | resample"),
    Column("n_nodes", Integer, primary_key=True),
    Column("threshold", Double),
    Column("value", Double),
)

TABLES = {t.name: t for t in metadata.sorted_tables}
# Tables many runs may write the same rows to; their views keep one row per key.
DIMENSIONS = ("models", "dictionaries", "features", "tasks", "examples")
