"""Named queries: DuckDB table macros stored in the catalogue, so plain SQL can call them.

    SELECT * FROM node_diff('circuit-a', 'circuit-b') WHERE status = 'added'

They are created with the views (`catalog.store`), live in `catalog.duckdb` (any DuckDB
client that opens it can call them), and back the Python API of `catalog.compare`,
`catalog.diff` and `catalog.graph`. `cli.py query --list` prints this table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from schema.sites import NODE_KEY_COLUMNS


@dataclass(frozen=True)
class NamedQuery:
    name: str
    params: str
    summary: str
    body: str
    scalar: bool = False

    @property
    def signature(self) -> str:
        return f"{self.name}({self.params})"

    def create_sql(self) -> str:
        kind = "" if self.scalar else "TABLE"
        return f"CREATE OR REPLACE MACRO {self.signature} AS {kind}\n{self.body}"


# The node key that names a node across circuits: NULLs become sentinels so that plain
# equality joins work (the metric node has no dictionary, aggregated nodes no position).
_SENTINELS = {"dictionary_id": ("''", "dict_key"), "feature_idx": ("-1", "feat_key"), "position": ("-1", "pos_key")}
_KEY = ", ".join(f"coalesce({c}, {_SENTINELS[c][0]}) AS {_SENTINELS[c][1]}" if c in _SENTINELS else c
                 for c in NODE_KEY_COLUMNS)
_KEY_COLUMNS = ", ".join(_SENTINELS[c][1] if c in _SENTINELS else c for c in NODE_KEY_COLUMNS)

# A circuit's features (errors and the metric left out), effects summed over positions, ranked
# by |effect|; k = NULL keeps the features in the circuit, k = N the N strongest nodes.
_CIRCUIT_FEATURES = """
SELECT circuit_id, c.task_id, c.method, c.model_id, dictionary_id, feature_idx,
       any_value(n.component) AS component, any_value(n.layer) AS layer, sum(n.effect) AS effect,
       row_number() OVER (PARTITION BY circuit_id ORDER BY abs(sum(n.effect)) DESC, dictionary_id, feature_idx)
         AS rank
FROM nodes n JOIN circuits c USING (circuit_id)
WHERE list_contains(ids, circuit_id) AND feature_idx IS NOT NULL AND (k IS NOT NULL OR n.in_circuit)
GROUP BY circuit_id, c.task_id, c.method, c.model_id, dictionary_id, feature_idx
QUALIFY k IS NULL OR rank <= k
"""

_SHARED_FEATURES = """
SELECT dictionary_id, feature_idx, any_value(component) AS component, any_value(layer) AS layer,
       count(*) AS n_circuits, count(*) = len(list_distinct(ids)) AS in_all,
       CASE WHEN count(*) = 1 THEN any_value(circuit_id) END AS unique_to,
       list(task_id ORDER BY task_id, circuit_id) AS tasks, list(circuit_id ORDER BY task_id, circuit_id) AS circuits,
       avg(effect) AS mean_effect
FROM circuit_features(ids, k)
GROUP BY dictionary_id, feature_idx
ORDER BY n_circuits DESC, abs(mean_effect) DESC
"""

# Pairwise overlap; rank_corr is Spearman's correlation of the shared features' effects
# (ranks taken among the shared features, so it asks: do they agree on the order?). A pair of
# circuits is one BIGINT (their positions in ids), so the two rank windows over the shared rows,
# most of the time here, partition by one integer instead of two strings (1.5x faster at 1M features).
_FEATURE_OVERLAP = """
WITH f AS (SELECT circuit_id, list_position(ids, circuit_id)::BIGINT AS ci, dictionary_id, feature_idx, effect
           FROM circuit_features(ids, k)),
sizes AS (SELECT circuit_id, any_value(ci) AS ci, count(*) AS n FROM f GROUP BY ALL),
pairs AS (SELECT a.circuit_id AS circuit_a, b.circuit_id AS circuit_b, a.ci * 4294967296 + b.ci AS pair
          FROM sizes a JOIN sizes b ON a.circuit_id < b.circuit_id),
shared AS (SELECT a.ci * 4294967296 + b.ci AS pair, a.effect AS effect_a, b.effect AS effect_b
           FROM f a JOIN f b USING (dictionary_id, feature_idx) WHERE a.circuit_id < b.circuit_id),
ranked AS (SELECT pair, rank() OVER (PARTITION BY pair ORDER BY effect_a) AS ra,
                  rank() OVER (PARTITION BY pair ORDER BY effect_b) AS rb
           FROM shared),
stats AS (SELECT pair, count(*) AS n_shared, corr(ra, rb) AS rank_corr FROM ranked GROUP BY ALL)
SELECT p.circuit_a, p.circuit_b, ta.task_id AS task_a, tb.task_id AS task_b, sa.n AS n_a, sb.n AS n_b,
       coalesce(s.n_shared, 0) AS n_shared,
       coalesce(s.n_shared, 0) / (sa.n + sb.n - coalesce(s.n_shared, 0)) AS jaccard, s.rank_corr
FROM pairs p JOIN sizes sa ON sa.circuit_id = p.circuit_a JOIN sizes sb ON sb.circuit_id = p.circuit_b
JOIN circuits ta ON ta.circuit_id = p.circuit_a JOIN circuits tb ON tb.circuit_id = p.circuit_b
LEFT JOIN stats s USING (pair)
ORDER BY jaccard DESC, p.circuit_a, p.circuit_b
"""

# Circuit B's nodes relabelled into A's terms: a matched feature takes A's (dictionary, index),
# an error term takes A's dictionary of the same submodule. `features` and `dicts` are empty
# when both circuits use the same dictionaries (then this is the identity).
_MATCHED_NODES = f"""
na AS (SELECT node_idx, effect, in_circuit, NULL::VARCHAR AS dictionary_b, NULL::BIGINT AS feature_b,
              NULL::DOUBLE AS similarity, {_KEY}
       FROM nodes WHERE circuit_id = a),
fm AS (SELECT unnest(features::STRUCT(dict_b VARCHAR, feat_b BIGINT, dict_a VARCHAR, feat_a BIGINT,
                                    similarity DOUBLE)[], recursive := true)),
