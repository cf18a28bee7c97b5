"""Circuits and diffs as one self-contained HTML file with inline SVG (no network needed to view).

Layers are rows, from the embedding at the bottom to the metric at the top; token positions
are columns when effects are per position. A node's colour is its effect (red positive, blue
negative; error terms are squares), an edge's width its |weight| (red positive, blue
negative). Each feature carries a short label, the tokens it fires on most in its top
examples; hovering a node shows its human label, density and top activating examples. A diff
colours nodes and edges by status: added green, removed red, changed amber, same grey.
The explorer (`catalog.explorer`) draws the same SVG (`to_svg`) inside its pages.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from catalog.diff import Diff, diff
from catalog.examples import top_examples
from catalog.graph import check_circuit, circuit_example, circuit_nodes, node_name, signed
from catalog.store import Catalog
from schema.sites import METRIC, row_names, site_name

STATUS_COLOURS = {"added": "#1a9850", "removed": "#d73027", "changed": "#f29e0c", "same": "#9e9e9e"}
POSITIVE, NEGATIVE = "#c0392b", "#2f6db5"
ROW_H, NODE_W, MARGIN_L, MARGIN_T, RADIUS = 64, 24, 110, 64, 8


@dataclass
class DrawNode:
    key: tuple  # structural key, shared by both circuits in a diff
    row: str  # embed, attn_0, ..., metric
    position: int | None
    fill: str
    square: bool
    title: str
    css: str = ""
    label: str = ""  # a few characters under (or over) the node: the feature's top tokens
    node_idx: int | None = None  # the node's row in `nodes` (a circuit's picture; None in a diff)
    x: float = 0.0
    y: float = 0.0
    label_above: bool = False  # neighbours' labels alternate below and above, so they do not overlap


@dataclass
class DrawEdge:
    src: tuple
    dst: tuple
    width: float
    colour: str
    title: str
    strength: float = 0.0  # |weight| (the larger of both circuits' in a diff), for thresholds


@dataclass
class Picture:
    title: str
    subtitle: str
    rows: list[str]
    tokens: list[str]
    nodes: list[DrawNode]
    edges: list[DrawEdge]
    legend: list[tuple[str, str]] = field(default_factory=list)
    hidden: int = 0


def _key(r) -> tuple:
    return (r.component, int(r.layer), bool(r.is_error), -1 if pd.isna(r.feature_idx) else int(r.feature_idx),
            -1 if pd.isna(r.position) else int(r.position))


def _end_key(r, end: str) -> tuple:
    """The node key of an edge_diff row's source (end='src') or destination ('dst')."""
    feature, position = getattr(r, f"{end}_feature"), getattr(r, f"{end}_position")
    return (getattr(r, f"{end}_component"), int(getattr(r, f"{end}_layer")), bool(getattr(r, f"{end}_is_error")),
            -1 if pd.isna(feature) else int(feature), -1 if pd.isna(position) else int(position))


def _row(r) -> str:
    return site_name(r.component, r.layer)


def effect_colour(v: float, lim: float) -> str:
    """Diverging white -> red (positive) / blue (negative), by |v| / lim."""
    t = min(abs(v) / lim, 1.0) if lim > 0 else 0.0
    end = (192, 57, 43) if v >= 0 else (47, 109, 181)
    rgb = [round(255 + (e - 255) * (0.15 + 0.85 * t)) for e in end]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


@dataclass
class Examples:
    """The drawn features' top activating examples, per (dictionary_id, feature_idx)."""
    lines: dict[tuple, list[str]]  # 'text with the [token] marked (value)'
    tokens: dict[tuple, list[str]]  # the marked tokens, strongest example first

    def label(self, key: tuple, max_chars: int = 9) -> str:
        """A short label: the distinct tokens the feature fires on most, joined by '/', cut to max_chars."""
        text = "/".join(dict.fromkeys(self.tokens.get(key, [])))
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _examples(cat: Catalog, nodes: pd.DataFrame, n: int = 3) -> Examples:
    """Top activating examples of the drawn features (n each)."""
    feats = nodes[nodes.feature_idx.notna()][["dictionary_id", "feature_idx"]].drop_duplicates()
    out = Examples({}, {})
    if feats.empty:
        return out
    df = top_examples(cat, list(zip(feats.dictionary_id, feats.feature_idx.astype(int), strict=True)), n)
    for r in df.itertuples():
        key = (r.dictionary_id, int(r.feature_idx))
        out.lines.setdefault(key, []).append(f"{r.text} ({r.value:.2f})")
        out.tokens.setdefault(key, []).append(str(r.token))
    return out


