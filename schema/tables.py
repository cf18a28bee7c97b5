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

SCHEMA_VERSION = 10  # 2: edits and edit_features; 3: named-query macros (catalog.macros);
# 4: dictionaries.hook_name_out, dictionary_sweeps; 5: circuits.evaluation_note;
# 6: circuits.ig_rule, predictions; 7: parameter_benchmarks (and dictionaries of kind parameter);
# 8: planted, planted_models (ground truth), evaluations of kind <level>_<precision|recall|auroc>;
# 9: edges.head_layer, head, key_position (local circuits' OV and QK edges); 10: prompts, supernodes (the atlas)

metadata = MetaData()

models = Table(
    "models", metadata,
    Column("model_id", String, primary_key=True, comment="stable id: zoo-<config hash> or a name"),
    Column("name", String, comment="human name"),
    Column("source", String, comment="where it came from (zoo, local path)"),
    Column("n_layers", Integer, comment='transformer blocks'),
    Column("d_model", Integer, comment='residual width'),
    Column("d_vocab", Integer, comment='vocabulary size'),
    Column("config", JSON, comment="the model configuration"),
    Column("weights_hash", String, comment="sha256 prefix of the weights file"),
)

dictionaries = Table(
    "dictionaries", metadata,
    Column("dictionary_id", String, primary_key=True, comment="sae-<hash> or identity-<hash> of the weights and config"),
    Column("model_id", String, comment='model whose activations it reads'),
    Column("hook_name", String, comment="TransformerLens hook the dictionary reads (parameter dictionaries: the "
                                        "parameters decomposed, comma-separated)"),
    Column("hook_name_out", String, comment="hook it reconstructs (a transcoder's differs from hook_name)"),
    Column("component", String, comment="embed, attn, mlp or resid"),
    Column("layer", Integer, comment="block index; -1 for the embedding"),
    Column("kind", String, comment="sae, transcoder, identity or parameter (directions in weight space)"),
    Column("architecture", String, comment="standard (ReLU + L1), topk, jumprelu, transcoder, identity, or hessian "
                                           "(sparse Hessian eigendecomposition)"),
    Column("d_in", Integer, comment='input width (must equal the hook width; parameter dictionaries: parameters)'),
    Column("d_sae", Integer, comment='number of features'),
    Column("path", String, comment="where the SAELens-format files are"),
    Column("metrics", JSON, comment="held-out mse, fraction_variance_explained, l0, dead_fraction, dense_fraction, "
           "n_tokens; loss_clean, loss_spliced, loss_zero_ablated, loss_recovered"),
)

features = Table(
    "features", metadata,
    Column("dictionary_id", String, primary_key=True, comment='dictionary of the feature'),
    Column("feature_idx", Integer, primary_key=True, comment='index in the dictionary'),
    Column("density", Double, comment="fraction of tokens on which it fires"),
    Column("max_activation", Double, comment='largest activation seen'),
    Column("label", String, comment="human label, if any"),
)

tasks = Table(
    "tasks", metadata,
    Column("task_id", String, primary_key=True, comment="the task's name"),
    Column("name", String, comment='task name (same as task_id)'),
    Column("source", String, comment="file or generator it came from"),
    Column("description", String, comment='what the task tests'),
    Column("content_hash", String, comment="hash of the examples; a changed file is a new task"),
    Column("n_examples", Integer, comment='examples in the file'),
)

examples = Table(
    "examples", metadata,
    Column("task_id", String, primary_key=True, comment='task of the example'),
    Column("example_idx", Integer, primary_key=True, comment="line order in the task file"),
    Column("split", String, comment="train or test"),
    Column("case", String, comment="the example's case label from the task file"),
    Column("clean_prefix", String, comment='prompt whose behaviour is explained'),
    Column("patch_prefix", String, comment='contrast prompt'),
    Column("clean_answer", String, comment='correct next token after clean_prefix'),
    Column("patch_answer", String, comment='correct next token after patch_prefix'),
    Column("clean_tokens", ARRAY(String), comment="clean prompt tokens; position 0 is BOS"),
)

runs = Table(
    "runs", metadata,
    Column("run_id", String, primary_key=True, comment='unique id of the run'),
    Column("kind", String, comment="discover, ..."),
    Column("status", String, comment="ok or failed"),
    Column("params", JSON, comment='job parameters'),
    Column("code_version", String, comment='tool version and git commit'),
    Column("started_at", DateTime, comment='UTC start'),
    Column("finished_at", DateTime, comment='UTC end'),
    Column("error", String, comment='what went wrong, for failed runs'),
)