dm AS (SELECT unnest(dicts::STRUCT(dict_b VARCHAR, dict_a VARCHAR)[], recursive := true)),
nb AS (SELECT node_idx, effect, in_circuit, dictionary_b, feature_b, similarity, {_KEY}
       FROM (SELECT n.node_idx, n.effect, n.in_circuit, n.component, n.layer, n.is_error, n.position,
                    n.dictionary_id AS dictionary_b, n.feature_idx AS feature_b, fm.similarity,
                    CASE WHEN n.feature_idx IS NULL THEN coalesce(dm.dict_a, n.dictionary_id)
                         ELSE coalesce(fm.dict_a, n.dictionary_id) END AS dictionary_id,
                    coalesce(fm.feat_a, n.feature_idx) AS feature_idx
             FROM nodes n
             LEFT JOIN fm ON fm.dict_b = n.dictionary_id AND fm.feat_b = n.feature_idx
             LEFT JOIN dm ON dm.dict_b = n.dictionary_id
             WHERE n.circuit_id = b))
"""

_NODE_DIFF = f"""
WITH {_MATCHED_NODES},
ra AS (SELECT *, CASE WHEN in_circuit THEN rank() OVER (PARTITION BY in_circuit ORDER BY abs(effect) DESC) END
                 AS rank FROM na),
rb AS (SELECT *, CASE WHEN in_circuit THEN rank() OVER (PARTITION BY in_circuit ORDER BY abs(effect) DESC) END
                 AS rank FROM nb),
j AS (SELECT coalesce(ra.component, rb.component) AS component, coalesce(ra.layer, rb.layer) AS layer,
             coalesce(ra.dict_key, rb.dict_key) AS dict_key, coalesce(ra.feat_key, rb.feat_key) AS feat_key,
             coalesce(ra.is_error, rb.is_error) AS is_error, coalesce(ra.pos_key, rb.pos_key) AS pos_key,
             ra.node_idx AS node_a, rb.node_idx AS node_b, rb.dictionary_b, rb.feature_b, rb.similarity,
             coalesce(ra.in_circuit, false) AS in_a, coalesce(rb.in_circuit, false) AS in_b,
             ra.effect AS effect_a, rb.effect AS effect_b, ra.rank AS rank_a, rb.rank AS rank_b
      FROM ra FULL JOIN rb USING ({_KEY_COLUMNS}))
SELECT CASE WHEN in_a AND NOT in_b THEN 'removed' WHEN in_b AND NOT in_a THEN 'added'
            WHEN abs(coalesce(effect_b, 0) - coalesce(effect_a, 0)) > tol THEN 'changed' ELSE 'same' END AS status,
       component, layer, nullif(dict_key, '') AS dictionary_id, nullif(feat_key, -1) AS feature_idx, is_error,
       nullif(pos_key, -1) AS position, dictionary_b, feature_b, similarity, node_a, node_b, in_a, in_b,
       effect_a, effect_b, coalesce(effect_b, 0) - coalesce(effect_a, 0) AS delta, rank_a, rank_b,
       rank_a - rank_b AS rank_change
FROM j WHERE in_a OR in_b
ORDER BY abs(delta) DESC, component, layer, feature_idx
"""

# Edges are joined through integer ids of the node keys, so the big join runs on integers: a node
# of A keeps its node_idx, a node of B takes the node_idx of A's node with its key, or a new id
# past A's (node keys are unique within a circuit). A's edges need no keying join at all, and an
# edge is one BIGINT (src id · 2^32 + dst id; both kinds are 'attribution'), so the join hashes one
# integer. The pairs (CTE j) carry ids only; edge_diff labels them with the keys, diff_summary just
# counts them.
_EDGE_PAIRS = f"""
WITH {_MATCHED_NODES},
kb AS (SELECT nb.node_idx, na.node_idx IS NULL AS only_b,
              coalesce(na.node_idx, (SELECT coalesce(max(node_idx), -1) FROM na) + row_number() OVER ()) AS kid
       FROM nb LEFT JOIN na USING ({_KEY_COLUMNS})),
ea AS (SELECT src_idx::BIGINT * 4294967296 + dst_idx AS edge_key, src_idx, dst_idx, weight,
              rank() OVER (ORDER BY abs(weight) DESC) AS rank
       FROM edges WHERE circuit_id = a AND kind = 'attribution'),
eb AS (SELECT s.kid::BIGINT * 4294967296 + d.kid AS edge_key, e.src_idx, e.dst_idx, e.weight,
              rank() OVER (ORDER BY abs(e.weight) DESC) AS rank
       FROM edges e JOIN kb s ON s.node_idx = e.src_idx JOIN kb d ON d.node_idx = e.dst_idx
       WHERE e.circuit_id = b AND e.kind = 'attribution'),
j AS (SELECT edge_key // 4294967296 AS src_kid, edge_key % 4294967296 AS dst_kid, 'attribution' AS kind,
             ea.src_idx AS src_a, ea.dst_idx AS dst_a, eb.src_idx AS src_b,
             eb.dst_idx AS dst_b, ea.weight AS weight_a, eb.weight AS weight_b, ea.rank AS rank_a, eb.rank AS rank_b
      FROM ea FULL JOIN eb USING (edge_key))"""
_EDGE_STATUS = """CASE WHEN weight_b IS NULL THEN 'removed' WHEN weight_a IS NULL THEN 'added'
            WHEN abs(weight_b - weight_a) > tol THEN 'changed' ELSE 'same' END"""

_EDGE_DIFF = f"""{_EDGE_PAIRS},
keys AS (SELECT node_idx AS kid, {_KEY_COLUMNS} FROM na
         UNION ALL
         SELECT kb.kid, {_KEY_COLUMNS} FROM nb JOIN kb USING (node_idx) WHERE kb.only_b)
SELECT {_EDGE_STATUS} AS status,
       s.component AS src_component, s.layer AS src_layer, nullif(s.feat_key, -1) AS src_feature,
       s.is_error AS src_is_error, nullif(s.pos_key, -1) AS src_position,
       d.component AS dst_component, d.layer AS dst_layer, nullif(d.feat_key, -1) AS dst_feature,
       d.is_error AS dst_is_error, nullif(d.pos_key, -1) AS dst_position, kind,
       src_a, dst_a, src_b, dst_b, weight_a, weight_b, coalesce(weight_b, 0) - coalesce(weight_a, 0) AS delta,
       rank_a, rank_b, rank_a - rank_b AS rank_change
