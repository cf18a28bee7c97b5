"""The explorer's pages and JSON, one route per kind of page; every URL is a stable link.

    /                                   the circuits (filters: task, method, model, basis)
    /circuits/<id>?threshold=T          one circuit: its graph, threshold slider, node dashboards
    /circuits/<id>/nodes/<node_idx>     one node's dashboard (JSON at /api/circuits/<id>/nodes/<node_idx>)
    /circuits/<id>/render.html          the self-contained picture `cli.py render` writes
    /diff/<a>/<b>                       a diff of two circuits (match, tol as in `cli.py diff`)
    /compare?ids=A&ids=B&basis=&k=      the heat map and Jaccard matrix of chosen circuits
    /faithfulness?ids=A&ids=B           faithfulness and completeness curves (PNG at /faithfulness.png)
    /sql?q=SQL                          a read-only SQL box (CSV at /sql.csv?q=SQL)
    /atlas                              the atlases (data sets of per-prompt graphs)
    /atlas/<name>?by=&a=&b=&group=      one atlas: groups, recurrent features, heads, a contrast, its graphs
    POST /graph (prompt, target)        a new prompt's graph, computed by the running server, then its page
"""

from __future__ import annotations

import math
import select
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from flask import Flask, Response, abort, jsonify, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

import catalog
from catalog import atlas
from catalog.compare import BASES, compare, select_circuits, split_by_basis
from catalog.diff import MATCHES, diff
from catalog.errors import UserError, first_line
from catalog.graph import QK_KINDS, check_circuit, node_name
from catalog.plots import faithfulness_plot
from catalog.query import csv_chunks
from catalog.render import circuit_picture, diff_picture, effect_colour, to_html, to_svg
from catalog.store import interrupt_running, stop_when
from schema.tables import ERROR_MODES

DEFAULT_EDGES = 300  # a circuit page first shows its strongest edges, at most this many
MAX_SQL_ROWS = 500  # rows a SQL result shows on the page (the CSV has them all)
LOCAL_ROWS = 30  # OV and QK rows shown per kind for a local circuit
LOOPBACK = ("127.0.0.1", "localhost", "::1")
QUERY_TIMEOUT = 10.0  # seconds a query may run (`cli.py serve --query-timeout`)

# Promoted tokens need the model's and dictionary's files, which the catalogue layer does not
# load; `cli.py serve` passes the function that does: (catalogue, dictionary_id, feature) -> [(token, logit)].
Promoted = Callable[[catalog.Catalog, str, int], list[tuple[str, float]]]
# Likewise a new prompt's graph needs the model: `cli.py serve` passes the function that computes and
# commits it (`compute.jobs.local.PromptGrapher`): (catalogue, prompt, target or None) -> circuit id.
Grapher = Callable[[catalog.Catalog, str, "str | None"], str]
ATLAS_ROWS = 30  # rows of each table an atlas page shows
ATLAS_GRAPHS = 200  # graphs an atlas page lists
MAX_FORM_BYTES = 64 * 1024  # a posted prompt longer than this is refused before it is read