def _short_label(r, examples: Examples) -> str:
    """What is written by a node: 'err' for an error term, the feature's top tokens, else nothing."""
    if r.is_error:
        return "err"
    if pd.isna(r.feature_idx):
        return ""
    return examples.label((r.dictionary_id, int(r.feature_idx)))


def _node_title(r, examples: Examples, extra: str = "") -> str:
    lines = [node_name(r) + extra]
    if isinstance(getattr(r, "label", None), str) and r.label:
        lines.append(f"label: {r.label}")
    if not pd.isna(getattr(r, "density", float("nan"))):
        lines.append(f"density {r.density:.4f}, max activation {r.max_activation:.3f}")
    if not pd.isna(r.feature_idx):
        ex = examples.lines.get((r.dictionary_id, int(r.feature_idx)), [])
        lines += ["top examples:", *(f"  {e}" for e in ex)] if ex else ["no stored activations"]
    return "\n".join(lines)


def _keep_strongest(df: pd.DataFrame, strength: pd.Series, max_per_row: int) -> tuple[pd.DataFrame, int]:
    """At most max_per_row nodes per row and position (the strongest); returns (kept, hidden count)."""
    df = df.assign(_s=strength.abs().values, _row=[_row(r) for r in df.itertuples()],
                   _pos=df.position.fillna(-1).astype(int))
    kept = df.sort_values("_s", ascending=False).groupby(["_row", "_pos"]).head(max_per_row)
    return kept.drop(columns=["_s", "_row", "_pos"]), len(df) - len(kept)


def circuit_picture(cat: Catalog, circuit_id: str, max_per_row: int = 40, row: pd.Series | None = None,
                    tokens: list[str] | None = None, edges: pd.DataFrame | None = None) -> Picture:
    """A circuit's picture; `row` (its circuits row), `tokens` (its example's) and `edges` (its edges: kind,
    src_idx, dst_idx, weight) when the caller has them."""
    c = check_circuit(cat, circuit_id) if row is None else row
    nodes = circuit_nodes(cat, circuit_id)
    nodes, hidden = _keep_strongest(nodes, nodes.effect, max_per_row)
    lim = float(nodes[nodes.component != METRIC].effect.abs().max() or 1.0) if len(nodes) else 1.0
    examples = _examples(cat, nodes)
    draw = [DrawNode(_key(r), _row(r), None if pd.isna(r.position) else int(r.position),
                     "#444444" if r.component == METRIC else effect_colour(r.effect, lim), bool(r.is_error),
                     _node_title(r, examples, f"  effect {r.effect:+.3f}"), label=_short_label(r, examples),
                     node_idx=int(r.node_idx)) for r in nodes.itertuples()]
    by_idx = {int(r.node_idx): _key(r) for r in nodes.itertuples()}
    if edges is None:
        edges = cat.sql("SELECT src_idx, dst_idx, weight FROM edges WHERE circuit_id = ? AND kind = 'attribution'",
                        [circuit_id])
    else:
        edges = edges.loc[edges.kind == "attribution", ["src_idx", "dst_idx", "weight"]]
    edges = edges[edges.src_idx.isin(by_idx.keys()) & edges.dst_idx.isin(by_idx.keys())]
    wmax = float(edges.weight.abs().max()) if len(edges) else 1.0
    names = {int(r.node_idx): node_name(r) for r in nodes.itertuples()}
    draw_edges = [DrawEdge(by_idx[s], by_idx[d], 0.4 + 5.6 * abs(w) / wmax, POSITIVE if w >= 0 else NEGATIVE,
                           f"{names[s]} -> {names[d]}: {w:+.4f}", abs(w)) for s, d, w in edges.itertuples(index=False)]
    per_position = nodes.position.notna().any()
    return Picture(
        title=f"{c.task_id}: circuit {circuit_id}",
        subtitle=f"{c.method}, {c.aggregation} aggregation, model {c.model_id}; {len(draw)} nodes, "
                 f"{len(draw_edges)} edges; faithfulness {signed(c.faithfulness)}",
        rows=row_names(_n_layers(nodes)), nodes=draw, edges=draw_edges, hidden=hidden,
        tokens=(circuit_example(cat, circuit_id)[0] if tokens is None else tokens) if per_position else [],
        legend=[(POSITIVE, "positive effect / weight"), (NEGATIVE, "negative effect / weight")])


