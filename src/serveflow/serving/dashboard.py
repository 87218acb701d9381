# ruff: noqa: E501, RUF001  (the page is HTML and JavaScript, not Python)
"""The live dashboard served at `/`: one static page, inline script, SVG drawn by hand.

It reads `GET /v1/flows` once (plan graphs) and `GET /v1/flows/{name}/stats` every
second. With a token, open `/#token=...`: the fragment never leaves the browser and
the script sends it as a Bearer header.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>serveflow dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  :root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --muted:#6b7385; --line:#c9ced8;
          --accent:#2f6fde; --ok:#1f9d55; --bad:#d64545; --batch:#8a4fd6; --rep:#d98a1c; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
         background:var(--bg); color:var(--ink); }
  header { display:flex; align-items:baseline; gap:16px; padding:14px 24px;
           background:#1d2330; color:#fff; }
  header h1 { margin:0; font-size:18px; font-weight:600; }
  header .status { color:#aeb6c6; font-size:13px; }
  header .status.error { color:#ff9b9b; }
  main { padding:18px 24px; display:flex; flex-direction:column; gap:22px; }
  section.flow { background:var(--card); border:1px solid #e3e6ec; border-radius:10px;
                 padding:16px 18px; }
  .flow h2 { margin:0 0 10px; font-size:16px; }
  .cards { display:flex; gap:12px; flex-wrap:wrap; margin-bottom:12px; align-items:flex-start; }
  .card { border:1px solid #e3e6ec; border-radius:8px; padding:8px 12px; min-width:110px; }
  .card .label { color:var(--muted); font-size:12px; }
  .card .value { font-size:20px; font-weight:600; font-variant-numeric:tabular-nums; }
  .card.spark { flex:1; min-width:220px; }
  .card.spark svg { display:block; width:100%; height:30px; }
  svg.graph { width:100%; height:auto; display:block; }
  .node > rect { fill:#fff; stroke:var(--line); stroke-width:1.2; rx:8; }
  .node.io > rect { fill:#eef2fa; }
  .node.busy > rect { stroke:var(--accent); stroke-width:2; }
  .node text { font-size:12px; fill:var(--ink); font-variant-numeric:tabular-nums; }
  .node .title { font-weight:600; font-size:13px; }
  .node .sub { fill:var(--muted); }
  .badge rect { stroke:none; rx:4; }
  .badge text { fill:#fff; font-size:11px; font-weight:600; }
  path.edge { fill:none; stroke:#9aa3b5; stroke-width:1.6; marker-end:url(#arrow); }
  details { margin-top:8px; } pre { background:#f1f3f6; padding:10px; border-radius:6px;
  overflow:auto; font-size:12px; }
</style>
</head>
<body>
<header><h1>serveflow</h1><span id="status" class="status">connecting…</span></header>
<main id="flows"></main>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg";
const W = 250, H = 132, GAPX = 70, GAPY = 26, PAD = 16;
const token = (() => {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) sessionStorage.setItem("serveflow-token", decodeURIComponent(m[1]));
  return sessionStorage.getItem("serveflow-token");
})();
const headers = token ? {Authorization: "Bearer " + token} : {};
const state = {};  // flow name -> {graph, prev: {stage: [t, requests]}, history: []}

function el(tag, attrs, parent, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}
function html(tag, attrs, parent, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}
function short(s, n) { return s.length > n ? s.slice(0, n - 1) + "…" : s; }
function fmt(x, digits) { return Number.isFinite(x) ? x.toFixed(digits) : "–"; }

function layout(graph) {
  // depth: request 0, a stage 1 + deepest input, response after the output stage
  const depth = {request: 0}, byId = {};
  for (const s of graph.stages) {
    byId[s.id] = s;
    depth[s.id] = 1 + Math.max(...s.inputs.map(i => depth[i] ?? 0));
  }
  depth.response = depth[graph.output] + 1;
  const columns = [];
  for (const [id, d] of Object.entries(depth)) (columns[d] = columns[d] || []).push(id);
  const pos = {};
  const tallest = Math.max(...columns.map(c => c.length));
  const height = PAD * 2 + tallest * H + (tallest - 1) * GAPY;
  columns.forEach((ids, d) => {
    const colH = ids.length * H + (ids.length - 1) * GAPY;
    ids.forEach((id, i) => {
      const io = id === "request" || id === "response";
      pos[id] = {x: PAD + d * (W + GAPX), y: (height - colH) / 2 + i * (H + GAPY),
                 w: io ? 120 : W, h: io ? 46 : H};
      if (io) pos[id].y += (H - 46) / 2;
    });
  });
  return {pos, byId, width: PAD * 2 + columns.length * (W + GAPX) - GAPX, height};
}

function badge(parent, x, y, label, color) {
  const g = el("g", {class: "badge"}, parent);
  const w = 7 * label.length + 10;
  el("rect", {x, y, width: w, height: 17, fill: color}, g);
  el("text", {x: x + 5, y: y + 12.5}, g, label);
  return x + w + 5;
}

function drawGraph(svg, graph) {
  const {pos, width, height} = layout(graph);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const defs = el("defs", {}, svg);
  const marker = el("marker", {id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5,
                               markerWidth: 7, markerHeight: 7, orient: "auto"}, defs);
  el("path", {d: "M0,0 L10,5 L0,10 z", fill: "#9aa3b5"}, marker);
  const edge = (a, b) => {
    const p = pos[a], q = pos[b];
    const x1 = p.x + p.w, y1 = p.y + p.h / 2, x2 = q.x - 2, y2 = q.y + q.h / 2;
    const mx = (x1 + x2) / 2;
    el("path", {class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`}, svg);
  };
  for (const s of graph.stages) for (const i of s.inputs) edge(i, s.id);
  edge(graph.output, "response");
  for (const id of ["request", "response"]) {
    const p = pos[id], g = el("g", {class: "node io", "data-node": id}, svg);
    el("rect", {x: p.x, y: p.y, width: p.w, height: p.h}, g);
    el("text", {class: "title", x: p.x + 12, y: p.y + 28}, g, id);
  }
  const cells = {};
  for (const s of graph.stages) {
    const p = pos[s.id];
    const g = el("g", {class: "node stage", "data-stage": s.name}, svg);
    el("title", {}, g, s.ops.join("\n→ "));
    el("rect", {x: p.x, y: p.y, width: p.w, height: p.h}, g);
    el("text", {class: "title", x: p.x + 10, y: p.y + 19}, g, short(s.name, 32));
    const what = s.ops.length > 1 ? `fused ${s.ops.length} operators` : short(s.ops[0], 36);
    el("text", {class: "sub", x: p.x + 10, y: p.y + 36}, g, what);
    let bx = p.x + 10;
    const gpuNote = s.gpu_requested && s.placement !== "gpu" ? " (gpu asked)" : "";
    bx = badge(g, bx, p.y + 43, s.placement + gpuNote, s.placement === "gpu" ? "#0f8a7e" : "#5d6678");
    if (s.replicas > 1) bx = badge(g, bx, p.y + 43, `×${s.replicas} replicas`, "var(--rep)");
    if (s.batching) bx = badge(g, bx, p.y + 43,
      `batch ≤${s.batching.max_size}` + (s.batching.timeout_ms ? ` ${s.batching.timeout_ms}ms` : ""),
      "var(--batch)");
    if (s.locality_key) badge(g, bx, p.y + 43, `by ${s.locality_key}`, "var(--accent)");
    const line = (y, cls) => el("text", {class: cls, x: p.x + 10, y: p.y + y}, g, "–");
    cells[s.name] = {g, latency: line(80, "latency"), rate: line(98, "rate"),
                     load: line(116, "load")};
  }
  return cells;
}

function drawSpark(svg, history) {
  svg.replaceChildren();
  const w = 300, h = 30, max = Math.max(1, ...history);
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const pts = history.map((v, i) => `${(i / 59) * w},${h - 2 - (v / max) * (h - 4)}`);
  el("polyline", {points: pts.join(" "), fill: "none", stroke: "#2f6fde", "stroke-width": 2,
                    "vector-effect": "non-scaling-stroke"}, svg);
  svg.previousSibling.textContent = `req/s, last 60 s (max ${fmt(max, 1)})`;
}

function card(parent, label, cls) {
  const c = html("div", {class: "card"}, parent);
  html("div", {class: "label"}, c, label);
  return html("div", {class: "value " + cls}, c, "–");
}

function setupFlow(info) {
  const sec = html("section", {class: "flow", "data-flow": info.name}, document.getElementById("flows"));
  html("h2", {}, sec, `flow ${info.name}` + (info.slo ? `  ·  SLO ${JSON.stringify(info.slo)}` : ""));
  const cards = html("div", {class: "cards"}, sec);
  const view = {rps: card(cards, "throughput (req/s)", "rps"), p50: card(cards, "p50 (ms)", "p50"),
                p99: card(cards, "p99 (ms)", "p99"), ok: card(cards, "ok", "ok"),
                errors: card(cards, "errors", "errors")};
  const sparkCard = html("div", {class: "card spark"}, cards);
  html("div", {class: "label"}, sparkCard, "req/s, last 60 s");
  const spark = el("svg", {preserveAspectRatio: "none"}, sparkCard);
  const svg = el("svg", {class: "graph", role: "img", "aria-label": `plan of ${info.name}`}, sec);
  const det = html("details", {}, sec);
  html("summary", {}, det, "explain()");
  html("pre", {}, det, info.explain);
  state[info.name] = {cells: drawGraph(svg, info.graph), view, spark, prev: {}, history: []};
}

function update(name, data) {
  const st = state[name], http = data.http;
  let ok = 0, errors = 0;
  for (const [code, n] of Object.entries(http.by_status)) (Number(code) < 400 ? ok += n : errors += n);
  st.view.rps.textContent = fmt(http.throughput_rps, 1);
  st.view.p50.textContent = fmt(http.p50_ms, 2);
  st.view.p99.textContent = fmt(http.p99_ms, 2);
  st.view.ok.textContent = ok;
  st.view.errors.textContent = errors;
  st.history.push(http.throughput_rps);
  if (st.history.length > 60) st.history.shift();
  drawSpark(st.spark, st.history);
  for (const [stage, s] of Object.entries(data.stages)) {
    const cell = st.cells[stage];
    if (!cell) continue;
    const prev = st.prev[stage];
    const rps = prev ? (s.requests - prev[1]) / Math.max(1e-3, data.time - prev[0]) : 0;
    st.prev[stage] = [data.time, s.requests];
    cell.latency.textContent = `p50 ${fmt(s.p50_ms, 2)} ms · p99 ${fmt(s.p99_ms, 2)} ms`;
    cell.rate.textContent = `${fmt(rps, 1)} req/s · ${s.requests} done · batch ${fmt(s.batch_mean, 1)}`;
    cell.load.textContent = `workers ${s.workers} · queue ${s.queue} · cold starts ${s.cold_starts}`;
    cell.g.classList.toggle("busy", rps > 0);
    cell.g.dataset.requests = s.requests;
  }
}

async function getJSON(path) {
  const r = await fetch(path, {headers, cache: "no-store"});
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}` + (r.status === 401 ? " (open /#token=…)" : ""));
  return r.json();
}

async function tick() {
  const status = document.getElementById("status");
  try {
    await Promise.all(Object.keys(state).map(async n => update(n, await getJSON(`/v1/flows/${encodeURIComponent(n)}/stats`))));
    status.textContent = "live · updated " + new Date().toLocaleTimeString();
    status.className = "status";
  } catch (e) {
    status.textContent = String(e.message || e);
    status.className = "status error";
  }
}

async function start() {
  try {
    const {flows} = await getJSON("/v1/flows");
    flows.forEach(setupFlow);
    document.body.dataset.ready = "1";
    await tick();
    setInterval(tick, 1000);
  } catch (e) {
    const status = document.getElementById("status");
    status.textContent = String(e.message || e);
    status.className = "status error";
    setTimeout(start, 2000);
  }
}
start();
</script>
</body>
</html>
"""
