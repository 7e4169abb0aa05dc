// UI tools in the conversation: a form generated from its JSON Schema, a choice as buttons, a confirm
// as Yes / No, and artifacts in a side panel updated in place. Everything is rebuilt from the log's
// records (`ui.requested`, `ui.responded`, `ui.expired`), so a reload or reconnect restores a pending
// request, shows an answered one read-only, and says when one expired.

import { el, renderMarkdown } from "./render.js";

const WAITING = new Set(["form", "choice", "confirm"]);

/** What is wrong with `value` for one property of a form's schema (the server checks the same rules with jsonschema). */
export function fieldProblem(schema, value, required) {
  if (value === undefined || value === "") return required ? "This field is required." : null;
  const type = schema.type;
  if (Array.isArray(schema.enum) && !schema.enum.includes(value)) return `Choose one of: ${schema.enum.join(", ")}.`;
  if (type === "integer" && !Number.isInteger(value)) return "Enter a whole number.";
  if (type === "number" && (typeof value !== "number" || Number.isNaN(value))) return "Enter a number.";
  if (type === "boolean" && typeof value !== "boolean") return "Choose yes or no.";
  if (typeof value === "number") {
    if (schema.minimum !== undefined && value < schema.minimum) return `Must be at least ${schema.minimum}.`;
    if (schema.maximum !== undefined && value > schema.maximum) return `Must be at most ${schema.maximum}.`;
  }
  if (typeof value === "string") {
    if (schema.minLength !== undefined && value.length < schema.minLength) return `Use at least ${schema.minLength} characters.`;
    if (schema.maxLength !== undefined && value.length > schema.maxLength) return `Use at most ${schema.maxLength} characters.`;
    if (schema.pattern !== undefined && !new RegExp(schema.pattern, "u").test(value)) return "This does not look right.";
  }
  return null;
}

function answerText(component, answer) {
  if (component === "confirm") return answer ? "Yes" : "No";
  if (component === "choice") return String(answer);
  return JSON.stringify(answer, null, 2);
}

export class UiRequests {
  /**
   * @param {HTMLElement} root  the conversation's <ol>
   * @param {object} hooks  onUiResponse(requestId, answer) → boolean (sent), announce(text)
   */
  constructor(root, hooks) {
    this.root = root;
    this.hooks = hooks;
    this.requests = new Map();
    this.artifacts = new Map();
    this.panel = null;
    this.sending = null;
  }

  reset() {
    this.requests.clear();
    this.artifacts.clear();
    this.sending = null;
    if (this.panel) this.panel.remove();
    this.panel = null;
  }

  /** Whether a form, choice or confirm waits for the user's answer. */
  get pending() {
    return [...this.requests.values()].some((r) => r.state === "open");
  }

  requested(record, live) {
    const data = record.data || {};
    const props = data.props || {};
    if (!WAITING.has(data.component)) {
      this.#artifact(record, props);
      this.root.append(el("li", { class: "marker", "data-testid": "event", "data-seq": record.seq,
        "data-type": record.type, "data-agent": record.agent || null },
        el("span", { class: "marker__text" }, `${record.agent || "An agent"} updated “${props.title || props.artifact_id}” in the side panel`)));
      return;
    }
    const id = String(data.request_id);
    const heading = props.title || props.question || "An agent asks";
    const node = el("li", { class: "msg msg--ui", "data-testid": "event", "data-ui-request": id,
      "data-component": data.component, "data-seq": record.seq, "data-type": record.type,
      "data-agent": record.agent || null });
    const titleId = `ui-title-${record.seq}`;
    node.append(el("div", { class: "msg__head" },
      el("span", { class: "msg__agent" }, record.agent || "Agent"),
      el("span", { class: "msg__note" }, data.component === "form" ? "asks you to fill in a form" : "asks you")));
    node.append(el("h3", { class: "ui__title", id: titleId }, heading));
    const status = el("p", { class: "ui__status", role: "status" });
    const request = { id, component: data.component, node, body: null, status, state: "open" };
    const body = this.#body(request, props, titleId);
    request.body = body;
    node.append(body, status);
    if (data.expires_at) {
      node.append(el("p", { class: "ui__expiry" }, `Answer before ${new Date(data.expires_at).toLocaleString()}.`));
    }
    this.root.append(node);
    this.requests.set(id, request);
    if (live) this.hooks.announce(`${record.agent || "An agent"} asks: ${heading}`);
  }

  responded(record) {
    const data = record.data || {};
    const request = this.requests.get(String(data.request_id));
    if (!request) return;
    this.#close(request, "answered", `Your answer: ${answerText(request.component, data.answer)}`);
  }

  expired(record) {
    const request = this.requests.get(String(record.data?.request_id));
    if (request) this.#close(request, "expired", "Expired: no answer was given in time.");
  }

  /** The server refused the answer being sent: show why and let the user try again. */
  refused(message) {
    const request = this.sending;
    if (!request || request.state !== "sending") return false;
    request.state = "open";
    this.#enable(request, true);
    request.status.textContent = message;
    return true;
  }

