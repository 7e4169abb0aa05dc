// The start form: the loaded workflows, what they show, and starting a chat on one.

import { api } from "./api.js";
import { refreshChats } from "./chatlist.js";
import { preference, reportFailure, showError, state, ui } from "./page.js";
import { el } from "./render.js";

export function renderWorkflowInfo() {
  const workflow = state.workflows.find((w) => w.name === ui.workflowSelect.value);
  if (!workflow) {
    ui.workflowInfo.replaceChildren();
    return;
  }
  const agents = Array.isArray(workflow.visual_agents) ? workflow.visual_agents : [];
  // An AgentDriven workflow's agent speaks first: the message is optional.
  const agentDriven = workflow.startup_mode === "AgentDriven";
  ui.startMessage.required = !agentDriven;
  ui.workflowInfo.replaceChildren(
    el("p", { class: "workflow-info__description" }, workflow.description || "No description."),
    el("p", { class: "workflow-info__meta" },
      workflow.pattern ? `${workflow.pattern} pattern` : "",
      agents.length ? `${workflow.pattern ? " · " : ""}Agents shown: ${agents.join(", ")}` : ""),
    agentDriven ? el("p", { class: "workflow-info__meta" }, "The agent starts the conversation; a message is optional.") : "",
  );
}

export async function loadWorkflows() {
  try {
    state.workflows = await api.workflows();
  } catch (err) {
    reportFailure(err);
    return;
  }
  const remembered = preference("mozaiks.workflow");
  ui.workflowSelect.replaceChildren(
    ...state.workflows.map((w) => el("option", { value: w.name, selected: w.name === remembered }, w.name)),
  );
  ui.startButton.disabled = state.workflows.length === 0;
  if (!state.workflows.length) {
    ui.workflowInfo.replaceChildren(el("p", {}, "No workflows found. Check MOZAIKS_WORKFLOWS_PATH."));
    return;
  }
  renderWorkflowInfo();
}

export async function startChat(event) {
  event.preventDefault();
  const workflow = ui.workflowSelect.value;
  const message = ui.startMessage.value.trim();
  if (!workflow || (!message && ui.startMessage.required)) {
    (workflow ? ui.startMessage : ui.workflowSelect).focus();
    return;
  }
  let context = {};
  const rawContext = ui.startContext.value.trim();
  if (rawContext) {
    try {
      context = JSON.parse(rawContext);
    } catch (err) {
      showError(`Context is not valid JSON: ${err.message}`);
      ui.startContext.focus();
      return;
    }
    if (!context || typeof context !== "object" || Array.isArray(context)) {
      showError("Context must be a JSON object, like {\"topic\": \"pricing\"}.");
      ui.startContext.focus();
      return;
    }
  }
  ui.startButton.disabled = true;
  ui.startButton.textContent = "Starting…";
  try {
    const created = await api.startChat(workflow, message || undefined, context);
    if (!created || !created.chat_id) throw new Error("The runtime did not return a chat_id.");
    preference("mozaiks.workflow", workflow);
    ui.startMessage.value = "";
    state.focusComposer = true;
    location.hash = `chat=${encodeURIComponent(created.chat_id)}`;
    refreshChats();
  } catch (err) {
    reportFailure(err);
  } finally {
    ui.startButton.disabled = state.workflows.length === 0;
    ui.startButton.textContent = "Start chat";
  }
}

/** The agents a workflow shows (null when the workflow list does not say). */
export function visibleAgents(workflowName) {
  const workflow = state.workflows.find((w) => w.name === workflowName);
  return Array.isArray(workflow?.visual_agents) ? new Set(workflow.visual_agents) : null;
}

/** What the workflow says about an agent (its type, its structured output), when /api/workflows lists it. */
export function agentInfo(workflowName, agentName) {
  const workflow = state.workflows.find((w) => w.name === workflowName);
  const agent = (workflow?.agents || []).find((a) => a.name === agentName);
  return agent ? { role: agent.type, description: null, output: agent.structured_output || null } : {};
}