circuits = Table(
    "circuits", metadata,
    Column("circuit_id", String, primary_key=True, comment='unique id of the circuit'),
    Column("run_id", String, comment='run that produced it'),
    Column("model_id", String, comment='model it was discovered in'),
    Column("task_id", String, comment='task it explains'),
    Column("method", String, comment="ig, atp or exact; curvature for parameter features (nodes: directions, "
                                      "effect: mean curvature at the answer position)"),
    Column("ig_steps", Integer, comment='integrated-gradients steps (NULL for other methods)'),
    Column("ig_rule", String, comment="integrated-gradients quadrature: gauss, midpoint or left (NULL for other "
                                      "methods; circuits older than schema 6 used left)"),
    Column("aggregation", String, comment="sum (over positions), none, or last (the answer position)"),
    Column("metric", String, comment="logit_diff = logit(patch answer) - logit(clean answer); neg_logit = -logit(clean answer) "
                   "for tasks without patch prompts (patch state: zero ablation)"),
    Column("node_threshold", Double, comment='nodes kept when |effect| exceeds it'),
    Column("edge_threshold", Double, comment='edges kept when |weight| exceeds it'),
    Column("n_examples", Integer, comment='train examples used'),
    Column("n_dropped", Integer, comment="examples the loader could not use"),
    Column("metric_clean", Double, comment="mean metric on clean prompts"),
    Column("metric_patch", Double, comment="mean metric on patch prompts"),
    Column("accuracy", Double, comment="model accuracy on the task's test split"),
    Column("n_nodes", Integer, comment="nodes in the circuit"),
    Column("n_edges", Integer, comment="edges kept"),
    Column("faithfulness", Double, comment='F(C)-F(0) over F(M)-F(0) at the thresholds (when evaluated)'),
    Column("completeness", Double, comment='the same for the complement (when evaluated)'),
    Column("evaluation_note", String, comment="why an evaluation was not computed (NULL when all were)"),
    Column("created_at", DateTime, comment='UTC time of discovery'),
)

nodes = Table(
    "nodes", metadata,
    Column("circuit_id", String, primary_key=True, comment='circuit of the node'),
    Column("node_idx", Integer, primary_key=True, comment='index within the circuit (edges refer to it)'),
    Column("component", String, comment="embed, attn, mlp, resid or metric"),
    Column("layer", Integer, comment="-1 embedding, n_layers for the metric"),
    Column("hook_name", String, comment='TransformerLens hook of the submodule'),
    Column("dictionary_id", String, comment='dictionary of the feature or error term'),
    Column("feature_idx", Integer, comment="NULL for error terms and the metric"),
    Column("is_error", Boolean, comment="the dictionary's error term (reconstruction residual)"),
    Column("position", Integer, comment="token position; NULL when aggregated over positions"),
    Column("effect", Double, comment="indirect effect on the metric, mean over examples"),
    Column("in_circuit", Boolean, comment="|effect| > node_threshold"),
)

edges = Table(
    "edges", metadata,
    Column("circuit_id", String, primary_key=True, comment='circuit of the edge'),
    Column("src_idx", Integer, primary_key=True, comment='upstream node (nodes.node_idx)'),
    Column("dst_idx", Integer, primary_key=True, comment='downstream node (nodes.node_idx)'),
    Column("kind", String, primary_key=True,
           comment="attribution; for local circuits also ov (through one head), qk (a pair's part of an attention "
                   "score), qk_query and qk_key (one side's part)"),
    Column("weight", Double, comment="attribution: effect of src on the metric through dst, mean over examples "
                                     "(local circuits: src's direct contribution to dst's pre-activation times the "
                                     "root's gradient there, the part of the root flowing along the edge); ov: the "
                                     "part of it through `head`; qk: the part of head's attention "
                                     "score from dst's position to key_position due to the pair (src on the key "
                                     "side, dst on the query side); qk_query, qk_key: src's part on one side of the "
                                     "score that attention feature dst reads through the head"),
    Column("head_layer", Integer, comment="ov and qk edges: the layer of the attention head (NULL otherwise)"),
    Column("head", Integer, comment="ov and qk edges: the attention head within head_layer"),
    Column("key_position", Integer, comment="qk edges: the key position of the decomposed score (the query "
                                            "position is dst's)"),
)

activations = Table(
    "activations", metadata,
    Column("task_id", String, primary_key=True, comment='task of the example'),
    Column("example_idx", Integer, primary_key=True, comment='example within the task'),
    Column("dictionary_id", String, primary_key=True, comment='dictionary the feature belongs to'),
    Column("feature_idx", Integer, primary_key=True, comment='feature index in the dictionary'),
    Column("position", Integer, primary_key=True, comment="token position in the clean prompt"),
    Column("value", Double, comment='feature activation (nonzero)'),
)

# How a circuit's curves treat the error terms (evaluations.errors): as nodes kept by the threshold, always
# kept, always ablated, or removed from the model
ERROR_MODES = ("node", "kept", "ablated", "removed")