def diff_picture(cat: Catalog, a: str, b: str, max_per_row: int = 40, computed: Diff | None = None,
                 **diff_args) -> Picture:
    """The diff of a and b (`computed`, when the caller has it already) as a picture."""
    d = diff(cat, a, b, **diff_args) if computed is None else computed
    ca, cb = check_circuit(cat, a), check_circuit(cat, b)
    nodes = d.nodes.copy()
    feats = cat.sql("SELECT dictionary_id, feature_idx, label, density, max_activation FROM features "
                    "WHERE dictionary_id IN (SELECT unnest(?::VARCHAR[]))", [nodes.dictionary_id.dropna().unique().tolist()])
    nodes = nodes.merge(feats, on=["dictionary_id", "feature_idx"], how="left")
    strength = nodes.effect_a.abs().fillna(0).combine(nodes.effect_b.abs().fillna(0), max)
    nodes, hidden = _keep_strongest(nodes, strength, max_per_row)
    examples = _examples(cat, nodes)
    draw = [DrawNode(_key(r), _row(r), None if pd.isna(r.position) else int(r.position), STATUS_COLOURS[r.status],
                     bool(r.is_error), _node_title(r, examples, f"  {r.status}: {signed(r.effect_a)} -> "
                                                                 f"{signed(r.effect_b)}"), css=r.status,
                     label=_short_label(r, examples))
            for r in nodes.itertuples()]
    keys = {n.key for n in draw}
    edges = d.edges
    src = [_end_key(r, "src") for r in edges.itertuples()]
    dst = [_end_key(r, "dst") for r in edges.itertuples()]
    w = edges.weight_a.abs().fillna(0).combine(edges.weight_b.abs().fillna(0), max)
    wmax = float(w.max()) if len(w) else 1.0
    draw_edges = [DrawEdge(s, t, 0.4 + 5.6 * ww / wmax, STATUS_COLOURS[r.status],
                           f"{r.status}: {signed(r.weight_a)} -> {signed(r.weight_b)}", float(ww))
                  for s, t, ww, r in zip(src, dst, w, edges.itertuples(), strict=True) if s in keys and t in keys]
    counts = {s: int((d.nodes.status == s).sum()) for s in STATUS_COLOURS}
    per_position = nodes.position.notna().any()
    return Picture(
        title=f"diff: {ca.task_id} ({ca.method}) -> {cb.task_id} ({cb.method})",
        subtitle=f"A = {a}, B = {b}; nodes matched by {d.match}; " + ", ".join(f"{v} {k}" for k, v in counts.items()),
        rows=row_names(_n_layers(nodes)), tokens=circuit_example(cat, b)[0] if per_position else [],
        nodes=draw, edges=draw_edges, hidden=hidden,
        legend=[(c, s) for s, c in STATUS_COLOURS.items()])


def _n_layers(nodes: pd.DataFrame) -> int:
    m = nodes[nodes.component == METRIC]
    return int(m.layer.iloc[0]) if len(m) else int(nodes.layer.max()) + 1 if len(nodes) else 0


def layout(p: Picture) -> tuple[int, int, dict[int, tuple[float, float]]]:
    """Place nodes: rows bottom-up, positions as columns (or one centred strip).
    Returns (width, height, {position: (left, column width)})."""
    row_of = {r: i for i, r in enumerate(p.rows)}
    n_rows = len(p.rows)
    cells: dict[tuple, list[DrawNode]] = {}
    for n in p.nodes:
        cells.setdefault((n.row, n.position), []).append(n)
    positions = sorted({n.position for n in p.nodes if n.position is not None} | set(range(len(p.tokens))))
    if positions:
        col_w = {q: max([len(v) for (r, pos), v in cells.items() if pos == q] + [1]) * NODE_W for q in positions}
        # the metric and other aggregated nodes sit in the last column
        left, x0 = {}, MARGIN_L
        for q in positions:
            left[q] = x0
            x0 += col_w[q] + 16
        width = x0 + 20
    else:
        width = MARGIN_L + max([len(v) for v in cells.values()] + [1]) * NODE_W + 40
    for (row, pos), members in cells.items():
        y = MARGIN_T + (n_rows - 1 - row_of[row]) * ROW_H + ROW_H / 2
        if positions:
            q = positions[-1] if pos is None else pos
            start = left[q] + (col_w[q] - len(members) * NODE_W) / 2
        else:
            start = MARGIN_L + (width - MARGIN_L - 40 - len(members) * NODE_W) / 2
        for i, n in enumerate(members):
            n.x, n.y, n.label_above = start + i * NODE_W + NODE_W / 2, y, i % 2 == 1
    columns = {q: (left[q], col_w[q]) for q in positions} if positions else {}
    return int(width), int(MARGIN_T + n_rows * ROW_H + 40), columns