FROM j JOIN keys s ON s.kid = j.src_kid JOIN keys d ON d.kid = j.dst_kid
"""

# The edge counts come straight from the joined pairs: the node labels of edge_diff are not needed.
_DIFF_SUMMARY = f"""
SELECT 'nodes' AS element, status, count(*) AS n, sum(abs(delta)) AS total_abs_delta
FROM node_diff_matched(a, b, features, dicts, tol) GROUP BY ALL
UNION ALL
SELECT 'edges', status, count(*), sum(abs(delta)) FROM
({_EDGE_PAIRS} SELECT {_EDGE_STATUS} AS status, coalesce(weight_b, 0) - coalesce(weight_a, 0) AS delta FROM j)
GROUP BY ALL
ORDER BY element DESC, status
"""

# The k strongest paths (|product of edge weights|) from the embedding's nodes to every node.
# Dynamic programming over the DAG: a node's k best paths extend its parents' k best, so each
# step keeps, per node, the k best of the new candidates and what it had (USING KEY (node, rank)
# overwrites a rank's row when a better path arrives), and only changed rows form the next
# frontier. Candidates are deduplicated by path each step.
_CIRCUIT_PATHS = """
WITH RECURSIVE g AS (SELECT src_idx, dst_idx, weight FROM edges WHERE circuit_id = cid AND kind = 'attribution'),
p(node_idx, rank, strength, path) USING KEY (node_idx, rank) AS (
  SELECT node_idx, 1::BIGINT, 1.0::DOUBLE, [node_idx]
  FROM nodes WHERE circuit_id = cid AND component = 'embed' AND node_idx IN (SELECT src_idx FROM g)
  UNION
  (WITH ext AS (SELECT g.dst_idx AS node_idx, p.strength * g.weight AS strength,
                       list_append(p.path, g.dst_idx) AS path
                FROM p JOIN g ON g.src_idx = p.node_idx),
        cand AS (SELECT node_idx, strength, path FROM ext
                 UNION ALL
                 SELECT node_idx, strength, path FROM recurring.p
                 WHERE node_idx IN (SELECT node_idx FROM ext)),
        ranked AS (SELECT node_idx, strength, path,
                          row_number() OVER (PARTITION BY node_idx ORDER BY abs(strength) DESC, path) AS rank
                   FROM (SELECT DISTINCT ON (node_idx, path) * FROM cand))
   SELECT r.node_idx, r.rank, r.strength, r.path FROM ranked r
   WHERE r.rank <= k AND NOT EXISTS (SELECT 1 FROM recurring.p q
                                     WHERE q.node_idx = r.node_idx AND q.rank = r.rank AND q.path = r.path))
)
SELECT node_idx, rank, strength, len(path) - 1 AS hops, path FROM p WHERE len(path) > 1
ORDER BY node_idx, rank
"""

# Nodes within `hops` edges of a node, each with its distance. Breadth first: every step
# extends only the nodes reached for the first time (the frontier, deduplicated).
_NEIGHBOURS = """
WITH RECURSIVE g AS (SELECT src_idx, dst_idx FROM edges WHERE circuit_id = cid AND kind = 'attribution'),
r(node_idx, hops) USING KEY (node_idx) AS (
  SELECT node::BIGINT, 0::BIGINT
  UNION
  SELECT g.{to}, min(r.hops) + 1 FROM r JOIN g ON g.{frm} = r.node_idx
  WHERE r.hops < hops AND g.{to} NOT IN (SELECT node_idx FROM recurring.r)
  GROUP BY g.{to}
)
SELECT n.node_idx, r.hops, n.component, n.layer, n.feature_idx, n.is_error, n.position, n.effect
FROM r JOIN nodes n ON n.circuit_id = cid AND n.node_idx = r.node_idx
WHERE r.hops > 0 ORDER BY r.hops, abs(n.effect) DESC
"""

# An example's text (BOS left out) with the token at position {pos} (BOS is 0) in [brackets].
_MARKED_TEXT = """array_to_string(list_transform(x.clean_tokens[2:],
           lambda w, i: CASE WHEN i = {pos} THEN '[' || w || ']' ELSE w END), ' ')"""

_TOP_EXAMPLES = f"""
SELECT a.task_id, a.example_idx, a.position, x.clean_tokens[a.position + 1] AS token, a.value,
       {_MARKED_TEXT.format(pos="a.position")} AS text
FROM activations a JOIN examples x USING (task_id, example_idx)
WHERE a.dictionary_id = dict AND a.feature_idx = feature
QUALIFY row_number() OVER (PARTITION BY a.task_id, a.example_idx ORDER BY a.value DESC, a.position) = 1
ORDER BY a.value DESC, a.task_id, a.example_idx LIMIT n
"""

# top_examples of many features in one pass over the activations (a picture's or a page's features);
# {source}: the activations read (the view, or given shards: `catalog.examples`).
_FEATURES_EXAMPLES_OF = """
WITH wanted AS (SELECT unnest(dicts) AS dictionary_id, unnest(features) AS feature_idx),
best AS (  -- each example's strongest position (the first of equals): an aggregate, cheaper than a window
    SELECT a.dictionary_id, a.feature_idx, a.task_id, a.example_idx, max(a.value) AS value,
           arg_max(a.position, struct_pack(v := a.value, p := -a.position)) AS position
    FROM {source} a SEMI JOIN wanted USING (dictionary_id, feature_idx)
    -- a looser filter the view's one-row-per-key step lets through to the scan (the join alone is not)
    WHERE list_contains(dicts, a.dictionary_id) AND list_contains(features, a.feature_idx)
    GROUP BY a.dictionary_id, a.feature_idx, a.task_id, a.example_idx),
top AS (
    SELECT * FROM best
    QUALIFY row_number() OVER (PARTITION BY dictionary_id, feature_idx
                               ORDER BY value DESC, task_id, example_idx) <= n)
SELECT b.dictionary_id, b.feature_idx, b.task_id, b.example_idx, b.position,
       x.clean_tokens[b.position + 1] AS token, b.value, """ + _MARKED_TEXT.format(pos="b.position") + """ AS text
FROM top b JOIN examples x USING (task_id, example_idx)
ORDER BY b.dictionary_id, b.feature_idx, b.value DESC, b.task_id, b.example_idx
"""
_FEATURES_EXAMPLES = _FEATURES_EXAMPLES_OF.replace("{source}", "activations")
_FEATURES_EXAMPLES_IN = _FEATURES_EXAMPLES_OF.replace("{source}", "read_parquet(files, union_by_name = true)")

# A circuit's basis: 'neurons' over identity dictionaries, 'parameters' over parameter-space
# directions, else 'features'.
_CIRCUIT_BASIS = """(
SELECT CASE any_value(d.kind) WHEN 'identity' THEN 'neurons' WHEN 'parameter' THEN 'parameters' ELSE 'features' END
FROM nodes n JOIN dictionaries d USING (dictionary_id) WHERE n.circuit_id = cid)
"""

_CIRCUIT_OF = """(
SELECT c.circuit_id FROM circuits c
WHERE c.task_id = task AND circuit_basis(c.circuit_id) = basis
ORDER BY c.created_at DESC LIMIT 1)
"""

# What `cli.py circuits` lists: one row per circuit, newest last; an atlas's per-prompt graphs are
# listed by atlas (`atlas_list`, `cli.py atlas graphs`), not here.
_CIRCUIT_LIST = """
SELECT circuit_id, task_id, method, circuit_basis(circuit_id) AS basis, n_examples, n_nodes, n_edges,
       round(metric_patch - metric_clean, 3) AS total_effect, round(faithfulness, 3) AS faithfulness,
       round(completeness, 3) AS completeness, round(accuracy, 3) AS accuracy, created_at