  #close(request, state, text) {
    request.state = state;
    request.node.classList.add(`is-${state}`);
    request.body.replaceWith(el("p", { class: "ui__answer", "data-testid": "ui-answer" }, text));
    request.status.textContent = "";
  }

  #enable(request, on) {
    for (const control of request.body.querySelectorAll("input, select, button, textarea")) control.disabled = !on;
  }

  #send(request, answer) {
    if (request.state !== "open") return;
    if (this.hooks.onUiResponse(request.id, answer)) {
      request.state = "sending";
      this.sending = request;
      this.#enable(request, false);
      request.status.textContent = "Sending…";
    } else {
      request.status.textContent = "Not connected: the answer was not sent. Send it again when the indicator says Live.";
    }
  }

  #body(request, props, titleId) {
    switch (request.component) {
      case "choice": {
        const group = el("div", { class: "ui__choices", role: "group", "aria-labelledby": titleId });
        for (const option of props.options || []) {
          const button = el("button", { type: "button", class: "button" }, String(option));
          button.addEventListener("click", () => this.#send(request, option));
          group.append(button);
        }
        return group;
      }
      case "confirm": {
        const group = el("div", { class: "ui__choices", role: "group", "aria-labelledby": titleId });
        for (const [label, value] of [["Yes", true], ["No", false]]) {
          const button = el("button", { type: "button", class: value ? "button button--primary" : "button" }, label);
          button.addEventListener("click", () => this.#send(request, value));
          group.append(button);
        }
        return group;
      }
      default:
        return this.#form(request, props.schema || {}, titleId);
    }
  }

  #form(request, schema, titleId) {
    const form = el("form", { class: "ui__form", "aria-labelledby": titleId, novalidate: true, "data-testid": "ui-form" });
    const required = new Set(schema.required || []);
    const fields = [];
    for (const [name, prop] of Object.entries(schema.properties || {})) {
      const id = `${request.id}-${name}`;
      const label = prop.title || name;
      const error = el("p", { class: "ui__error", id: `${id}-error`, hidden: true });
      const help = prop.description ? el("p", { class: "ui__help", id: `${id}-help` }, prop.description) : null;
      const described = [help && `${id}-help`, `${id}-error`].filter(Boolean).join(" ");
      let control;
      if (Array.isArray(prop.enum)) {
        control = el("select", { id, name, "aria-describedby": described, required: required.has(name) },
          el("option", { value: "" }, "—"), ...prop.enum.map((v) => el("option", { value: String(v) }, String(v))));
      } else if (prop.type === "boolean") {
        control = el("input", { id, name, type: "checkbox", "aria-describedby": described });
      } else if (prop.type === "integer" || prop.type === "number") {
        control = el("input", { id, name, type: "number", step: prop.type === "integer" ? "1" : "any",
          "aria-describedby": described, required: required.has(name) });
      } else {
        control = el("input", { id, name, type: prop.format === "email" ? "email" : "text", autocomplete: "off",
          "aria-describedby": described, required: required.has(name) });
      }
      const labelNode = el("label", { for: id }, label, required.has(name) ? el("span", { class: "ui__required", "aria-hidden": "true" }, " *") : null);
      form.append(el("div", { class: prop.type === "boolean" ? "ui__field ui__field--check" : "ui__field" }, labelNode, control, help, error));
      fields.push({ name, prop, control, error });
    }
    form.append(el("button", { type: "submit", class: "button button--primary" }, "Send"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const answer = {};
      let first = null;
      for (const { name, prop, control, error } of fields) {
        let value;
        if (prop.type === "boolean") value = control.checked;
        else if (control.value === "") value = undefined;
        else if (prop.type === "integer" || prop.type === "number") value = Number(control.value);
        else value = control.value;
        const problem = fieldProblem(prop, value, required.has(name));
        error.hidden = !problem;
        error.textContent = problem || "";
        if (problem) control.setAttribute("aria-invalid", "true");
        else control.removeAttribute("aria-invalid");
        if (problem && !first) first = control;
        if (value !== undefined) answer[name] = value;
      }
      if (first) {
        first.focus();
        request.status.textContent = "Please correct the marked fields.";
        return;
      }
      this.#send(request, answer);
    });
    return form;
  }

  #artifact(record, props) {
    if (!this.panel) {
      // The side column (beside the run summary) when the page has one.
      this.panel = el("section", { class: "artifacts", "aria-label": "Artifacts", "data-testid": "artifacts" });
      const side = document.getElementById("summary");
      if (side) side.prepend(this.panel);
      else this.root.after(this.panel);
    }
    const id = String(props.artifact_id ?? record.seq);
    let entry = this.artifacts.get(id);
    if (!entry) {
      entry = el("section", { class: "artifact", "data-artifact-id": id, "data-testid": "artifact" });
      this.artifacts.set(id, entry);
      this.panel.append(entry);
    }
    const content = String(props.content ?? "");
    let body;
    if (props.format === "code") {
      const copy = el("button", { type: "button", class: "button artifact__copy" }, "Copy");
      copy.addEventListener("click", () => navigator.clipboard?.writeText(content));
      body = el("div", {}, copy, el("pre", {}, el("code", {}, content)));
    } else {
      // Markdown, and tables (Markdown tables), sanitized like every agent text.
      body = el("div", { class: "md" }, renderMarkdown(content));
    }
    entry.replaceChildren(el("h3", { class: "artifact__title" }, props.title || id), body,
      el("p", { class: "artifact__meta" }, `${record.agent || "Agent"} · updated at seq ${record.seq}`));
  }
}