def create_app(catalog_path: str | Path, promoted: Promoted | None = None,
               query_timeout: float | None = QUERY_TIMEOUT, grapher: Grapher | None = None) -> Flask:
    """The explorer over the catalogue at catalog_path (which must exist: opening it checks it). Every
    query stops after `query_timeout` seconds, or as soon as the client that asked has gone. With a
    grapher, the front page's prompt box computes new prompts' graphs."""
    cat = catalog.open(catalog_path)
    cat.info()  # refuses a folder that is not a catalogue, before any page is asked for
    cat.timeout = query_timeout
    app = Flask(__name__)
    app.config["ALLOWED_HOSTS"] = None  # serve() sets the loopback names when bound to loopback
    app.config["MAX_CONTENT_LENGTH"] = MAX_FORM_BYTES
    plot_lock = threading.Lock()  # matplotlib's pyplot is not thread-safe

    @app.before_request
    def _check_host():
        # A page on another site could point its own name at 127.0.0.1 (DNS rebinding) and read the
        # catalogue through the browser; requests must name this machine.
        allowed = app.config["ALLOWED_HOSTS"]
        host = (request.host or "").rsplit(":", 1)[0].strip("[]")
        if allowed is not None and host not in allowed:
            abort(400, f"unexpected Host {request.host!r}: the explorer answers only to {', '.join(allowed)}")

    @app.before_request
    def _stop_when_the_client_goes():
        sock = request.environ.get("werkzeug.socket")
        if sock is not None:
            stop_when.set(lambda: _gone(sock))

    @app.route("/")
    def circuits():
        df = cat.sql(CIRCUITS_SQL)
        total = len(df)
        choices = {c: sorted(df[c].dropna().unique().tolist()) for c in FILTERS}
        chosen = {c: request.args.get(c, "") for c in FILTERS}
        for column, value in chosen.items():
            if value:
                df = df[df[column] == value]
        return render_template("circuits.html", circuits=df.to_dict("records"), choices=choices, chosen=chosen,
                               total=total, prompt_box=grapher is not None)

    @app.route("/graph", methods=["POST"])
    def graph():
        if grapher is None:
            abort(404, "this explorer computes no graphs (`cli.py serve --no-prompt-box` started it)")
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            abort(403, "a graph is computed only for this explorer's own pages")
        target = request.form.get("target", "").strip() or None
        circuit_id = grapher(cat, request.form.get("prompt", ""), target)
        return redirect(url_for("circuit", circuit_id=circuit_id), 303)

    @app.route("/atlas")
    def atlases():
        return render_template("atlases.html", atlases=_records(atlas.names(cat)))

    @app.route("/atlas/<name>")
    def atlas_page(name: str):
        grouping = request.args.get("by", "label")
        atlas.check(cat, name, grouping)
        groups = atlas.summary(cat, name, grouping)
        values = [v for v in groups.grp.tolist() if v is not None]
        a, b = request.args.get("a") or None, request.args.get("b") or None
        if a is None and b is None and len(values) >= 2:
            a, b = values[:2]
        contrast = atlas.contrast(cat, name, grouping, a, b).head(ATLAS_ROWS) if a and b else None
        group = request.args.get("group") or None
        graphs = atlas.graphs(cat, name)
        if group is not None:
            keep = cat.sql("SELECT circuit_id FROM atlas_groups(?, ?) WHERE grp = ?", [name, grouping, group])
            graphs = graphs[graphs.circuit_id.isin(keep.circuit_id)]
        recurrence = atlas.recurrence(cat, name, grouping)
        return render_template(
            "atlas.html", name=name, by=grouping, groupings=atlas.ATLAS_GROUPS, groups=_records(groups),
            values=values, a=a, b=b, group=group,
            recurrence=_records(recurrence.groupby("grp", dropna=False).head(10).head(4 * ATLAS_ROWS)),
            heads=_records(atlas.head_flow(cat, name, grouping).head(ATLAS_ROWS)),
            contrast=None if contrast is None else _records(contrast),
            graphs=_records(graphs.head(ATLAS_GRAPHS)), n_graphs=len(graphs))

    @app.route("/circuits/<circuit_id>")
    def circuit(circuit_id: str):
        c = check_circuit(cat, circuit_id)
        asked = _number_arg("threshold", None)
        facts = cat.sql(CIRCUIT_PAGE_SQL, [circuit_id] * 4).iloc[0]
        tokens = list(_value(facts.clean_tokens) or [])  # none: a circuit whose task has no examples here
        local, edges = {}, None
        if c.method == "local":
            edges = cat.sql("SELECT * FROM circuit_edges(?)", [circuit_id])
            for kind in ("ov", *QK_KINDS):
                part = edges[edges.kind == kind].head(LOCAL_ROWS)
                if len(part):
                    local[kind] = _records(part.drop(columns=["src_idx", "dst_idx"]))
        picture = circuit_picture(cat, circuit_id, row=c, tokens=tokens, edges=edges)
        strengths = sorted((e.strength for e in picture.edges), reverse=True)
        default = strengths[min(len(strengths), DEFAULT_EDGES) - 1] if strengths else 0.0
        threshold = default if asked is None else asked
        return render_template("circuit.html", c=_record(c), svg=to_svg(picture), n_nodes=len(picture.nodes),
                               n_edges=len(picture.edges), hidden=picture.hidden, threshold=threshold,
                               default_threshold=default, local=local,
                               prompt=_value(facts.clean_prefix) if c.method == "local" else None,
                               has_curves=bool(facts.has_curves),
                               in_atlas=_record(facts) if _value(facts.atlas_id) is not None else None)

    @app.route("/circuits/<circuit_id>/render.html")
    def circuit_file(circuit_id: str):
        check_circuit(cat, circuit_id)
        return Response(to_html(circuit_picture(cat, circuit_id)), mimetype="text/html",
                        headers={"Content-Disposition": f'attachment; filename="{circuit_id}.html"'})

    @app.route("/api/circuits/<circuit_id>/nodes/<int:node_idx>")
    def node_json(circuit_id: str, node_idx: int):
        return jsonify(node_dashboard(cat, circuit_id, node_idx, promoted))

    @app.route("/circuits/<circuit_id>/nodes/<int:node_idx>")
    def node_page(circuit_id: str, node_idx: int):
        return render_template("node.html", d=node_dashboard(cat, circuit_id, node_idx, promoted))

    @app.route("/diff/<a>/<b>")
    def diff_page(a: str, b: str):
        match = request.args.get("match", "auto")
        if match not in MATCHES:
            abort(400, f"match must be one of {', '.join(MATCHES)}")
        tol = _number_arg("tol", 1e-9)
        d = diff(cat, a, b, match, tol=tol)
        picture = diff_picture(cat, a, b, computed=d)
        moved = d.nodes[d.nodes.status != "same"].head(20)
        return render_template("diff.html", a=_record(check_circuit(cat, a)), b=_record(check_circuit(cat, b)),
                               counts=d.counts().to_dict("records"), stats=d.stats(), match=d.match,
                               moved=[{"status": r.status, "node": node_name(r), "effect_a": r.effect_a,
                                       "effect_b": r.effect_b, "delta": r.delta} for r in moved.itertuples()],
                               svg=to_svg(picture), n_edges=len(picture.edges))

    @app.route("/compare")
    def compare_page():
        ids = select_circuits(cat, request.args.getlist("ids"))
        basis = request.args.get("basis") or None  # split_by_basis refuses an unknown one
        k = _number_arg("k", None, integer=True)
        kept, left_out, basis = split_by_basis(cat, ids, basis)
        cmp = compare(cat, kept, k) if len(kept) >= 2 else None
        heat = jaccard = pairs = None
        if cmp is not None:
            heat = _heat_rows(cmp.matrix().head(60))
            jaccard = cmp.jaccard_matrix()
            labels = cmp.circuits.set_index("circuit_id").label
            pairs = _records(cmp.overlap.assign(a=cmp.overlap.circuit_a.map(labels),
                                                b=cmp.overlap.circuit_b.map(labels))
                             [["a", "b", "n_a", "n_b", "n_shared", "jaccard", "rank_corr"]])
        return render_template("compare.html", cmp=cmp, heat=heat, jaccard=jaccard, pairs=pairs,
                               left_out=left_out, basis=basis, ids=kept, k=k, bases=BASES,
                               all_ids=ids, n_shared=None if cmp is None else len(cmp.shared))

    @app.route("/faithfulness")
    def faithfulness_page():
        ids = select_circuits(cat, request.args.getlist("ids"))
        return render_template("faithfulness.html", ids=ids,
                               circuits=_records(cat.sql(CIRCUITS_SQL + " WHERE list_contains(?, circuit_id)",
                                                         [ids])))

    @app.route("/faithfulness.png")
    def faithfulness_png():
        ids = select_circuits(cat, request.args.getlist("ids"))
        errors = request.args.get("errors", "node")
        if errors not in ERROR_MODES:
            abort(400, f"errors must be one of {', '.join(ERROR_MODES)}, not {errors[:40]!r}")
        with plot_lock, tempfile.TemporaryDirectory() as tmp:
            out = faithfulness_plot(cat, ids, Path(tmp) / "curves.png", errors=errors)
            return Response(out.read_bytes(), mimetype="image/png")

    @app.route("/sql")
    def sql_page():
        q = request.args.get("q", "")
        result = error = None
        status = 200
        if q.strip():
            try:
                result = cat.sql(q, limit=MAX_SQL_ROWS + 1)  # one more tells whether there are more
            except UserError as e:
                error, status = str(e), 400
        rows = None if result is None else _records(result.head(MAX_SQL_ROWS))
        return render_template("sql.html", q=q, rows=rows, columns=None if result is None else list(result.columns),
                               more=result is not None and len(result) > MAX_SQL_ROWS, error=error,
                               max_rows=MAX_SQL_ROWS), status

    @app.route("/sql.csv")
    def sql_csv():  # streamed a batch at a time: a large result is never held whole
        chunks = csv_chunks(cat.chunks(request.args.get("q", "")))
        first = next(chunks)  # a mistake, or a failure of the first batch, is an error page, not a stream
        partial = cat.left_out()
        return Response(_ended_on_error([first], chunks, request.path), mimetype="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="query.csv"',
                                 **({"X-Partial-Answer": partial} if partial else {})})

    @app.errorhandler(UserError)
    def _user_error(e: UserError):
        message = str(e)
        return _error_page(404 if message.startswith(("unknown", "no ")) else 400, message)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        message = e.description if e.code != 404 else f"no page at {request.path}"
        return _error_page(e.code or 500, message)

    @app.errorhandler(Exception)
    def _internal_error(e: Exception):  # one line in the page and on stderr, never a traceback
        print(f"explorer: {request.path}: {type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return _error_page(500, f"internal error: {type(e).__name__}: {first_line(e)}")

    @app.context_processor
    def _partial():  # every page says when its answers leave runs out, as `cli.py query` does
        return {"partial": cat.left_out()}

    app.jinja_env.filters["num"] = _num
    app.jinja_env.globals["url_for"] = url_for
    return app


FILTERS = ("task_id", "method", "model_id", "basis")
CIRCUITS_SQL = """
SELECT l.*, c.model_id, c.aggregation FROM circuit_list() l JOIN circuits c USING (circuit_id)
"""


def node_dashboard(cat: catalog.Catalog, circuit_id: str, node_idx: int, promoted: Promoted | None) -> dict:
    """A node of a circuit with its feature's dashboard: density, top examples (the token marked),
    promoted tokens, and the other circuits that hold the feature."""
    check_circuit(cat, circuit_id)
    n = cat.sql(NODE_SQL, [circuit_id, node_idx])
    if n.empty:
        raise UserError(f"unknown node {node_idx} of circuit {circuit_id}")
    r = n.iloc[0]
    d = {"circuit_id": circuit_id, "node_idx": node_idx, "name": node_name(r), "component": r.component,
         "layer": int(r.layer), "dictionary_id": _value(r.dictionary_id), "feature_idx": _value(r.feature_idx),
         "position": _value(r.position), "is_error": bool(r.is_error), "effect": float(r.effect),
         "in_circuit": bool(r.in_circuit), "label": _value(r.label), "density": _value(r.density),
         "max_activation": _value(r.max_activation), "examples": [], "promoted": [], "circuits": [],
         "url": url_for("node_page", circuit_id=circuit_id, node_idx=node_idx),
         "circuit_url": url_for("circuit", circuit_id=circuit_id)}
    if pd.isna(r.feature_idx) or r.dictionary_id is None:
        return d
    feature = [r.dictionary_id, int(r.feature_idx)]
    examples = cat.sql("SELECT * FROM top_examples(?, ?, n := 8)", feature)
    d["examples"] = [{"text": e.text, "token": e.token, "value": float(e.value), "task_id": e.task_id,
                      "example_idx": int(e.example_idx)} for e in examples.itertuples()]
    shared = cat.sql(SHARED_SQL, [*feature, circuit_id])
    d["circuits"] = [{**x, "url": url_for("circuit", circuit_id=x["circuit_id"])} for x in _records(shared)]
    if promoted is not None:
        try:
            d["promoted"] = [[t, float(v)] for t, v in promoted(cat, *feature)]
        except (UserError, OSError) as e:  # the files moved: the rest of the dashboard still shows
            d["promoted_error"] = first_line(e)
    return d


# What a circuit's page shows besides its graph, in one query: its example (the tokens its positions
# refer to: `circuit_example`), whether it has faithfulness curves, and, for an atlas graph, its prompt's row.
CIRCUIT_PAGE_SQL = """
SELECT (SELECT count(*) > 0 FROM evaluations WHERE circuit_id = ?) AS has_curves, x.clean_tokens, x.clean_prefix,
       p.atlas_id, p.prompt_idx, p.prediction, p.probability, p.correct, p.label
FROM (SELECT 1) one
LEFT JOIN (SELECT clean_tokens, clean_prefix FROM examples
           WHERE task_id = (SELECT task_id FROM circuits WHERE circuit_id = ?)
             AND example_idx = circuit_example(?)) x ON true
LEFT JOIN (SELECT * FROM prompts WHERE circuit_id = ?) p ON true
"""

NODE_SQL = """
SELECT n.*, f.label, f.density, f.max_activation, d.kind AS dictionary_kind
FROM nodes n LEFT JOIN features f USING (dictionary_id, feature_idx) LEFT JOIN dictionaries d USING (dictionary_id)
WHERE n.circuit_id = ? AND n.node_idx = ?
"""

SHARED_SQL = """
SELECT n.circuit_id, c.task_id, c.method, sum(n.effect) AS effect
FROM nodes n JOIN circuits c USING (circuit_id)
WHERE n.dictionary_id = ? AND n.feature_idx = ? AND n.in_circuit AND n.circuit_id <> ?
GROUP BY ALL ORDER BY abs(sum(n.effect)) DESC, n.circuit_id LIMIT 50
"""


def _gone(sock) -> bool:
    """Whether the client of this connection has closed it (readable, and nothing left to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _ended_on_error(head: list, rest: Iterator, path: str) -> Iterator:
    """A response body that, when producing it fails after the first bytes went out, says so in one
    line on stderr and breaks the connection instead of ending the transfer: a client sees a truncated
    download (curl: exit 18), never a complete-looking file."""
    yield from head
    try:
        yield from rest
    except (UserError, OSError) as e:
        print(f"explorer: {path}: {first_line(e)}; the download was cut off", file=sys.stderr)
        raise ConnectionAbortedError(str(e)) from None  # the server drops the connection, unended


def bind(app: Flask, host: str = "127.0.0.1", port: int = 8765, quiet: bool = False):
    """A threaded server for the app bound to host:port (port 0: any free port), answering only to this
    machine's names when bound to loopback. `server.serve_forever()` runs it, `server.shutdown()` stops it;
    quiet: no line per request."""
    import logging

    from werkzeug.serving import make_server

    if quiet:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        server = make_server(host, port, app, threaded=True)
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port}: {e.strerror or first_line(e)}") from None
    if host in LOOPBACK:
        app.config["ALLOWED_HOSTS"] = LOOPBACK
    return server


def url_of(server) -> str:
    host = server.host
    return f"http://{'[' + host + ']' if ':' in host else host}:{server.server_port}/"


def serve(app: Flask, host: str = "127.0.0.1", port: int = 8765, ready: Callable[[str], None] | None = None) -> None:
    """Run the app until interrupted (threaded: a slow page does not hold up the others); `ready` gets
    the URL once the socket is bound."""
    server = bind(app, host, port)
    if ready:
        ready(url_of(server))
    try:
        server.serve_forever()
    finally:
        interrupt_running()  # the queries still running on request threads stop before DuckDB goes
        server.server_close()


def _number_arg(name: str, default, integer: bool = False):
    """A numeric query argument, or the default when absent; anything else is a 400 page."""
    text = request.args.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        abort(400, f"{name} must be a number, not {text!r}")
    if not math.isfinite(value) or value < 0 or (integer and value < 1):
        abort(400, f"{name} must be a {'positive whole' if integer else 'finite non-negative'} number")
    return value


def _value(v):
    """A catalogue value for JSON and pages: None for NULL/NaN, Python values for numpy ones."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _record(row: pd.Series) -> dict:
    return {k: _value(v) for k, v in row.items()}


def _records(df: pd.DataFrame) -> list[dict]:
    return [{k: _value(v) for k, v in r.items()} for r in df.to_dict("records")]


def _num(v, digits: int = 3) -> str:
    """A table cell: numbers rounded, missing values as '-'."""
    v = _value(v)
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (0 < abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def _heat_rows(m: pd.DataFrame) -> dict:
    """The feature x circuit matrix as rows of (name, [(value, colour)]) for an HTML heat map."""
    lim = float(m.abs().values.max()) if m.size else 1.0
    rows = []
    for (dictionary, feature, component, layer), values in m.iterrows():
        name = f"{component}_{layer}/{feature}" if layer >= 0 else f"{component}/{feature}"
        rows.append({"name": name, "dictionary_id": dictionary, "feature_idx": int(feature),
                     "cells": [(float(v), effect_colour(float(v), lim) if v else "#ffffff") for v in values]})
    return {"columns": list(m.columns), "rows": rows}


def _error_page(status: int, message: str):
    return render_template("error.html", status=status, message=message), status