FROM circuits ANTI JOIN prompts USING (circuit_id)
ORDER BY created_at, task_id
"""

# The Sparse Feature Circuits paper's headline comparison: per task, the fewest nodes whose circuit
# reaches the faithfulness level, over features (SAEs) and over neurons (identity dictionaries).
_NODES_FOR_FAITHFULNESS = """
SELECT task_id,
       min(e.n_nodes) FILTER (WHERE basis = 'sae') AS features,
       min(e.n_nodes) FILTER (WHERE basis = 'identity') AS neurons
FROM evaluations e JOIN circuits USING (circuit_id)
JOIN (SELECT DISTINCT circuit_id, d.kind AS basis
      FROM nodes JOIN dictionaries d USING (dictionary_id)) USING (circuit_id)
WHERE kind = 'faithfulness' AND e.ablation = under AND errors = 'node' AND value >= level
GROUP BY task_id ORDER BY task_id
"""

# What `cli.py dictionaries` lists: every dictionary with its held-out quality.
_DICTIONARY_QUALITY = """
SELECT dictionary_id, hook_name, kind, architecture, d_in, d_sae,
       round(metrics.mse::DOUBLE, 4) AS mse, round(metrics.fraction_variance_explained::DOUBLE, 4) AS fve,
       round(metrics.l0::DOUBLE, 2) AS l0, round(metrics.dead_fraction::DOUBLE, 4) AS dead,
       round(metrics.dense_fraction::DOUBLE, 4) AS dense, round(metrics.loss_clean::DOUBLE, 4) AS loss_clean,
       round(metrics.loss_spliced::DOUBLE, 4) AS loss_spliced,
       round(metrics.loss_recovered::DOUBLE, 4) AS loss_recovered
FROM dictionaries ORDER BY kind, architecture, layer, hook_name
"""

# How far each circuit's effects over a submodule are from the effect of patching it whole: IG's
# quadrature error, AtP's first-order error, exact patching's (single-node) superadditivity.
_COMPLETENESS_ERRORS = """
SELECT circuit_id, task_id, method, ig_steps, ig_rule, p.site, p.n_nodes, p.predicted, p.measured,
       (p.predicted - p.measured) / nullif(abs(p.measured), 0) AS relative_error
FROM predictions p JOIN circuits USING (circuit_id)
WHERE p.all_nodes
ORDER BY created_at, task_id, circuit_id, p.site
"""

# What `cli.py benchmark ground-truth` prints: each discovered circuit of a planted model, scored.
_GROUND_TRUTH_SCORES = """
WITH scores AS (
    SELECT circuit_id, split_part(kind, '_', 1) AS level, split_part(kind, '_', 2) AS measure, n_nodes, value
    FROM evaluations
    WHERE ablation = 'none' AND split_part(kind, '_', 1) IN ('node', 'edge', 'component'))
SELECT p.name AS model, c.task_id, c.method, s.level, max(s.n_nodes) AS n_true,
       max(s.value) FILTER (WHERE s.measure = 'precision') AS precision,
       max(s.value) FILTER (WHERE s.measure = 'recall') AS recall,
       max(s.value) FILTER (WHERE s.measure = 'auroc') AS auroc,
       c.circuit_id
FROM scores s JOIN circuits c USING (circuit_id)
     JOIN (SELECT DISTINCT model_id, name FROM planted_models) p USING (model_id)
GROUP BY p.name, c.task_id, c.method, s.level, c.circuit_id, c.created_at
ORDER BY model, c.task_id, c.method, array_position(['node', 'edge', 'component'], s.level), c.created_at
"""

# What `cli.py edit` prints: an edit's measures, all examples first, then each case.
_EDIT_SUMMARY = """
SELECT edit_id, subset, n_examples, n_features, round(metric_before, 3) AS metric_before,
       round(metric_after, 3) AS metric_after, round(accuracy_before, 3) AS accuracy_before,
       round(accuracy_after, 3) AS accuracy_after
FROM edits WHERE edit_id = eid ORDER BY subset <> 'all', subset
"""

# A node named as the command line names it (catalog.graph.node_name): attn_1/356@14, mlp_0/err@3,
# embed/80@4 (token 80), embed@4 (position 4 over a task's prompts), metric.
_NODE_NAME = """CASE WHEN {n}.component = 'metric' THEN 'metric' ELSE
  (CASE WHEN {n}.component = 'embed' THEN 'embed' ELSE {n}.component || '_' || {n}.layer END) ||
  (CASE WHEN {n}.is_error THEN '/err' ELSE coalesce('/' || {n}.feature_idx, '') END) ||
  coalesce('@' || {n}.position, '')
END"""

# The example whose tokens a circuit's positions refer to: an atlas graph's own prompt, else its
# task's first example (train split first).
_CIRCUIT_EXAMPLE = """coalesce(
    (SELECT prompt_idx FROM prompts WHERE circuit_id = cid),
    (SELECT example_idx FROM examples WHERE task_id = (SELECT task_id FROM circuits WHERE circuit_id = cid)
     ORDER BY split <> 'train', example_idx LIMIT 1))
"""

# Every edge of a circuit with its ends named and its prompt's token at each position (circuit_example):
# a local circuit's attribution, ov (per head) and qk (attention-score) edges read as they are.
_CIRCUIT_EDGES = f"""
SELECT e.kind, {_NODE_NAME.format(n="s")} AS src, x.clean_tokens[s.position + 1] AS src_token,
       {_NODE_NAME.format(n="d")} AS dst, x.clean_tokens[d.position + 1] AS dst_token,
       e.head_layer || '.' || e.head AS head, e.key_position, x.clean_tokens[e.key_position + 1] AS key_token,
       e.weight, e.src_idx, e.dst_idx
