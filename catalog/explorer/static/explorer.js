// The explorer's pages: a threshold slider over a picture's edges, and node dashboards.
// No framework and nothing from a network: the server draws the SVG, this only shows and hides.
"use strict";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined) return "-";
  return typeof v === "number" ? v.toFixed(digits) : String(v);
}

// The threshold slider: a log scale from the weakest edge's |weight| to the strongest's.
function setUpThreshold() {
  const slider = document.getElementById("threshold");
  if (!slider) return;
  const edges = Array.from(document.querySelectorAll("#graph path.edge"));
  const weights = edges.map(e => parseFloat(e.dataset.w));
  const shown = document.getElementById("threshold-value");
  const count = document.getElementById("edge-count");
  const positive = weights.filter(w => w > 0);
  const lo = positive.length ? Math.log10(Math.min(...positive)) : 0;
  const hi = positive.length ? Math.log10(Math.max(...positive)) : 0;
  const toWeight = s => (s <= 0 ? 0 : Math.pow(10, lo + (hi - lo) * s / 1000));
  const toSlider = t => (t <= 0 || hi === lo ? (t > 0 ? 1000 : 0)
                         : Math.max(0, Math.min(1000, Math.round(1000 * (Math.log10(t) - lo) / (hi - lo)))));
  function apply(t) {
    let n = 0;
    edges.forEach((e, i) => { const on = weights[i] >= t; e.classList.toggle("hidden", !on); n += on; });
    shown.dataset.threshold = String(t);
    shown.textContent = t.toPrecision(3);
    count.textContent = String(n);
    document.body.dataset.shownEdges = String(n);
  }
  const start = parseFloat(shown.dataset.threshold);
  slider.value = toSlider(start);
  apply(start);
  slider.addEventListener("input", () => {
    const t = toWeight(parseInt(slider.value, 10));
    apply(t);
    const url = new URL(window.location.href);
    url.searchParams.set("threshold", t.toPrecision(6));
    history.replaceState(null, "", url);
  });
}

function showDashboard(panel, d) {
  panel.replaceChildren();
  panel.append(el("h3", {}, d.name + "  ", el("a", {href: d.url, class: "permalink"}, "link")));
  const facts = [`effect ${fmt(d.effect)}`, d.in_circuit ? "in the circuit" : "not in the circuit"];
  if (d.density !== null) facts.push(`density ${fmt(d.density, 4)}`, `max activation ${fmt(d.max_activation)}`);
  if (d.label) facts.push(`label: ${d.label}`);
  panel.append(el("p", {class: "facts"}, facts.join("; ")));
  if (d.feature_idx === null) {
    panel.append(el("p", {class: "hint"}, d.is_error ? "An error term: what the dictionary does not reconstruct."
                                                       : "Not a dictionary feature."));
    return;
  }
  panel.append(el("h3", {}, "Top activating examples"));
  if (!d.examples.length) panel.append(el("p", {class: "hint"}, "no stored activations"));
  const ol = el("ol", {id: "top-examples"});
  for (const x of d.examples) {
    const li = el("li", {class: "example"});
    // the strongest token is in [brackets] in the text: mark it
    for (const part of x.text.split(/(\[[^\]]*\])/)) {
      li.append(part.startsWith("[") && part.endsWith("]") ? el("mark", {}, part.slice(1, -1)) : part);
    }
    li.append(el("span", {class: "hint"}, `  ${fmt(x.value, 2)} (${x.task_id} #${x.example_idx})`));
    ol.append(li);
  }
  panel.append(ol);
  if (d.promoted.length) {
    panel.append(el("h3", {}, "Promoted tokens"));
    panel.append(el("p", {id: "promoted"}, d.promoted.map(([t, v]) => `${t} (${fmt(v, 2)})`).join(", ")));
  } else if (d.promoted_error) {
    panel.append(el("p", {class: "hint"}, `promoted tokens unavailable: ${d.promoted_error}`));
  }
  panel.append(el("h3", {}, `Other circuits holding it (${d.circuits.length})`));
  const ul = el("ul", {id: "sharing"});
  for (const c of d.circuits) {
    ul.append(el("li", {}, el("a", {href: c.url}, `${c.task_id} (${c.method})`), `  effect ${fmt(c.effect)}`));
  }
  panel.append(ul);
}

function setUpNodes() {
  const controls = document.getElementById("controls");
  const panel = document.getElementById("dashboard");
  if (!panel) return;
  if (panel.dataset.node) { showDashboard(panel, JSON.parse(panel.dataset.node)); return; }
  if (!controls || !controls.dataset.api) return;
  for (const g of document.querySelectorAll("#graph g.node[data-idx]")) {
    g.addEventListener("click", async () => {
      document.querySelectorAll("#graph g.node.selected").forEach(s => s.classList.remove("selected"));
      g.classList.add("selected");
      panel.replaceChildren(el("p", {class: "hint"}, "loading ..."));
      const r = await fetch(controls.dataset.api + g.dataset.idx);
      if (!r.ok) { panel.replaceChildren(el("p", {class: "error"}, `error ${r.status}`)); return; }
      showDashboard(panel, await r.json());
    });
  }
}

function setUpDiffButton() {
  const b = document.getElementById("diff-chosen");
  if (!b) return;
  b.addEventListener("click", () => {
    const ids = Array.from(document.querySelectorAll("input[name=ids]:checked")).map(i => i.value);
    if (ids.length < 2) { alert("tick two circuits"); return; }
    window.location.href = b.dataset.diffUrl + encodeURIComponent(ids[0]) + "/" + encodeURIComponent(ids[1]);
  });
}

setUpThreshold();
setUpNodes();
setUpDiffButton();
document.body.dataset.ready = "1";
performance.mark("explorer-ready");  // bench/explorer.py times pages to here
