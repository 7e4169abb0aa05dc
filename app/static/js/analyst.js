// Analytics page: cost and p95 latency per day by workflow, from /metrics/perf/series, drawn as SVG.
// No inline scripts or styles (the page's CSP forbids them): elements are built with the DOM API.

import { request, setToken, takeTokenFromFragment } from "./api.js";
import { el } from "./render.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 720;
const HEIGHT = 240;
const PAD = { left: 64, right: 16, top: 12, bottom: 28 };
const COLOURS = ["#2b5c94", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490", "#a16207", "#be185d"];
const DAY_MS = 86_400_000;

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

function money(value) {
  return new Intl.NumberFormat(undefined, { style: "currency", currency: "USD", maximumFractionDigits: value && value < 1 ? 5 : 2 }).format(value);
}

function ms(value) {
  if (value === null || value === undefined) return "—";
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : value < 10 ? `${value.toFixed(1)} ms` : `${Math.round(value)} ms`;
}

function dayLabel(time) {
  return new Date(time).toISOString().slice(5, 10);
}

/** Points grouped into one line per workflow: {workflow: [[dayTime, value], ...]} in day order. */
function lines(points, value) {
  const byWorkflow = new Map();
  for (const point of points) {
    const name = point.workflow || "(none)";
    const y = value(point);
    if (y === null || y === undefined) continue;
    if (!byWorkflow.has(name)) byWorkflow.set(name, []);
    byWorkflow.get(name).push([Date.parse(point.start), y]);
  }
  for (const series of byWorkflow.values()) series.sort((a, b) => a[0] - b[0]);
  return byWorkflow;
}

/** A line chart of `series` over [from, to] with a y axis formatted by `format`. */
function chart(container, series, from, to, format, label) {
  const values = [...series.values()].flat().map(([, y]) => y);
  const top = Math.max(...values, 0) || 1;
  const x = (t) => PAD.left + ((t - from) / Math.max(to - from, 1)) * (WIDTH - PAD.left - PAD.right);
  const y = (v) => HEIGHT - PAD.bottom - (v / top) * (HEIGHT - PAD.top - PAD.bottom);
  const root = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": label });
  root.append(svg("line", { class: "axis", x1: PAD.left, x2: WIDTH - PAD.right, y1: y(0), y2: y(0) }));
  root.append(svg("line", { class: "axis", x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: y(0) }));
  for (const fraction of [0, 0.5, 1]) {
    const tick = svg("text", { x: PAD.left - 6, y: y(top * fraction) + 4, "text-anchor": "end" });
    tick.textContent = format(top * fraction);
    root.append(tick);
  }
  const days = Math.max(Math.round((to - from) / DAY_MS), 1);
  const step = Math.max(Math.ceil(days / 8), 1);
  for (let t = from; t <= to; t += step * DAY_MS) {
    const tick = svg("text", { x: x(t), y: HEIGHT - 8, "text-anchor": "middle" });
    tick.textContent = dayLabel(t);
    root.append(tick);
  }
  const legend = el("ul", { class: "legend" });
  let index = 0;
  for (const [workflow, points] of series) {
    const colour = COLOURS[index++ % COLOURS.length];
    const d = points.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    root.append(svg("path", { d, fill: "none", stroke: colour, "stroke-width": 2, "data-workflow": workflow, "data-testid": "line" }));
    for (const [t, v] of points) {
      const dot = svg("circle", { cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 3, fill: colour, "data-testid": "point", "data-workflow": workflow });
      const title = svg("title");
      title.textContent = `${workflow} · ${dayLabel(t)} · ${format(v)}`;
      dot.append(title);
      root.append(dot);
    }
    const swatch = svg("svg", { class: "swatch", viewBox: "0 0 10 10", width: 12, height: 12, "aria-hidden": "true" });
    swatch.append(svg("rect", { width: 10, height: 10, rx: 2, fill: colour }));
    legend.append(el("li", { "data-workflow": workflow }, swatch, ` ${workflow}`));
  }
  container.replaceChildren(root, legend);
}

function table(container, points) {
  const head = el("tr", {}, ...["Day", "Workflow", "Calls", "Tokens", "Cost", "p95 latency"].map((h) => el("th", { scope: "col" }, h)));
  const rows = points.map((p) => el("tr", {},
    el("td", {}, p.start.slice(0, 10)), el("td", {}, p.workflow || "(none)"), el("td", {}, String(p.calls)),
    el("td", {}, String(p.total_tokens)), el("td", {}, money(p.cost)), el("td", {}, ms(p.latency_ms.p95))));
  container.replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
}

async function load() {
  const status = document.getElementById("status");
  const days = Number(document.getElementById("days").value) || 30;
  const to = Date.now() - (Date.now() % DAY_MS) + DAY_MS;
  const from = to - days * DAY_MS;
  const query = `from=${new Date(from).toISOString()}&to=${new Date(to).toISOString()}&bucket=day&group_by=workflow`;
  document.getElementById("csv-link").href = `/metrics/perf/series?${query}&format=csv`;
  status.dataset.state = "loading";
  status.textContent = "Loading…";
  try {
    const body = await request("GET", `/metrics/perf/series?${query}`);
    const points = body.points || [];
    chart(document.getElementById("cost-chart"), lines(points, (p) => p.cost), from, to - DAY_MS, money, "Cost per day by workflow");
    chart(document.getElementById("latency-chart"), lines(points, (p) => p.latency_ms.p95), from, to - DAY_MS, ms, "p95 latency per day by workflow");
    table(document.getElementById("table"), points);
    status.dataset.state = "ready";
    status.textContent = points.length ? `${points.length} day × workflow points, last ${days} days (UTC days).` : `No LLM calls in the last ${days} days.`;
  } catch (err) {
    status.dataset.state = "error";
    status.textContent = err.status === 403 ? "This page needs a token with the analyst role." : err.message;
  }
}

const fragmentToken = takeTokenFromFragment();
if (fragmentToken) setToken(fragmentToken);
document.getElementById("days").addEventListener("change", load);
load();
