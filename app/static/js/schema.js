// `/schema`'s page: the OpenAPI document as a list of operations (no inline script: the CSP forbids it).

import { el } from "./render.js";

const METHODS = ["get", "post", "put", "patch", "delete"];

/** The name a `$ref` points at (`#/components/schemas/ChatSummary` → ChatSummary). */
function refName(schema) {
  if (!schema || typeof schema !== "object") return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.type === "array") return `${refName(schema.items)}[]`;
  if (schema.oneOf || schema.anyOf) return (schema.oneOf || schema.anyOf).map(refName).filter(Boolean).join(" | ");
  return schema.type || "";
}

function bodyType(content) {
  const media = content && Object.values(content)[0];
  return media ? refName(media.schema) : "";
}

function operation(method, path, op) {
  const params = (op.parameters || []).map((p) =>
    el("li", {}, el("code", {}, p.name), ` (${p.in}${p.required ? ", required" : ""}) `, p.description || ""));
  const answers = Object.entries(op.responses || {}).map(([code, r]) =>
    el("li", {}, el("code", {}, code), " ", r.description || "", bodyType(r.content) ? ` → ${bodyType(r.content)}` : ""));
  const request = op.requestBody ? bodyType(op.requestBody.content) : "";
  return el("details", { class: "panel", "data-testid": "operation" },
    el("summary", {}, el("strong", {}, method.toUpperCase()), " ", el("code", {}, path), op.summary ? ` — ${op.summary}` : ""),
    op.description ? el("p", {}, op.description) : null,
    params.length ? el("div", {}, el("h3", {}, "Parameters"), el("ul", {}, ...params)) : null,
    request ? el("p", {}, "Body: ", el("code", {}, request)) : null,
    answers.length ? el("div", {}, el("h3", {}, "Answers"), el("ul", {}, ...answers)) : null);
}

async function main() {
  const root = document.getElementById("schema");
  const status = document.getElementById("status");
  try {
    const response = await fetch(document.body.dataset.openapi, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const doc = await response.json();
    const items = [];
    for (const [path, ops] of Object.entries(doc.paths || {})) {
      for (const method of METHODS) if (ops[method]) items.push(operation(method, path, ops[method]));
    }
    status.textContent = `${items.length} operations. Schemas are in the OpenAPI document (linked above).`;
    root.append(...items);
  } catch (err) {
    status.textContent = `The OpenAPI document could not be loaded: ${err.message}`;
    status.dataset.state = "error";
  }
}

main();