FROM (SELECT * FROM edges WHERE circuit_id = cid) e
     JOIN (SELECT * FROM nodes WHERE circuit_id = cid) s ON s.node_idx = e.src_idx
     JOIN (SELECT * FROM nodes WHERE circuit_id = cid) d ON d.node_idx = e.dst_idx
     LEFT JOIN (SELECT clean_tokens FROM examples
                WHERE task_id = (SELECT task_id FROM circuits WHERE circuit_id = cid)
                  AND example_idx = circuit_example(cid)) x ON true
ORDER BY e.kind, abs(e.weight) DESC
"""

# A circuit's in-circuit nodes named, strongest first, each with its example's token there.
_CIRCUIT_NODES = f"""
WITH tokens AS (
    SELECT clean_tokens FROM examples
    WHERE task_id = (SELECT task_id FROM circuits WHERE circuit_id = cid) AND example_idx = circuit_example(cid))
SELECT n.node_idx, {_NODE_NAME.format(n="n")} AS node, coalesce(t.clean_tokens[n.position + 1], '') AS token, n.effect
FROM nodes n LEFT JOIN tokens t ON true
WHERE n.circuit_id = cid AND n.in_circuit AND n.component <> 'metric'
ORDER BY abs(n.effect) DESC, n.node_idx
"""

# Every feature of a dictionary with its top examples (a parameter dictionary's directions, say).
_DICTIONARY_EXAMPLES = """
SELECT f.feature_idx, f.density, f.max_activation, t.value, t.text
FROM features f, LATERAL (SELECT * FROM top_examples(f.dictionary_id, f.feature_idx, n)) t
WHERE f.dictionary_id = dict
ORDER BY f.feature_idx, t.value DESC
"""

# ---- the atlas: questions across the per-prompt graphs of a data set (`prompts` rows) ----
# Group columns of `prompts` a question can split the graphs by ('fields.NAME': a field of the file).
ATLAS_GROUPS = ("all", "label", "correct", "prediction", "answer", "root", "target", "n_tokens")

# Each graph of an atlas with the value of its group; an unknown grouping is an error naming the choices.
_ATLAS_GROUPS = """
SELECT circuit_id, prompt_idx, n_tokens,
  CASE WHEN grouping = 'all' THEN 'all' WHEN grouping = 'label' THEN label WHEN grouping = 'correct' THEN correct::VARCHAR
       WHEN grouping = 'prediction' THEN prediction WHEN grouping = 'answer' THEN answer WHEN grouping = 'root' THEN root
       WHEN grouping = 'target' THEN target WHEN grouping = 'n_tokens' THEN n_tokens::VARCHAR
       WHEN starts_with(grouping, 'fields.') THEN fields->>(grouping[8:])
       ELSE error('grouping ' || grouping || ': choose all, label, correct, prediction, answer, root, target, n_tokens or '
                  || 'fields.NAME') END AS grp
FROM prompts WHERE atlas_id = atlas
"""

# A node named across an atlas's graphs: its feature (or error term, embedding token, metric) and its
# position counted from the end of the prompt (-1: the last token), so prompts of other lengths line
# up. Questions group by its key (a hash of what names it) and name only the rows they return.
_ATLAS_NODE_KEY = "hash({n}.component, {n}.layer, {n}.feature_idx, {n}.is_error, {n}.position - {g}.n_tokens)"
_ATLAS_NODE_NAMES = """
SELECT hash(component, layer, feature_idx, is_error, rel) AS key,
       CASE WHEN component = 'metric' THEN 'metric' ELSE
         (CASE WHEN component = 'embed' THEN 'embed' ELSE component || '_' || layer END) ||
         (CASE WHEN is_error THEN '/err' ELSE coalesce('/' || feature_idx, '') END) || coalesce('@' || rel, '')
       END AS name
FROM (SELECT DISTINCT n.component, n.layer, n.feature_idx, n.is_error, n.position - p.n_tokens AS rel
      FROM nodes n JOIN prompts p USING (circuit_id) WHERE p.atlas_id = atlas)
"""

# Per graph of an atlas: its group, and its nodes' keys and positions as lists (index node_idx + 1),
# so that each edge finds its ends by one join on the graph instead of two on nodes.
_ATLAS_GRAPH_NODES = f"""
SELECT g.circuit_id, any_value(g.grp) AS grp, any_value(g.n_tokens) AS n_tokens, any_value(g.prompt_idx) AS prompt_idx,
       list({_ATLAS_NODE_KEY.format(n="n", g="g")} ORDER BY n.node_idx) AS keys,
       list(n.position ORDER BY n.node_idx) AS positions
FROM nodes n JOIN atlas_groups(atlas, grouping) g USING (circuit_id)
GROUP BY g.circuit_id
"""

_ATLAS_EDGE_KEYS = """
SELECT l.grp, e.circuit_id, l.keys[e.src_idx + 1] AS src_key, l.keys[e.dst_idx + 1] AS dst_key, e.weight
FROM edges e JOIN atlas_graph_nodes(atlas, grouping) l USING (circuit_id)
WHERE e.kind = 'attribution'
"""

_ATLAS_SUMMARY = """
SELECT g.grp, count(*) AS n_graphs, avg(p.correct::INT) AS accuracy, avg(p.probability) AS mean_probability,
       avg(c.n_nodes) AS mean_nodes, avg(c.n_edges) AS mean_edges, avg(p.n_tokens) AS mean_tokens
FROM atlas_groups(atlas, grouping) g JOIN prompts p USING (circuit_id) JOIN circuits c USING (circuit_id)
GROUP BY g.grp ORDER BY n_graphs DESC, g.grp
"""

_ATLAS_LIST = """
SELECT atlas_id, count(*) AS n_graphs, count(DISTINCT label) AS n_labels, avg(correct::INT) AS accuracy,
       count(DISTINCT run_id) AS n_runs, min(r.started_at) AS started_at, max(r.finished_at) AS finished_at
FROM prompts JOIN runs r USING (run_id) GROUP BY atlas_id ORDER BY atlas_id
"""

# In what share of a group's graphs each feature is in the circuit (at any position), and its mean
# influence where it is (summed over its positions in a graph).
_FEATURE_RECURRENCE = """
WITH g AS (SELECT circuit_id, grp FROM atlas_groups(atlas, grouping)),
sizes AS (SELECT grp, count(*) AS n FROM g GROUP BY grp),
f AS (SELECT g.grp, n.circuit_id, n.dictionary_id, n.feature_idx, any_value(n.component) AS component,
             any_value(n.layer) AS layer, sum(n.effect) AS effect
      FROM nodes n JOIN g USING (circuit_id)
      WHERE n.in_circuit AND n.feature_idx IS NOT NULL AND n.dictionary_id IS NOT NULL
      GROUP BY g.grp, n.circuit_id, n.dictionary_id, n.feature_idx)
