// The dashboard's pages: each opens one server-sent event stream and redraws from the documents it
// receives; charts are plotly.js (served from the plotly Python package). Text from the ledger only
// ever reaches the page through textContent, never as HTML.
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value; else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const fmt = (v, digits = 4) => (v === null || v === undefined) ? "—" : Number(v).toPrecision(digits).replace(/\.?0+(e|$)/, "$1");
const money = v => (v === null || v === undefined) ? "—" : "$" + Number(v).toFixed(4);
const when = t => t ? new Date(t * 1000).toLocaleString() : "—";
function clock(s) {
  if (s === null || s === undefined) return "—";
  s = Math.round(s);
  return `${Math.floor(s / 3600)}:${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}
function fill(tbody, rows) { tbody.replaceChildren(...rows); }
function fact(label, value, id) { return el("div", {id}, el("span", {}, label), el("b", {}, value)); }

function listen(url, handlers) {
  const live = document.getElementById("live");
  const source = new EventSource(url);
  source.onopen = () => { live.textContent = "live"; live.classList.add("on"); };
  source.onerror = () => { live.textContent = "reconnecting…"; live.classList.remove("on"); };
  for (const [event, handle] of Object.entries(handlers)) {
    source.addEventListener(event, e => handle(JSON.parse(e.data)));
  }
  return source;
}

// -- the experiment list -----------------------------------------------------------------------

function indexPage() {
  listen("/api/experiments/stream", {experiments: doc => {
    fill(document.querySelector("#experiments tbody"), doc.experiments.map(e => el("tr", {"data-experiment": e.id},
      el("td", {}, el("a", {href: `/experiments/${encodeURIComponent(e.id)}`}, e.id)),
      el("td", {class: `status-${e.status}`}, e.status),
      el("td", {class: "num runs-done"}, `${e.done}/${e.planned}`),
      el("td", {class: "num runs-running"}, e.running),
      el("td", {}, e.goal ? `${e.goal} (${e.maximize ? "max" : "min"})` : "—"),
      el("td", {class: "num"}, money(e.spent)),
      el("td", {class: "num"}, e.budget === null ? "—" : money(e.budget)),
      el("td", {}, when(e.updated_at)))));
    document.getElementById("no-experiments").hidden = doc.experiments.length > 0;
    fill(document.querySelector("#sessions tbody"), doc.sessions.map(s => el("tr", {},
      el("td", {}, el("a", {href: `/autoresearch/${encodeURIComponent(s.tag)}`}, s.tag)),
      el("td", {class: `status-${s.status}`}, s.status), el("td", {class: "num"}, s.attempts),
      el("td", {class: "num"}, s.kept), el("td", {class: "num"}, money(s.spent)), el("td", {}, when(s.updated_at)))));
    document.getElementById("no-sessions").hidden = doc.sessions.length > 0;
  }});
}

// -- one experiment ----------------------------------------------------------------------------

function experimentPage() {
  const expId = decodeURIComponent(location.pathname.split("/").pop());
  const select = document.getElementById("metric");
  let source = null;
  let shown = "";  // the metric the curves show ("" until the server's default is known)
  let traces = {};  // run id -> index in the curves chart
  let armColors = {};
  const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf"];
  const layout = (title, extra) => Object.assign({margin: {t: 34, r: 10, b: 60, l: 60}, xaxis: {title: {text: title}}, showlegend: true,
                                                  legend: {font: {size: 10}}}, extra || {});

  function colorOf(arm) {
    if (!(arm in armColors)) armColors[arm] = palette[Object.keys(armColors).length % palette.length];
    return armColors[arm];
  }

  function resetCurves(metric) {
    traces = {};
    Plotly.newPlot("curves", [], layout("step", {yaxis: {title: {text: metric}}}), {responsive: true, displaylogo: false});
  }

  function connect(metric) {
    if (source) source.close();
    shown = metric;
    resetCurves(metric);
    source = listen(`/api/experiments/${encodeURIComponent(expId)}/stream` + (metric ? `?metric=${encodeURIComponent(metric)}` : ""), {
      experiment: render,
      points: addPoints,
    });
  }

  function addPoints(doc) {
    const chart = document.getElementById("curves");
    for (const [runId, s] of Object.entries(doc.runs)) {
      if (runId in traces) {
        Plotly.extendTraces(chart, {x: [s.x], y: [s.y]}, [traces[runId]]);
      } else {
        traces[runId] = chart.data.length;
        // One legend entry per arm (its runs share a colour); hovering a curve names the run.
        const first = !chart.data.some(t => t.legendgroup === s.arm);
        Plotly.addTraces(chart, {x: s.x, y: s.y, name: s.arm, mode: "lines+markers", marker: {size: 4},
                                 line: {color: colorOf(s.arm), width: 1.5}, legendgroup: s.arm, showlegend: first,
                                 meta: Number(runId), hovertemplate: `${s.arm} #${s.replicate} (run ${runId}): %{y} at %{x}<extra></extra>`});
      }
    }
  }

  function render(doc) {
    document.getElementById("title").textContent = `${doc.name} (${doc.id})`;
    document.title = `Ratiocinator — ${doc.name}`;
    const goal = doc.goal ? `${doc.goal} (${doc.maximize ? "higher" : "lower"} is better)` : "—";
    const best = doc.arms.find(a => a.name === doc.best);
    document.getElementById("summary").replaceChildren(
      fact("status", doc.status, "fact-status"),
      fact("runs done", `${doc.done}/${doc.planned}`, "fact-done"),
      fact("running", doc.running, "fact-running"),
      fact("ETA", clock(doc.eta_s), "fact-eta"),
      fact("spent / budget", `${money(doc.spent)} / ${doc.budget === null ? "—" : money(doc.budget)}`, "fact-money"),
      fact("goal", goal),
      fact("best so far", best ? `${best.name}: ${fmt(best.mean)}` + (best.ci ? ` [${fmt(best.ci[0])}, ${fmt(best.ci[1])}]` : "") : "—", "fact-best"),
      fact("commit", doc.commit ? doc.commit.slice(0, 12) : "—"),
      ...(doc.paper ? [el("div", {}, el("span", {}, "paper"), el("b", {}, el("a", {href: doc.paper, id: "paper-link"}, "paper.html")))] : []));
    const note = document.getElementById("note");
    note.hidden = !doc.note; note.textContent = doc.note || "";

    renderGrid(doc);
    renderGoal(doc);
    renderFailures(doc);
    renderReadiness(doc);
    fill(document.querySelector("#decisions tbody"), doc.decisions.map(d => el("tr", {},
      el("td", {class: "num"}, d.iteration), el("td", {}, d.planner), el("td", {}, d.arms.join(", ") || "— (stop)"),
      el("td", {class: "num"}, d.replicates ?? "—"), el("td", {}, d.reason))));
    if (!shown && doc.curve_metric) {  // the stream chose the default: the goal where runs stream it
      shown = doc.curve_metric;
      Plotly.relayout("curves", {"yaxis.title.text": shown});
    }
    const names = doc.metrics.length ? doc.metrics : (doc.goal ? [doc.goal] : []);
    if (names.join() !== Array.from(select.options).map(o => o.value).join() || select.value !== shown) {
      select.replaceChildren(...names.map(m => el("option", {value: m, selected: m === shown}, m)));
    }
  }

  function renderGrid(doc) {
    const most = Math.max(0, ...doc.arms.map(a => a.planned), ...doc.runs.map(r => r.replicate + 1));
    const latest = {};
    for (const r of doc.runs) latest[`${r.arm}\u0000${r.replicate}`] = r;  // runs come in id order: the last attempt wins
    const head = el("tr", {}, el("th", {}, "arm"), ...Array.from({length: most}, (_, i) => el("th", {}, `#${i}`)),
                    el("th", {}, "done"), el("th", {}, `${doc.goal || "goal"} mean [95% CI]`));
    const rows = doc.arms.map(a => el("tr", {"data-arm": a.name},
      el("th", {}, a.name + (a.baseline ? " (baseline)" : "")),
      ...Array.from({length: most}, (_, i) => {
        const r = latest[`${a.name}\u0000${i}`];
        if (!r) return el("td", {class: "cell status-pending", "data-status": i < a.planned ? "pending" : "none"}, i < a.planned ? "·" : "");
        const label = r.status === "succeeded" ? fmt(r.goal) : r.status === "failed" ? r.failure : r.status;
        return el("td", {class: `cell status-${r.status}`, "data-run": r.id, "data-status": r.status,
                         title: `run ${r.id}, attempt ${r.attempt}, ${r.status}` + (r.reason ? `: ${r.reason}` : "")}, label);
      }),
      el("td", {class: "num"}, `${a.done}/${a.planned}`),
      el("td", {class: "num"}, a.mean === null ? "—" : fmt(a.mean) + (a.ci ? ` [${fmt(a.ci[0])}, ${fmt(a.ci[1])}]` : ` (n=${a.n})`))));
    document.getElementById("grid").replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
  }

  function renderGoal(doc) {
    const arms = doc.arms.filter(a => a.mean !== null);
    // Arms down the side (their names can be long), the goal across; every arm keeps its row even before it has a value.
    const order = doc.arms.map(a => a.name).reverse();
    const trace = {type: "scatter", mode: "markers", y: arms.map(a => a.name), x: arms.map(a => a.mean), name: "mean",
                   marker: {size: 10, color: arms.map(a => a.name === doc.best ? "#1a7f37" : "#0969da")},
                   error_x: {type: "data", symmetric: false, array: arms.map(a => a.ci ? a.ci[1] - a.mean : 0),
                             arrayminus: arms.map(a => a.ci ? a.mean - a.ci[0] : 0)},
                   text: arms.map(a => `n=${a.n}`), hovertemplate: "%{y}: %{x} (%{text})<extra></extra>"};
    const runs = doc.runs.filter(r => r.status === "succeeded" && r.goal !== null);
    const dots = {type: "scatter", mode: "markers", y: runs.map(r => r.arm), x: runs.map(r => r.goal), name: "runs",
                  marker: {size: 5, color: "rgba(0,0,0,0.35)"}, hovertemplate: "run value %{x}<extra></extra>"};
    const empty = arms.length ? [] : [{text: "no finished runs yet", showarrow: false, xref: "paper", yref: "paper",
                                       x: 0.5, y: 0.5, font: {color: "#6e7781"}}];
    Plotly.react("goal-chart", [trace, dots], {margin: {t: 10, r: 10, b: 50, l: 10}, showlegend: false, annotations: empty,
                 xaxis: {title: {text: doc.goal || ""}, visible: arms.length > 0}, yaxis: {automargin: true, categoryorder: "array",
                 categoryarray: order, range: [-0.5, order.length - 0.5], visible: arms.length > 0}},
                 {responsive: true, displaylogo: false});
  }

  function renderFailures(doc) {
    const failed = doc.runs.filter(r => r.status === "failed");
    fill(document.querySelector("#failures tbody"), failed.map(r => el("tr", {"data-run": r.id},
      el("td", {class: "num"}, r.id), el("td", {}, r.arm), el("td", {class: "num"}, r.replicate),
      el("td", {class: "num"}, r.attempt), el("td", {class: "status-failed"}, r.failure + (r.transient ? " (transient)" : "")),
      el("td", {}, r.reason),
      el("td", {}, r.evidence.length ? el("details", {}, el("summary", {}, `${r.evidence.length} line(s)`),
                                           el("pre", {class: "evidence"}, r.evidence.join("\n"))) : "—"))));
    document.getElementById("no-failures").hidden = failed.length > 0;
  }

  function renderReadiness(doc) {
    const box = document.getElementById("readiness");
    if (!doc.readiness.length) { box.replaceChildren(el("p", {}, "Not reviewed yet.")); return; }
    box.replaceChildren(...doc.readiness.map(r => el("div", {},
      el("p", {}, r.skipped ? `skipped at commit ${(r.commit || "?").slice(0, 12)}`
                  : el("span", {class: r.ready ? "status-pass" : "status-fail"},
                       `${r.ready ? "ready" : "not ready"} at commit ${(r.commit || "?").slice(0, 12)}` + (r.issue ? `: ${r.issue}` : ""))),
      ...r.checks.map(c => el("div", {class: "check"}, el("b", {class: `status-${c.status}`}, `${c.status} `),
                               `${c.name}: ${c.summary || ""}`)))));
  }

  select.addEventListener("change", () => connect(select.value));
  connect(new URLSearchParams(location.search).get("metric") || "");
}

