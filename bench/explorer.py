"""Explorer benchmark: how long a large circuit's page takes to open in the browser.

    python -m bench.explorer                     # circuits of about 1,000, 5,000 and 20,000 edges
    python -m bench.explorer --edges 5000 --repeat 5

A synthetic circuit in the zoo's shape (4 layers; rows of 40 or more features, of which the
picture draws the strongest 40; random edges between consecutive rows; tests/synthetic.py) is committed to a temporary catalogue, `cli.py serve`'s app
runs on a free port, and Debian's headless Chromium (Playwright) opens the circuit's page. Open
time = navigation start to the end of the page's script (`performance.mark("explorer-ready")`:
HTML received, SVG parsed, slider set, the strongest edges shown); the server's share of it is
timed by the same request without a browser. Side by side, the same picture as the static file
`cli.py render` writes, opened from disk (no server, no slider), is the floor. Best of --repeat.
Goal: a 5,000-edge circuit opens in under 2 s.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

import catalog
from catalog.explorer import bind, create_app, url_of
from catalog.render import render_circuit
from schema.sites import sites
from tests.browser import FLAGS, chromium
from tests.synthetic import layered_circuit, write_circuit

N_LAYERS, WIDTH = 4, 40


def build(root: Path, n_edges: int, seed: int = 0) -> str:
    """A catalogue holding one circuit of about n_edges edges; returns its id."""
    rng = np.random.default_rng(seed)
    cat = catalog.init(root)
    dicts = {(s.component, s.layer): f"d-{s.component}-{s.layer}" for s in sites(N_LAYERS)}
    # rows hold WIDTH nodes, so consecutive rows have at most WIDTH² edges between them: widen the
    # rows' node pool when more edges are asked for
    width = max(WIDTH, int(np.ceil(np.sqrt(n_edges / (3 * N_LAYERS)))) + 1)
    nodes, edges = layered_circuit(rng, n_layers=N_LAYERS, width=width, n_edges=int(n_edges * 1.08),
                                   dictionary_ids=dicts, feature_pool=4 * width)
    return write_circuit(cat, nodes, edges)


def open_time(browser, url: str) -> tuple[float, int]:
    """Seconds from navigation start to the page's ready mark (or its load event for a static file),
    and the number of edges drawn."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto(url)
        if url.startswith("http"):
            page.wait_for_selector("body[data-ready='1']")
            ms = page.evaluate("performance.getEntriesByName('explorer-ready')[0].startTime")
        else:
            page.wait_for_load_state("load")
            ms = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
        return ms / 1000, page.locator("path.edge").count()
    finally:
        page.close()


def server_time(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url) as f:
        f.read()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edges", nargs="+", type=int, default=[1000, 5000, 20000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as p, tempfile.TemporaryDirectory() as tmp:
        browser = p.chromium.launch(executable_path=chromium(), args=[f for f in FLAGS if f != "--headless"])
        for n in args.edges:
            root = Path(tmp) / f"c{n}"
            cid = build(root, n)
            cat = catalog.open(root)
            static = render_circuit(cat, cid, Path(tmp) / f"c{n}.html")
            server = bind(create_app(root), "127.0.0.1", 0, quiet=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            url = f"{url_of(server)}circuits/{cid}"
            try:
                _, drawn = open_time(browser, url)  # also warms the server's DuckDB instance and the browser
                page_s = min(open_time(browser, url)[0] for _ in range(args.repeat))
                served_s = min(server_time(url) for _ in range(args.repeat))
                file_s = min(open_time(browser, static.resolve().as_uri())[0] for _ in range(args.repeat))
            finally:
                server.shutdown()
            rows.append({"edges": drawn, "page_open_s": round(page_s, 3), "server_s": round(served_s, 3),
                         "browser_s": round(page_s - served_s, 3), "static_file_open_s": round(file_s, 3),
                         "page_vs_static": round(page_s / file_s, 2)})
            print(pd.DataFrame([rows[-1]]).to_string(index=False, header=len(rows) == 1), flush=True)
        browser.close()
    df = pd.DataFrame(rows)
    print("\n" + df.to_string(index=False))
    near = df.iloc[(df.edges - 5000).abs().argmin()]
    print(f"\ngoal: a 5,000-edge circuit opens in under 2 s: {int(near.edges)} edges in {near.page_open_s} s "
          f"({'met' if near.page_open_s < 2 else 'missed'})")


if __name__ == "__main__":
    main()