def to_svg(p: Picture) -> str:
    """The picture as one SVG element (id "circuit"): rows, token columns, edges (weakest first, so the
    strongest lie on top; each with its |weight| in data-w), nodes with their short labels."""
    width, height, columns = layout(p)
    at = {n.key: n for n in p.nodes}
    e = html.escape
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" id="circuit" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
           f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="10" y="22" font-size="15" font-weight="bold">{e(p.title)}</text>',
           f'<text x="10" y="40" font-size="11" fill="#555">{e(p.subtitle)}</text>']
    for i, row in enumerate(p.rows):
        y = MARGIN_T + (len(p.rows) - 1 - i) * ROW_H + ROW_H / 2
        svg.append(f'<line x1="{MARGIN_L - 10}" x2="{width - 10}" y1="{y}" y2="{y}" stroke="#f0f0f0"/>')
        svg.append(f'<text class="row-label" x="10" y="{y + 4}" font-size="12" fill="#333">{e(row)}</text>')
    for q, (x, w) in columns.items():
        tok = p.tokens[q] if q < len(p.tokens) else str(q)
        svg.append(f'<text class="token" x="{x + w / 2}" y="{height - 16}" font-size="11" '
                   f'text-anchor="middle" fill="#333">{e(tok)}</text>')
    svg.append('<g class="edges" fill="none" stroke-linecap="round">')
    for ed in sorted(p.edges, key=lambda ed: ed.width):
        s, d = at[ed.src], at[ed.dst]
        my = (s.y + d.y) / 2
        svg.append(f'<path class="edge" d="M{s.x:.1f},{s.y:.1f} C{s.x:.1f},{my:.1f} {d.x:.1f},{my:.1f} '
                   f'{d.x:.1f},{d.y:.1f}" stroke="{ed.colour}" stroke-width="{ed.width:.2f}" stroke-opacity="0.55" '
                   f'data-w="{float(ed.strength)!r}"><title>{e(ed.title)}</title></path>')
    svg.append("</g>")
    for i, n in enumerate(p.nodes):
        shape = (f'<rect x="{n.x - RADIUS:.1f}" y="{n.y - RADIUS:.1f}" width="{2 * RADIUS}" height="{2 * RADIUS}"'
                 if n.square else f'<circle cx="{n.x:.1f}" cy="{n.y:.1f}" r="{RADIUS}"')
        idx = "" if n.node_idx is None else f' data-idx="{n.node_idx}"'
        label = ""
        if n.label:
            ly = n.y - RADIUS - 3 if n.label_above else n.y + RADIUS + 9
            label = (f'<text class="node-label" x="{n.x:.1f}" y="{ly:.1f}" font-size="8" text-anchor="middle" '
                     f'fill="#333">{e(n.label)}</text>')
        svg.append(f'<g class="node {n.css}" id="n{i}" data-key="{e(json.dumps(list(n.key)))}" '
                   f'data-x="{n.x:.1f}" data-y="{n.y:.1f}" data-fill="{n.fill}"{idx}>'
                   f'{shape} fill="{n.fill}" stroke="#333" stroke-width="0.8"/>{label}'
                   f'<title>{e(n.title)}</title></g>')
    legend_x = width - 10
    for colour, label in reversed(p.legend):
        legend_x -= 24 + 7 * len(label)
        svg.append(f'<circle cx="{legend_x}" cy="52" r="5" fill="{colour}"/>'
                   f'<text x="{legend_x + 8}" y="56" font-size="11" fill="#333">{e(label)}</text>')
    if p.hidden:
        svg.append(f'<text x="10" y="{height - 4}" font-size="10" fill="#888">{p.hidden} weaker nodes not drawn '
                   f'(at most the strongest per layer and position)</text>')
    svg.append("</svg>")
    return "\n".join(svg)


def to_html(p: Picture) -> str:
    return PAGE.format(title=html.escape(p.title), svg=to_svg(p))


PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ margin: 0; font-family: sans-serif; }}
.node:hover circle, .node:hover rect {{ stroke: #000; stroke-width: 2.5; }}
.edge:hover {{ stroke-opacity: 1; }}
#info {{ position: fixed; right: 8px; bottom: 8px; max-width: 480px; white-space: pre-wrap; font-size: 12px;
        background: #fffffff0; border: 1px solid #ccc; padding: 6px 8px; display: none; }}
</style></head>
<body>
{svg}
<div id="info"></div>
<script>
const info = document.getElementById("info");
for (const g of document.querySelectorAll("g.node, path.edge")) {{
  g.addEventListener("mouseenter", () => {{ info.textContent = g.querySelector("title").textContent;
                                            info.style.display = "block"; }});
  g.addEventListener("mouseleave", () => {{ info.style.display = "none"; }});
}}
</script>
</body></html>
"""


def render_circuit(cat: Catalog, circuit_id: str, out: Path, max_per_row: int = 40) -> Path:
    return _write(to_html(circuit_picture(cat, circuit_id, max_per_row)), out)


def render_diff(cat: Catalog, a: str, b: str, out: Path, max_per_row: int = 40, **diff_args) -> Path:
    return _write(to_html(diff_picture(cat, a, b, max_per_row, **diff_args)), out)


def _write(text: str, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
