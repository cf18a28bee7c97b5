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

# top_examples of many features in one pass over the activations (a picture's or a page's features).
_FEATURES_EXAMPLES = f"""
WITH wanted AS (SELECT unnest(dicts) AS dictionary_id, unnest(features) AS feature_idx),
best AS (
    SELECT a.dictionary_id, a.feature_idx, a.task_id, a.example_idx, a.position, a.value
    FROM activations a SEMI JOIN wanted USING (dictionary_id, feature_idx)
    QUALIFY row_number() OVER (PARTITION BY a.dictionary_id, a.feature_idx, a.task_id, a.example_idx
                               ORDER BY a.value DESC, a.position) = 1),
top AS (
    SELECT * FROM best
    QUALIFY row_number() OVER (PARTITION BY dictionary_id, feature_idx
                               ORDER BY value DESC, task_id, example_idx) <= n)
SELECT b.dictionary_id, b.feature_idx, b.task_id, b.example_idx, b.position,
       x.clean_tokens[b.position + 1] AS token, b.value, {_MARKED_TEXT.format(pos="b.position")} AS text
FROM top b JOIN examples x USING (task_id, example_idx)
ORDER BY b.dictionary_id, b.feature_idx, b.value DESC, b.task_id, b.example_idx
"""

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

# What `cli.py circuits` lists: one row per circuit, newest last.
_CIRCUIT_LIST = """
SELECT circuit_id, task_id, method, circuit_basis(circuit_id) AS basis, n_examples, n_nodes, n_edges,
       round(metric_patch - metric_clean, 3) AS total_effect, round(faithfulness, 3) AS faithfulness,
       round(completeness, 3) AS completeness, round(accuracy, 3) AS accuracy, created_at
FROM circuits ORDER BY created_at, task_id
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

# Every edge of a circuit with its ends named and the (first) prompt's token at each position: a
# local circuit's attribution, ov (per head) and qk (attention-score) edges read as they are.
_CIRCUIT_EDGES = f"""
SELECT e.kind, {_NODE_NAME.format(n="s")} AS src, x.clean_tokens[s.position + 1] AS src_token,
       {_NODE_NAME.format(n="d")} AS dst, x.clean_tokens[d.position + 1] AS dst_token,
       e.head_layer || '.' || e.head AS head, e.key_position, x.clean_tokens[e.key_position + 1] AS key_token,
       e.weight, e.src_idx, e.dst_idx
FROM edges e JOIN circuits c USING (circuit_id)
     JOIN nodes s ON s.circuit_id = e.circuit_id AND s.node_idx = e.src_idx
     JOIN nodes d ON d.circuit_id = e.circuit_id AND d.node_idx = e.dst_idx
     LEFT JOIN examples x ON x.task_id = c.task_id AND x.example_idx = 0
WHERE e.circuit_id = cid
ORDER BY e.kind, abs(e.weight) DESC
"""

# A circuit's in-circuit nodes named, strongest first, each with its first example's token there.
_CIRCUIT_NODES = f"""
WITH tokens AS (
    SELECT clean_tokens FROM examples
    WHERE task_id = (SELECT task_id FROM circuits WHERE circuit_id = cid)
    ORDER BY split <> 'train', example_idx LIMIT 1)
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

NAMED_QUERIES = [
    NamedQuery("circuit_basis", "cid", "(scalar) 'features', 'neurons' (identity dictionaries) or 'parameters'",
               _CIRCUIT_BASIS, scalar=True),
    NamedQuery("circuit_of", "task, basis := 'features'",
               "(scalar) the newest circuit of a task over features or neurons, for the other queries' arguments",
               _CIRCUIT_OF, scalar=True),
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
    NamedQuery("dictionary_examples", "dict, n := 10",
               "every feature of a dictionary with its density, largest value and top n examples",
               _DICTIONARY_EXAMPLES),
    NamedQuery("circuit_list", "", "every circuit with its basis, size, total effect, faithfulness and accuracy",
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
]

# Internal helpers: created in the catalogue but not listed (they back the public ones).
HIDDEN = {"circuit_basis", "node_diff_matched", "edge_diff_matched", "diff_summary_matched"}


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