SELECT * FROM (
    SELECT f.grp, f.dictionary_id, f.feature_idx, any_value(f.component) AS component, any_value(f.layer) AS layer,
           count(*) AS n_graphs, count(*) / any_value(s.n) AS share, avg(f.effect) AS mean_effect
    FROM f JOIN sizes s USING (grp)
    GROUP BY f.grp, f.dictionary_id, f.feature_idx)
WHERE share >= min_share
ORDER BY grp, n_graphs DESC, abs(mean_effect) DESC, dictionary_id, feature_idx
"""

# Pairs of features in the circuits of the same graphs: how often together, Jaccard overlap, and lift
# (together / expected if independent). Only features in at least min_graphs graphs are paired; a
# feature is one BIGINT (its rank) so the pair self-join groups by integers.
_FEATURE_COOCCURRENCE = """
WITH f AS (SELECT DISTINCT n.circuit_id, n.dictionary_id, n.feature_idx
           FROM nodes n JOIN prompts p USING (circuit_id)
           WHERE p.atlas_id = atlas AND n.in_circuit AND n.feature_idx IS NOT NULL AND n.dictionary_id IS NOT NULL),
total AS (SELECT count(*) AS n FROM prompts WHERE atlas_id = atlas),
counts AS (SELECT dictionary_id, feature_idx, count(*) AS n FROM f GROUP BY dictionary_id, feature_idx),
common AS (SELECT *, row_number() OVER (ORDER BY dictionary_id, feature_idx)::BIGINT AS fid
           FROM counts WHERE n >= min_graphs),
cf AS (SELECT f.circuit_id, c.fid FROM f JOIN common c USING (dictionary_id, feature_idx)),
all_pairs AS (SELECT a.fid AS fa, b.fid AS fb, count(*) AS n_both
              FROM cf a JOIN cf b ON a.circuit_id = b.circuit_id AND a.fid < b.fid GROUP BY a.fid, b.fid),
pairs AS (SELECT * FROM all_pairs WHERE n_both >= min_graphs)
SELECT ca.dictionary_id AS dictionary_a, ca.feature_idx AS feature_a, cb.dictionary_id AS dictionary_b,
       cb.feature_idx AS feature_b, p.n_both, ca.n AS n_a, cb.n AS n_b,
       p.n_both / (ca.n + cb.n - p.n_both) AS jaccard, p.n_both * t.n / (ca.n * cb.n) AS lift
FROM pairs p JOIN common ca ON ca.fid = p.fa JOIN common cb ON cb.fid = p.fb, total t
ORDER BY jaccard DESC, n_both DESC, dictionary_a, feature_a, dictionary_b, feature_b
"""

# The attention heads that carry the most of the root along the graphs' kept edges (ov edges hold
# each head's part of an edge's flow), per position class: the move's source and destination
# positions counted from the prompt's end, with the source token of its strongest move.
_HEAD_FLOW = """
WITH l AS (SELECT * FROM atlas_graph_nodes(atlas, grouping)),
sizes AS (SELECT grp, count(*) AS n FROM l GROUP BY grp),
per_graph AS (  -- one row per graph, head and position class
    SELECT l.grp, e.head_layer, e.head, l.positions[e.src_idx + 1] - l.n_tokens AS src_from_end,
           l.positions[e.dst_idx + 1] - l.n_tokens AS dst_from_end, sum(abs(e.weight)) AS flow,
           any_value(l.prompt_idx) AS prompt_idx, any_value(l.positions[e.src_idx + 1]) AS src_position
    FROM edges e JOIN l USING (circuit_id)
    WHERE e.kind = 'ov'
    GROUP BY e.circuit_id, l.grp, e.head_layer, e.head, src_from_end, dst_from_end),
agg AS (SELECT grp, head_layer, head, src_from_end, dst_from_end, count(*) AS n_graphs, sum(flow) AS flow,
               arg_max(prompt_idx, flow) AS prompt_idx, arg_max(src_position, flow) AS src_position
        FROM per_graph GROUP BY ALL)
SELECT a.grp, a.head_layer || '.' || a.head AS head, a.src_from_end, a.dst_from_end, a.n_graphs,
       a.n_graphs / s.n AS share, a.flow / s.n AS mean_flow, x.clean_tokens[a.src_position + 1] AS src_token
FROM agg a JOIN sizes s USING (grp)
LEFT JOIN examples x ON x.task_id = atlas AND x.example_idx = a.prompt_idx
ORDER BY a.grp, mean_flow DESC, head, a.src_from_end, a.dst_from_end
"""

# An atlas's attribution edges named across graphs (`_ATLAS_NODE_NAMES` at both ends), one row per graph
# and named edge (a graph holds a named edge once: positions are part of the name).
_ATLAS_EDGES = """
SELECT k.grp, k.circuit_id, s.name AS src, d.name AS dst, k.weight
FROM atlas_edge_keys(atlas, grouping) k
JOIN atlas_node_names(atlas) s ON s.key = k.src_key JOIN atlas_node_names(atlas) d ON d.key = k.dst_key
"""

# The edges that separate two groups of graphs: each edge's mean flow over every graph of a group (0
# where a graph lacks it), the share of graphs holding it, and Cohen's d (the difference of the means
# over the pooled standard deviation); strongest separation first.
_EDGE_CONTRAST = """
WITH sizes AS (SELECT grp, count(*) AS n FROM atlas_groups(atlas, grouping) WHERE grp IN (a, b) GROUP BY grp),
per AS (SELECT src_key, dst_key, grp, count(*) AS k, sum(weight) AS s1, sum(weight * weight) AS s2
        FROM atlas_edge_keys(atlas, grouping) WHERE grp IN (a, b) GROUP BY src_key, dst_key, grp),
wide AS (SELECT src_key, dst_key,
                coalesce(sum(k) FILTER (WHERE grp = a), 0) AS k_a, coalesce(sum(s1) FILTER (WHERE grp = a), 0) AS s1_a,
                coalesce(sum(s2) FILTER (WHERE grp = a), 0) AS s2_a,
                coalesce(sum(k) FILTER (WHERE grp = b), 0) AS k_b, coalesce(sum(s1) FILTER (WHERE grp = b), 0) AS s1_b,
                coalesce(sum(s2) FILTER (WHERE grp = b), 0) AS s2_b
         FROM per GROUP BY src_key, dst_key),