// -- one autoresearch session -------------------------------------------------------------------

function sessionPage() {
  const tag = decodeURIComponent(location.pathname.split("/").pop());
  const colors = {baseline: "#6e7781", keep: "#1a7f37", discard: "#bf8700", crash: "#cf222e", violation: "#cf222e",
                  interrupted: "#6e7781", running: "#0969da", orphaned: "#9a6700"};
  listen(`/api/autoresearch/${encodeURIComponent(tag)}/stream`, {session: doc => {
    document.getElementById("title").textContent = doc.tag;
    const kept = doc.attempts.filter(a => a.status === "keep").length;
    document.getElementById("summary").replaceChildren(
      fact("status", doc.status), fact("attempts", doc.attempts.length, "fact-attempts"), fact("kept", kept),
      fact("metric", doc.metric ? `${doc.metric} (${doc.direction} is better)` : "—"),
      fact("best", fmt(doc.best.length ? doc.best[doc.best.length - 1] : null)),
      fact("best commit", doc.best_commit ? doc.best_commit.slice(0, 12) : "—"),
      fact("spent", money(doc.spent)), fact("branch", doc.branch));
    const note = document.getElementById("note");
    note.hidden = !doc.reason; note.textContent = doc.reason || "";
    const measured = doc.attempts.map((a, i) => [a, i]).filter(([a]) => a.metric !== null);
    const points = {type: "scatter", mode: "markers", name: "attempts", x: measured.map(([, i]) => i),
                    y: measured.map(([a]) => a.metric), marker: {size: 9, color: measured.map(([a]) => colors[a.status] || "#000")},
                    text: measured.map(([a]) => `${a.status}: ${a.hypothesis || a.reason}`), hovertemplate: "%{text}<br>%{y}<extra></extra>"};
    const best = {type: "scatter", mode: "lines", line: {shape: "hv", color: "#1a7f37"}, name: "best so far",
                  x: doc.best.map((_, i) => i), y: doc.best};
    Plotly.react("progress-chart", [points, best], {margin: {t: 34, r: 10, b: 50, l: 60},
                 xaxis: {title: {text: "attempt"}, dtick: Math.max(1, Math.ceil(doc.attempts.length / 20))},
                 yaxis: {title: {text: doc.metric || "metric"}}}, {responsive: true, displaylogo: false});
    fill(document.querySelector("#attempts tbody"), doc.attempts.map(a => el("tr", {"data-attempt": a.id},
      el("td", {class: "num"}, a.iteration), el("td", {class: "num"}, a.worker),
      el("td", {class: `status-${a.status}`}, a.status), el("td", {class: "num"}, fmt(a.metric, 6)),
      el("td", {}, a.hypothesis), el("td", {}, a.reason),
      el("td", {}, a.diff ? el("details", {}, el("summary", {}, `${a.diff.trimEnd().split("\n").length} lines` + (a.diff_cut ? " (cut)" : "")),
                               el("pre", {class: "diff"}, a.diff)) : "—"))));
  }});
}

({index: indexPage, experiment: experimentPage, session: sessionPage})[document.body.dataset.page]();