evaluations = Table(
    "evaluations", metadata,
    Column("circuit_id", String, primary_key=True, comment='circuit evaluated'),
    Column("kind", String, primary_key=True,
           comment="faithfulness, completeness, or faithfulness_random (random node sets of the same size); "
                   "against a planted circuit (`cli.py benchmark ground-truth`): node_, edge_ or component_ "
                   "precision, recall or auroc"),
    Column("ablation", String, primary_key=True, comment="mean, zero or resample ('none' for ground-truth scores)"),
    Column("errors", String, primary_key=True,
           comment="error terms: node (kept by threshold), kept, ablated or removed ('none' for ground-truth scores)"),
    Column("threshold", Double, primary_key=True, comment='node threshold of this point (edge threshold for edge_ scores)'),
    Column("n_nodes", Integer, comment='nodes kept at this point (features and error terms); for ground-truth '
                                       'scores, the true candidates'),
    Column("value", Double, comment='the measured value'),
)

edits = Table(
    "edits", metadata,
    Column("edit_id", String, primary_key=True, comment="unique id of the edit"),
    Column("subset", String, primary_key=True, comment="an example case of the task, or 'all'"),
    Column("run_id", String, comment="run that measured it"),
    Column("model_id", String, comment="model edited"),
    Column("task_id", String, comment="task re-measured"),
    Column("split", String, comment="examples measured (train or test)"),
    Column("ablation", String, comment="value the features were set to: mean or zero"),
    Column("features_sql", String, comment="the query that chose the ablated features"),
    Column("n_features", Integer, comment="features ablated (rows of edit_features)"),
    Column("n_examples", Integer, comment="examples of the subset measured"),
    Column("metric_before", Double, comment="mean task metric on clean prompts, unedited model"),
    Column("metric_after", Double, comment="the same with the features ablated"),
    Column("accuracy_before", Double, comment="accuracy on clean and patch prompts, unedited model"),
    Column("accuracy_after", Double, comment="the same with the features ablated"),
    Column("created_at", DateTime, comment="UTC time of the edit"),
)

edit_features = Table(
    "edit_features", metadata,
    Column("edit_id", String, primary_key=True, comment="edit that ablated the feature"),
    Column("dictionary_id", String, primary_key=True, comment="dictionary of the feature"),
    Column("feature_idx", Integer, primary_key=True, comment="index in the dictionary"),
)

predictions = Table(
    "predictions", metadata,
    Column("circuit_id", String, primary_key=True, comment="circuit whose node effects are summed"),
    Column("site", String, primary_key=True, comment="submodule of the node set (embed, attn_0, ...)"),
    Column("n_nodes", Integer, primary_key=True, comment="nodes in the set (features and error terms): the "
                                                         "submodule's n strongest in the method's ranking (n = 1, 2, "
                                                         "4, ...), or all of them"),
    Column("all_nodes", Boolean, comment="the set is every node of the submodule: predicted - measured is the "
                                         "method's completeness error there"),
    Column("predicted", Double, comment="the sum of the method's effects over the set"),
    Column("measured", Double, comment="the metric's change when the whole set is patched at once (mean over "
                                       "examples)"),
)

parameter_benchmarks = Table(
    "parameter_benchmarks", metadata,
    Column("run_id", String, primary_key=True, comment="run of `cli.py benchmark parameters`"),
    Column("toy", String, primary_key=True, comment="xor or tms"),
    Column("dictionary_id", String, comment="the decomposition (a dictionary of kind parameter)"),
    Column("n_features", Integer, comment="directions"),
    Column("n_parameters", Integer, comment="parameters decomposed"),
    Column("check", String, comment="what must hold"),
    Column("passed", Boolean, comment="whether it held"),
    Column("top_inputs", ARRAY(String), comment="each direction's input of largest curvature, in direction order"),
    Column("mmcs", Double, comment="tms: mean over features of the best |cosine| between a direction and the "
                                   "feature's true parameter component (its column of W)"),
    Column("ml2r", Double, comment="tms: mean over features of |u·w0| / the true component's norm, for the "
                                   "best-matching direction u"),
    Column("high", Double, comment="the decomposition's mean sum of squared curvatures"),
    Column("interference", Double, comment="its mean interference (see compute/parameters/decomposition.py)"),
)

planted = Table(
    "planted", metadata,
    Column("model_id", String, primary_key=True, comment="a planted model (compute/groundtruth/planted.py)"),
    Column("task_id", String, primary_key=True, comment="the task whose circuit is planted"),
    Column("level", String, primary_key=True, comment="component, node or edge"),
    Column("name", String, primary_key=True, comment="component: 'attn_0 head 0', 'mlp_1'; node: site/neuron; "
                                                     "edge: source -> destination"),
    Column("site", String, comment="the submodule (site name) it writes; an edge's destination ('metric' for the "
                                   "metric)"),
    Column("features", ARRAY(Integer), comment="its neurons there (identity dictionary); NULL: every neuron of the "
                                               "site"),
    Column("src_site", String, comment="edge: the source's submodule"),
    Column("src_feature", Integer, comment="edge: the source's neuron"),
    Column("in_circuit", Boolean, comment="whether the task's circuit runs through it"),
    Column("role", String, comment="what it carries"),
)

