// Run summary panel: renders a chat's `/metrics/perf/chat/{id}` (the `ChatMetrics` of /schema).

import { el } from "./render.js";

const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

function count(value) {
  return isNumber(value) ? integer.format(value) : null;
}

function milliseconds(value) {
  if (!isNumber(value)) return null;
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Math.round(value)} ms`;
}

function seconds(value) {
  if (!isNumber(value)) return null;
  if (value < 60) return `${value.toFixed(value < 10 ? 2 : 1)} s`;
  return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
}

/** Cost as money in `currency` (USD unless the runtime says otherwise). */
function money(amount, currency) {
  if (!isNumber(amount)) return null;
  const code = typeof currency === "string" && currency ? currency : "USD";
  const digits = amount !== 0 && Math.abs(amount) < 0.01 ? 5 : 2;
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency: code, maximumFractionDigits: digits }).format(amount);
  } catch {
    return `${amount.toFixed(digits)} ${code}`;
  }
}

function tokens(m) {
  if (!isNumber(m.total_tokens)) return null;
  const split = isNumber(m.prompt_tokens) && isNumber(m.completion_tokens)
    ? ` (${count(m.prompt_tokens)} in · ${count(m.completion_tokens)} out)`
    : "";
  return `${count(m.total_tokens)}${split}`;
}

function latency(l) {
  if (!l || typeof l !== "object") return null;
  const parts = [
    ["p50", l.p50],
    ["p95", l.p95],
    ["max", l.max],
  ].filter(([, v]) => isNumber(v)).map(([name, v]) => `${name} ${milliseconds(v)}`);
  return parts.length ? parts.join(" · ") : null;
}

/** Time to first token (p50 · p95) of the calls that streamed. */
function ttft(t) {
  if (!t || typeof t !== "object") return null;
  const parts = [["p50", t.p50], ["p95", t.p95]].filter(([, v]) => isNumber(v)).map(([name, v]) => `${name} ${milliseconds(v)}`);
  return parts.length ? parts.join(" · ") : null;
}

function rate(value) {
  if (!isNumber(value)) return null;
  return `${value >= 100 ? integer.format(value) : value.toFixed(1)} tokens/s`;
}

/**
 * Fill `container` with the run summary (a `ChatMetrics` of `/metrics/perf/chat/{id}`); `metrics`
 * null means the runtime has none yet. `visibleAgents` (a Set, when known) limits the per-agent table
 * to agents the chat shows: hidden agents count in the totals but are never named on the page.
 */
export function renderMetrics(container, metrics, visibleAgents = null) {
  const m = metrics && typeof metrics === "object" ? metrics : null;
  const failures = m && isNumber(m.tool_failures) && m.tool_failures > 0 ? ` (${count(m.tool_failures)} failed)` : "";
  const rows = m
    ? [
        ["Turns", count(m.turns), "turns"],
        ["Tool calls", count(m.tool_calls) !== null ? `${count(m.tool_calls)}${failures}` : null, "tool-calls"],
        ["Tokens", tokens(m), "tokens"],
        ["Cost", money(m.cost, m.currency), "cost"],
        ["LLM calls", count(m.llm?.count), "llm-calls"],
        ["LLM latency", latency(m.llm?.latency_ms), "llm-latency"],
        ["First token", ttft(m.llm?.ttft_ms), "ttft"],
        ["Output speed", rate(m.llm?.output_tokens_per_s), "output-speed"],
        ["Duration", seconds(m.duration_s), "duration"],
        ["Errors", isNumber(m.errors) && m.errors > 0 ? count(m.errors) : null, "errors"],
      ].filter(([, value]) => value !== null)
    : [];
  if (!rows.length) {
    container.replaceChildren(el("p", { class: "muted" }, "No metrics yet for this chat."));
    return;
  }
  const list = el("dl", { class: "metrics" });
  for (const [label, value, key] of rows) {
    list.append(el("div", { class: "metrics__row", "data-metric": key }, el("dt", {}, label), el("dd", {}, value)));
  }
  const children = [list];
  const agents = Object.entries(m.agents || {}).filter(([name]) => !visibleAgents || visibleAgents.has(name));
  if (agents.length) {
    const table = el("table", { class: "agent-metrics" },
      el("caption", {}, "By agent"),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Agent"), el("th", { scope: "col" }, "Turns"),
        el("th", { scope: "col" }, "Tools"), el("th", { scope: "col" }, "Tokens"))));
    const body = el("tbody");
    for (const [name, a] of agents) {
      body.append(el("tr", {}, el("th", { scope: "row" }, name), el("td", {}, count(a.turns) ?? "—"),
        el("td", {}, count(a.tool_calls) ?? "—"), el("td", {}, count(a.total_tokens) ?? "—")));
    }
    table.append(body);
    children.push(table);
  }
  container.replaceChildren(...children);
}