stats AS (SELECT w.*, na.n AS n_a, nb.n AS n_b, s1_a / na.n AS mean_a, s1_b / nb.n AS mean_b,
                 s2_a / na.n - (s1_a / na.n) ^ 2 AS var_a, s2_b / nb.n - (s1_b / nb.n) ^ 2 AS var_b
          FROM wide w, (SELECT n FROM sizes WHERE grp = a) na, (SELECT n FROM sizes WHERE grp = b) nb)
SELECT s.name AS src, d.name AS dst, mean_a, mean_b, mean_a - mean_b AS difference, k_a / n_a AS share_a,
       k_b / n_b AS share_b,
       CASE WHEN n_a + n_b > 2 AND (n_a * var_a + n_b * var_b) > 0
            THEN (mean_a - mean_b) / sqrt((n_a * var_a + n_b * var_b) / (n_a + n_b - 2)) END AS effect_size
FROM stats JOIN atlas_node_names(atlas) s ON s.key = src_key JOIN atlas_node_names(atlas) d ON d.key = dst_key
ORDER BY abs(effect_size) DESC NULLS LAST, abs(difference) DESC, src, dst
"""

# A group's typical graph: the edges in at least min_share of its graphs, with their mean flow where present.
_TYPICAL_GRAPH = """
WITH n AS (SELECT count(*) AS n FROM atlas_groups(atlas, grouping) WHERE grp = value)
SELECT s.name AS src, d.name AS dst, n_graphs, share, mean_weight FROM (
    SELECT src_key, dst_key, count(*) AS n_graphs, count(*) / any_value(n.n) AS share, avg(weight) AS mean_weight
    FROM atlas_edge_keys(atlas, grouping), n WHERE grp = value GROUP BY src_key, dst_key)
JOIN atlas_node_names(atlas) s ON s.key = src_key JOIN atlas_node_names(atlas) d ON d.key = dst_key
WHERE share >= min_share
ORDER BY share DESC, abs(mean_weight) DESC, src, dst
"""

# An atlas's supernodes: the members of its newest grouping (`cli.py atlas supernodes`).
_ATLAS_SUPERNODES = """
SELECT s.supernode, s.dictionary_id, s.feature_idx, s.component, s.layer, s.n_graphs, s.run_id
FROM supernodes s
WHERE s.run_id = (SELECT run_id FROM runs WHERE kind = 'supernodes' AND params->>'atlas' = atlas AND status = 'ok'
                  ORDER BY finished_at DESC, run_id DESC LIMIT 1)
ORDER BY TRY_CAST(regexp_extract(s.supernode, '^S([0-9]+)', 1) AS INTEGER), s.n_graphs DESC, s.dictionary_id,
         s.feature_idx
"""

# A graph read at the supernode level: each feature of a supernode is replaced by it (at its position),
# and the attribution edges between the same two ends are summed.
_SUPERNODE_GRAPH = f"""
WITH sn AS (SELECT * FROM atlas_supernodes(atlas)),
n AS (SELECT n.node_idx, coalesce(sn.supernode || coalesce('@' || n.position, ''), {_NODE_NAME.format(n="n")}) AS name,
             sn.supernode IS NOT NULL AS grouped
      FROM nodes n LEFT JOIN sn USING (dictionary_id, feature_idx) WHERE n.circuit_id = cid)