planted_models = Table(
    "planted_models", metadata,
    Column("run_id", String, primary_key=True, comment="run of `cli.py benchmark ground-truth`"),
    Column("model_id", String, primary_key=True, comment="the planted model"),
    Column("task_id", String, comment="its task"),
    Column("name", String, comment="handset (weights set by hand) or siit (strict interchange intervention "
                                   "training)"),
    Column("accuracy", Double, comment="the model's accuracy on the task"),
    Column("faithfulness", Double, comment="faithfulness of the planted circuit (mean ablation of every other node)"),
    Column("completeness", Double, comment="faithfulness of its complement (mean ablation of the planted nodes)"),
    Column("training", JSON, comment="siit: its settings and interchange accuracies on every pair of prompts"),
)

dictionary_sweeps = Table(
    "dictionary_sweeps", metadata,
    Column("run_id", String, primary_key=True, comment="run of the sweep (runs.params holds the data settings)"),
    Column("benchmark", String, primary_key=True, comment="toy: synthetic activations of known features"),
    Column("method", String, primary_key=True, comment="sae, or pca (the baseline)"),
    Column("l1_coefficient", Double, primary_key=True, comment="L1 penalty (0 for pca)"),
    Column("d_sae", Integer, primary_key=True, comment="dictionary size (components for pca)"),
    Column("d_in", Integer, comment="activation width"),
    Column("n_true_features", Integer, comment="ground-truth features in the data"),
    Column("mse", Double, comment="reconstruction loss, mean squared error per vector on held-out data"),
    Column("l0", Double, comment="mean active features per vector"),
    Column("mmcs_truth", Double, comment="mean over true features of the best decoder cosine"),
    Column("mmcs_larger", Double, comment="mean max cosine against the next larger dictionary (same L1)"),
    Column("dead_features", Integer, comment="features that never fire on held-out data"),
)

prompts = Table(
    "prompts", metadata,
    Column("circuit_id", String, primary_key=True, comment="the prompt's graph (a local circuit of one example)"),
    Column("atlas_id", String, comment="the data set of prompts: a task whose examples are the prompts "
                                       "(examples.clean_prefix is the text, clean_tokens its tokens)"),
    Column("prompt_idx", Integer, comment="the prompt's example index in that task: its line in the file "
                                          "(from 0), or a task's example index"),
    Column("run_id", String, comment="run (one chunk of the data set) that computed the graph"),
    Column("n_tokens", Integer, comment="tokens of the prompt, BOS included"),
    Column("target", String, comment="the root the file asked for (logit:TOKEN, diff:TOKEN:OTHER or "
                                     "SITE/FEATURE@POSITION); NULL: the model's top next token"),
    Column("root", String, comment="what the graph explains, as explain prints it: the token of a logit, "
                                   "'A - B' of a logit difference, or SITE/FEATURE@POSITION"),
    Column("root_value", Double, comment="the root's value on the prompt"),
    Column("answer", String, comment="the expected next token the file gave (NULL if none)"),
    Column("prediction", String, comment="the model's top next token"),
    Column("probability", Double, comment="its probability"),
    Column("correct", Boolean, comment="prediction = answer (NULL without an answer)"),
    Column("label", String, comment="the prompt's label from the file (a task's example case)"),
    Column("fields", JSON, comment="the file's other fields of the prompt (a task's: its split)"),
)

supernodes = Table(
    "supernodes", metadata,
    Column("run_id", String, primary_key=True, comment="run of `cli.py atlas supernodes` (its params: the thresholds)"),
    Column("dictionary_id", String, primary_key=True, comment="a member feature's dictionary"),
    Column("feature_idx", Integer, primary_key=True, comment="its index there"),
    Column("atlas_id", String, comment="the atlas whose graphs the group was found in"),
    Column("supernode", String, comment="the group's name: S<k> <its strongest members>"),
    Column("component", String, comment="the feature's submodule: attn or mlp (or resid, embed)"),
    Column("layer", Integer, comment="its layer"),
    Column("n_graphs", Integer, comment="graphs of the atlas whose circuit holds the feature"),
)

TABLES = {t.name: t for t in metadata.sorted_tables}
# Tables many runs may write the same rows to (concurrent runs of one new task both write its
# examples and activations; every ground-truth benchmark writes its planted truth); their views keep one
# row per key.
DIMENSIONS = ("models", "dictionaries", "features", "tasks", "examples", "activations", "planted")
