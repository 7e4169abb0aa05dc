// Run summary panel: renders whatever subset of `/metrics/perf/chat/{id}` the runtime returns.

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

/** Cost as money: a number (in `currency`), or an object like {usd} / {amount, currency}. */
function money(value, defaultCurrency) {
  let amount = value;
  let currency = typeof defaultCurrency === "string" && defaultCurrency ? defaultCurrency : "USD";
  if (value && typeof value === "object") {
    amount = value.usd ?? value.amount ?? value.total;
    currency = value.currency || currency;
  }
  if (!isNumber(amount)) return null;
  const digits = amount !== 0 && Math.abs(amount) < 0.01 ? 5 : 2;
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency, maximumFractionDigits: digits }).format(amount);
  } catch {
    return `${amount.toFixed(digits)} ${currency}`;
  }
}

function tokens(m) {
  const total = isNumber(m.total_tokens)
    ? m.total_tokens
    : isNumber(m.prompt_tokens) || isNumber(m.completion_tokens)
      ? (m.prompt_tokens || 0) + (m.completion_tokens || 0)
      : null;
  if (total === null) return null;
  const split = isNumber(m.prompt_tokens) && isNumber(m.completion_tokens)
    ? ` (${count(m.prompt_tokens)} in · ${count(m.completion_tokens)} out)`
    : "";
  return `${count(total)}${split}`;
}

function latency(llm) {
  let l = llm && typeof llm === "object" ? llm.latency_ms : null;
  if (!l && llm && isNumber(llm.latency_us_max)) l = { max: llm.latency_us_max / 1000 };
  if (!l || typeof l !== "object") return null;
  const parts = [
    ["p50", l.p50],
    ["p95", l.p95],
    ["max", l.max],
  ].filter(([, v]) => isNumber(v)).map(([name, v]) => `${name} ${milliseconds(v)}`);
  return parts.length ? parts.join(" · ") : null;
}

/** Time to first token (p50 · p95) of the calls that streamed. */
function ttft(llm) {
  const t = llm && typeof llm === "object" ? llm.ttft_ms : null;
  if (!t || typeof t !== "object") return null;
  const parts = [["p50", t.p50], ["p95", t.p95]].filter(([, v]) => isNumber(v)).map(([name, v]) => `${name} ${milliseconds(v)}`);
  return parts.length ? parts.join(" · ") : null;
}

function rate(value) {
  if (!isNumber(value)) return null;
  return `${value >= 100 ? integer.format(value) : value.toFixed(1)} tokens/s`;
}

/** Per-agent rows from `agents` as an object keyed by name or a list of {agent|name, …}. */
function agentRows(agents) {
  if (Array.isArray(agents)) return agents.map((a) => [a.agent ?? a.name ?? "?", a]);
  if (agents && typeof agents === "object") return Object.entries(agents);
  return [];
}

/**
 * Fill `container` with the run summary; `metrics` null means the runtime has none yet.
 * `visibleAgents` (a Set, when known) limits the per-agent table to agents the chat shows:
 * hidden agents count in the totals but are never named on the page.
 */
export function renderMetrics(container, metrics, visibleAgents = null) {
  // The numbers may sit at the top level or under one of these keys, depending on the projection.
  const nested = metrics && typeof metrics === "object"
    ? ["metrics", "totals", "chat"].map((key) => metrics[key]).find((v) => v && typeof v === "object")
    : null;
  const m = metrics && typeof metrics === "object" ? { ...metrics, ...(nested || {}) } : null;
  const failures = m && isNumber(m.tool_failures) && m.tool_failures > 0 ? ` (${count(m.tool_failures)} failed)` : "";
  const rows = m
    ? [
        ["Turns", count(m.turns), "turns"],
        ["Tool calls", count(m.tool_calls) !== null ? `${count(m.tool_calls)}${failures}` : null, "tool-calls"],
        ["Tokens", tokens(m), "tokens"],
        ["Cost", money(m.cost ?? (isNumber(m.cost_nanousd) ? m.cost_nanousd / 1e9 : null), m.currency), "cost"],
        ["LLM calls", count(m.llm?.count ?? m.llm_calls), "llm-calls"],
        ["LLM latency", latency(m.llm?.latency_ms ? m.llm : m), "llm-latency"],
        ["First token", ttft(m.llm), "ttft"],
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
  const agents = agentRows(m.agents ?? m.per_agent).filter(([name]) => !visibleAgents || visibleAgents.has(name));
  if (agents.length) {
    const table = el("table", { class: "agent-metrics" },
      el("caption", {}, "By agent"),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Agent"), el("th", { scope: "col" }, "Turns"),
        el("th", { scope: "col" }, "Tools"), el("th", { scope: "col" }, "Tokens"))));
    const body = el("tbody");
    for (const [name, a] of agents) {
      const total = isNumber(a?.total_tokens) ? a.total_tokens : (a?.prompt_tokens || 0) + (a?.completion_tokens || 0);
      body.append(el("tr", {}, el("th", { scope: "row" }, name), el("td", {}, count(a?.turns) ?? "—"),
        el("td", {}, count(a?.tool_calls) ?? "—"), el("td", {}, count(total) ?? "—")));
    }
    table.append(body);
    children.push(table);
  }
  container.replaceChildren(...children);
}
