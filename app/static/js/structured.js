// Structured output: an agent's validated object (`message.agent` data.structured) as a readable
// card titled from its JSON Schema, with a "raw JSON" toggle (a real button: Tab, Enter, Space).

import { el } from "./render.js";

let cards = 0;

/** Whether a record's `data.structured` holds an object to show as a card. */
export function isStructured(value) {
  return Boolean(value) && typeof value === "object" && !Array.isArray(value);
}

/** "due_date" → "Due date": the label of a field whose schema has no `title`. */
function label(key) {
  const words = String(key).replace(/([a-z])([A-Z])/g, "$1 $2").replace(/[_-]+/g, " ").trim();
  return words ? words[0].toUpperCase() + words.slice(1).toLowerCase() : String(key);
}

/** The object's keys in the schema's order, then any others. */
function orderedKeys(value, schema) {
  const declared = Object.keys(schema?.properties || {}).filter((key) => key in value);
  return [...declared, ...Object.keys(value).filter((key) => !declared.includes(key))];
}

function fieldValue(value, schema) {
  if (value === null || value === undefined) return el("span", { class: "structured__empty" }, "—");
  if (typeof value === "boolean") return value ? "Yes" : "No";
  if (Array.isArray(value)) {
    if (!value.length) return el("span", { class: "structured__empty" }, "none");
    return el("ul", { class: "structured__list" },
      ...value.map((item) => el("li", {}, fieldValue(item, schema?.items))));
  }
  if (typeof value === "object") return fields(value, schema);
  return String(value);
}

function fields(value, schema) {
  const list = el("dl", { class: "structured__fields" });
  for (const key of orderedKeys(value, schema)) {
    const property = schema?.properties?.[key];
    list.append(
      el("dt", { title: property?.description || null }, property?.title || label(key)),
      el("dd", {}, fieldValue(value[key], property)),
    );
  }
  return list;
}

/**
 * The card of one structured reply. `output` is the agent's structured output from /api/workflows
 * (`{name, schema}`), or null when the page does not know it: keys are then labelled by name.
 */
export function structuredCard(value, output) {
  const schema = output?.schema || null;
  const id = `structured-raw-${++cards}`;
  const raw = el("pre", { class: "structured__raw", id, hidden: true, tabindex: "0" }, JSON.stringify(value, null, 2));
  const toggle = el("button", {
    type: "button",
    class: "button button--ghost button--small structured__toggle",
    "aria-expanded": "false",
    "aria-controls": id,
    "data-testid": "structured-toggle",
  }, "Show raw JSON");
  toggle.addEventListener("click", () => {
    const open = raw.hidden;
    raw.hidden = !open;
    toggle.setAttribute("aria-expanded", String(open));
    toggle.textContent = open ? "Hide raw JSON" : "Show raw JSON";
  });
  const title = schema?.title || (output?.name ? label(output.name) : "Structured reply");
  return el("section", { class: "structured", "data-testid": "structured", "aria-label": title },
    el("p", { class: "structured__name" }, title),
    fields(value, schema),
    toggle,
    raw);
}

/** One line for an `output.invalid` record (internal events): which try, and the first errors. */
export function invalidOutputText(data) {
  const errors = Array.isArray(data.errors) ? data.errors : [];
  const shown = errors.slice(0, 3).map((e) => `${e.path}: ${e.message}`).join("; ");
  const more = errors.length > 3 ? ` (+${errors.length - 3} more)` : "";
  return `Reply did not match ${data.output ?? "its schema"} (try ${data.attempt ?? "?"}): ${shown}${more}`;
}