SELECT s.name AS src, d.name AS dst, sum(e.weight) AS weight, count(*) AS n_edges, s.grouped OR d.grouped AS grouped
FROM edges e JOIN n s ON s.node_idx = e.src_idx JOIN n d ON d.node_idx = e.dst_idx
WHERE e.circuit_id = cid AND e.kind = 'attribution'
GROUP BY s.name, d.name, s.grouped, d.grouped
ORDER BY abs(sum(e.weight)) DESC, src, dst
"""

NAMED_QUERIES = [
    NamedQuery("circuit_basis", "cid", "(scalar) 'features', 'neurons' (identity dictionaries) or 'parameters'",
               _CIRCUIT_BASIS, scalar=True),
    NamedQuery("circuit_of", "task, basis := 'features'",
               "(scalar) the newest circuit of a task over features or neurons, for the other queries' arguments",
               _CIRCUIT_OF, scalar=True),
    NamedQuery("circuit_example", "cid", "(scalar) the example a circuit's positions refer to: an atlas graph's "
               "prompt, else its task's first example", _CIRCUIT_EXAMPLE, scalar=True),
    NamedQuery("circuit_features", "ids, k := NULL",
               "features of the circuits in the list ids (in-circuit, or each circuit's k strongest), "
               "effects summed over positions, with their rank", _CIRCUIT_FEATURES),
    NamedQuery("shared_features", "ids, k := NULL",
               "per feature of those circuits: how many hold it, whether all do, the one it is unique to",
               _SHARED_FEATURES),
    NamedQuery("feature_overlap", "ids, k := NULL",
               "per pair of circuits: shared features, Jaccard overlap, rank correlation of shared effects",
               _FEATURE_OVERLAP),
    NamedQuery("node_diff_matched", "a, b, features, dicts, tol := 1e-9",
               "node_diff with B's features relabelled by a decoder-cosine match (catalog.diff builds it)",
               _NODE_DIFF),
    NamedQuery("edge_diff_matched", "a, b, features, dicts, tol := 1e-9",
               "edge_diff with B's features relabelled by a decoder-cosine match (catalog.diff builds it)",
               _EDGE_DIFF),
    NamedQuery("node_diff", "a, b, tol := 1e-9",
               "nodes of circuit b against circuit a: added, removed, changed or same, effect delta, rank change",
               "SELECT * FROM node_diff_matched(a, b, [], [], tol)"),
    NamedQuery("edge_diff", "a, b, tol := 1e-9",
               "edges of circuit b against circuit a: added, removed, changed or same, weight delta, rank change",
               "SELECT * FROM edge_diff_matched(a, b, [], [], tol)"),
    NamedQuery("diff_summary_matched", "a, b, features, dicts, tol := 1e-9",
               "diff_summary with a decoder-cosine match", _DIFF_SUMMARY),
    NamedQuery("diff_summary", "a, b, tol := 1e-9",
               "counts of added, removed, changed and same nodes and edges, with the total |delta|",
               "SELECT * FROM diff_summary_matched(a, b, [], [], tol)"),
    NamedQuery("circuit_paths", "cid, k := 5",
               "the k strongest paths (|product of weights|) from the embedding to every node", _CIRCUIT_PATHS),
    NamedQuery("circuit_edges", "cid",
               "every edge of a circuit (attribution, and a local circuit's ov and qk) with its ends named "
               "and the prompt's tokens", _CIRCUIT_EDGES),
    NamedQuery("circuit_nodes", "cid",
               "a circuit's in-circuit nodes named as the command line names them, strongest first, with the "
               "token at each one's position (first example)", _CIRCUIT_NODES),
    NamedQuery("ancestors", "cid, node, hops := 2",
               "nodes with a path of at most hops edges into node, with the distance",
               _NEIGHBOURS.format(frm="dst_idx", to="src_idx")),
    NamedQuery("descendants", "cid, node, hops := 2",
               "nodes reached from node in at most hops edges, with the distance",
               _NEIGHBOURS.format(frm="src_idx", to="dst_idx")),
    NamedQuery("top_examples", "dict, feature, n := 10",
               "a feature's top activating examples: the prompt, its strongest token in [brackets]", _TOP_EXAMPLES),
    NamedQuery("features_examples", "dicts, features, n := 10",
               "top_examples of many features at once (a list of dictionary ids and one of feature indices), "
               "n per feature", _FEATURES_EXAMPLES),
    NamedQuery("features_examples_in", "files, dicts, features, n := 10",
               "features_examples over the given activation shards only (`catalog.examples` merges them in)",
               _FEATURES_EXAMPLES_IN),
    NamedQuery("dictionary_examples", "dict, n := 10",
               "every feature of a dictionary with its density, largest value and top n examples",
               _DICTIONARY_EXAMPLES),
    NamedQuery("circuit_list", "", "every circuit with its basis, size, total effect, faithfulness and accuracy "
               "(an atlas's per-prompt graphs are listed by atlas)",
               _CIRCUIT_LIST),
    NamedQuery("nodes_for_faithfulness", "level := 0.8, under := 'mean'",
               "per task, the fewest nodes reaching faithfulness >= level (under that ablation), over features "
               "and over neurons",
               _NODES_FOR_FAITHFULNESS),
    NamedQuery("dictionary_quality", "", "every dictionary with its held-out quality (MSE, FVE, L0, dead, dense, "
               "loss recovered)", _DICTIONARY_QUALITY),
    NamedQuery("completeness_errors", "",
               "per circuit and submodule, the sum of its node effects beside the effect of patching the "
               "submodule whole, and their relative difference", _COMPLETENESS_ERRORS),
    NamedQuery("ground_truth_scores", "",
               "each circuit discovered in a planted model, scored against the planted circuit: node, edge and "
               "component precision and recall at its thresholds, and AUROC over every candidate",
               _GROUND_TRUTH_SCORES),
    NamedQuery("edit_summary", "eid", "an edit's measures before and after, all examples and each case",
               _EDIT_SUMMARY),
    NamedQuery("atlas_groups", "atlas, grouping := 'all'",
               "each graph of an atlas with its group: grouping all, label, correct, prediction, answer, root, target, "
               "n_tokens or fields.NAME", _ATLAS_GROUPS),
    NamedQuery("atlas_node_names", "atlas", "each node key of an atlas with its name across graphs",
               _ATLAS_NODE_NAMES),
    NamedQuery("atlas_graph_nodes", "atlas, grouping", "per graph: group, node keys and positions as lists",
               _ATLAS_GRAPH_NODES),
    NamedQuery("atlas_edge_keys", "atlas, grouping", "attribution edges with their ends' keys", _ATLAS_EDGE_KEYS),
    NamedQuery("atlas_list", "", "every atlas (data set of per-prompt graphs): graphs, labels, accuracy, runs",
               _ATLAS_LIST),
    NamedQuery("atlas_summary", "atlas, grouping := 'label'",
               "an atlas's graphs per group: how many, the model's accuracy and mean probability, mean size",
               _ATLAS_SUMMARY),
    NamedQuery("feature_recurrence", "atlas, grouping := 'all', min_share := 0",
               "per group and feature: in how many of the group's graphs it is in the circuit, that share, "
               "its mean influence there", _FEATURE_RECURRENCE),
    NamedQuery("feature_cooccurrence", "atlas, min_graphs := 10",
               "pairs of features in the circuits of the same graphs: together, each alone, Jaccard, lift",
               _FEATURE_COOCCURRENCE),
    NamedQuery("head_flow", "atlas, grouping := 'all'",
               "per group, attention head and position class (source and destination counted from the "
               "prompt's end): the share of graphs it moves something in, its mean flow, the source token of "
               "its strongest move", _HEAD_FLOW),
    NamedQuery("atlas_edges", "atlas, grouping := 'all'",
               "every attribution edge of an atlas's graphs, its ends named across graphs (positions counted "
               "from the end: mlp_1/12@-1)", _ATLAS_EDGES),
    NamedQuery("edge_contrast", "atlas, grouping, a, b",
               "the edges that separate group a from group b: mean flow in each (0 where absent), share of "
               "graphs holding it, Cohen's d", _EDGE_CONTRAST),
    NamedQuery("atlas_supernodes", "atlas",
               "the members of an atlas's newest supernodes (`cli.py atlas supernodes`): features that play one role",
               _ATLAS_SUPERNODES),
    NamedQuery("supernode_graph", "atlas, cid",
               "a graph of the atlas read at the supernode level: supernode members merged, edges between the "
               "same two ends summed", _SUPERNODE_GRAPH),
    NamedQuery("typical_graph", "atlas, grouping, value, min_share := 0.5",
               "a group's typical graph: the edges in at least min_share of its graphs, with their mean flow",
               _TYPICAL_GRAPH),
]

# Internal helpers: created in the catalogue but not listed (they back the public ones).
HIDDEN = {"circuit_basis", "circuit_example", "features_examples_in", "atlas_node_names", "atlas_graph_nodes", "atlas_edge_keys", "node_diff_matched", "edge_diff_matched", "diff_summary_matched"}


def macros_hash() -> str:
    """Fingerprint of every macro and view definition: a catalogue whose stored one differs gets them
    anew (a view that starts keeping one row per key reaches catalogues made before it did)."""
    from schema.derive import view_sql
    from schema.tables import TABLES

    views = [view_sql(name, f"runs/*/{name}.parquet") for name in TABLES]
    return hashlib.sha256("\n".join([q.create_sql() for q in NAMED_QUERIES] + views).encode()).hexdigest()[:16]


def create_macros(con) -> None:
    """Create (or replace) every named query in a DuckDB connection (order matters: users first)."""
    for q in NAMED_QUERIES:
        con.execute(q.create_sql())


def listed() -> list[NamedQuery]:
    return [q for q in NAMED_QUERIES if q.name not in HIDDEN]
