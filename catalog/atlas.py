"""Questions across an atlas: the per-prompt graphs of a data set (`cli.py attribute --prompts`).

Each function runs one named query (`catalog.macros`, callable from SQL as well) and returns a
DataFrame. Graphs are split into groups by a column of `prompts` (`grouping`: label, correct,
prediction, answer, root, target, n_tokens, fields.NAME for a field of the file, or all), and
nodes are named across graphs by their feature and their position counted from the prompt's end
(`mlp_1/12@-1`), so prompts of other lengths line up.

    import catalog
    from catalog import atlas
    cat = catalog.open("circuits")
    atlas.recurrence(cat, "agreement", grouping="label", min_share=0.05)
    atlas.contrast(cat, "agreement", "correct", "true", "false")
"""

from __future__ import annotations

import pandas as pd

from catalog.errors import UserError
from catalog.macros import ATLAS_GROUPS
from catalog.store import Catalog


def names(cat: Catalog) -> pd.DataFrame:
    """Every atlas with its number of graphs, labels, accuracy and runs."""
    return cat.sql("SELECT * FROM atlas_list()")


def check(cat: Catalog, atlas: str, grouping: str = "all") -> None:
    """Refuse an atlas the catalogue does not hold, or a grouping that is not a column of prompts."""
    held = cat.sql("SELECT DISTINCT atlas_id FROM prompts ORDER BY 1").atlas_id.tolist()
    if atlas not in held:
        raise UserError(f"no atlas {atlas!r} in the catalogue; atlases: {', '.join(held) or 'none yet'} "
                        "(make one with `cli.py attribute --prompts FILE`)")
    if grouping not in ATLAS_GROUPS and not (grouping.startswith("fields.") and len(grouping) > 7):
        raise UserError(f"grouping {grouping!r}: choose {', '.join(ATLAS_GROUPS)} or fields.NAME")


def _groups(cat: Catalog, atlas: str, grouping: str, *values: str) -> None:
    """Refuse group values the atlas does not have under this grouping."""
    held = cat.sql("SELECT DISTINCT grp FROM atlas_groups(?, ?) WHERE grp IS NOT NULL ORDER BY 1",
                   [atlas, grouping]).grp.tolist()
    for v in values:
        if v not in held:
            raise UserError(f"atlas {atlas!r} has no group {v!r} by {grouping}; its groups: "
                            f"{', '.join(held[:20])}{' ...' if len(held) > 20 else ''}")


def graphs(cat: Catalog, atlas: str) -> pd.DataFrame:
    """One row per graph: its circuit, the prompt and its metadata."""
    check(cat, atlas)
    return cat.sql("SELECT p.prompt_idx, x.clean_prefix AS prompt, p.* EXCLUDE (prompt_idx, atlas_id) "
                   "FROM prompts p JOIN examples x ON x.task_id = p.atlas_id AND x.example_idx = p.prompt_idx "
                   "WHERE p.atlas_id = ? ORDER BY p.prompt_idx", [atlas])


def summary(cat: Catalog, atlas: str, grouping: str = "label") -> pd.DataFrame:
    check(cat, atlas, grouping)
    return cat.sql("SELECT * FROM atlas_summary(?, ?)", [atlas, grouping])


def recurrence(cat: Catalog, atlas: str, grouping: str = "all", min_share: float = 0.0) -> pd.DataFrame:
    """Per group and feature: in how many graphs it is in the circuit, that share, its mean influence."""
    check(cat, atlas, grouping)
    return cat.sql("SELECT * FROM feature_recurrence(?, ?, ?)", [atlas, grouping, min_share])


def cooccurrence(cat: Catalog, atlas: str, min_graphs: int = 10) -> pd.DataFrame:
    """Pairs of features in the circuits of the same graphs (each in at least min_graphs graphs)."""
    check(cat, atlas)
    return cat.sql("SELECT * FROM feature_cooccurrence(?, ?)", [atlas, min_graphs])


def head_flow(cat: Catalog, atlas: str, grouping: str = "all") -> pd.DataFrame:
    """Per group, head and position class: the share of graphs it moves something in and its mean flow."""
    check(cat, atlas, grouping)
    return cat.sql("SELECT * FROM head_flow(?, ?)", [atlas, grouping])


def contrast(cat: Catalog, atlas: str, grouping: str, a: str, b: str) -> pd.DataFrame:
    """The edges that separate group a from group b, strongest effect size first."""
    check(cat, atlas, grouping)
    _groups(cat, atlas, grouping, a, b)
    return cat.sql("SELECT * FROM edge_contrast(?, ?, ?, ?)", [atlas, grouping, a, b])


def typical(cat: Catalog, atlas: str, grouping: str, value: str, min_share: float = 0.5) -> pd.DataFrame:
    """A group's typical graph: the edges in at least min_share of its graphs."""
    check(cat, atlas, grouping)
    _groups(cat, atlas, grouping, value)
    return cat.sql("SELECT * FROM typical_graph(?, ?, ?, ?)", [atlas, grouping, value, min_share])


def supernodes(cat: Catalog, atlas: str) -> pd.DataFrame:
    """The members of the atlas's newest supernodes (none yet: an empty frame)."""
    check(cat, atlas)
    return cat.sql("SELECT * FROM atlas_supernodes(?)", [atlas])


def graph(cat: Catalog, atlas: str, prompt_idx: int, by_supernode: bool = False) -> pd.DataFrame:
    """One prompt's graph: its edges (`circuit_edges`), or read at the supernode level."""
    check(cat, atlas)
    cid = cat.sql("SELECT circuit_id FROM prompts WHERE atlas_id = ? AND prompt_idx = ?", [atlas, prompt_idx])
    if cid.empty:
        raise UserError(f"atlas {atlas!r} has no graph of prompt {prompt_idx}")
    if by_supernode:
        return cat.sql("SELECT * FROM supernode_graph(?, ?)", [atlas, cid.circuit_id[0]])
    return cat.sql("SELECT * FROM circuit_edges(?) WHERE kind = 'attribution'", [cid.circuit_id[0]])
