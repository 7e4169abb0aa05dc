// Drives a real `mozaiks serve` with the official AG-UI client (`@ag-ui/client`), for tests/test_agui_client.py.
//
// Usage: node run.mjs '<json>' with {url, threadId, headers, turns: [{message, answers, fresh}]}.
// Each turn sends `message` as a new user message (on a fresh HttpAgent when `fresh`, which then
// holds only that message) and runs the agent; a run that ends with an interrupt is resumed with
// the next of `answers`, the AG-UI way (`resume` entries), until a run finishes without one.
// The client's own pipeline verifies every event (order rules, schema) and rejects on a violation,
// which makes this script exit non-zero. Prints one JSON document: per turn, the runs' events and
// outcomes, and the messages the client assembled.
import { HttpAgent, buildResumeArray, randomUUID } from "@ag-ui/client";

const config = JSON.parse(process.argv[2]);
const MAX_RUNS_PER_TURN = 8;

function newAgent() {
  return new HttpAgent({ url: config.url, headers: config.headers ?? {}, threadId: config.threadId });
}

const output = { turns: [] };
let agent = newAgent();
for (const turn of config.turns) {
  if (turn.fresh) agent = newAgent();
  agent.addMessage({ id: randomUUID(), role: "user", content: turn.message });
  const answers = [...(turn.answers ?? [])];
  const runs = [];
  let resume;
  for (let i = 0; i < MAX_RUNS_PER_TURN; i++) {
    const events = [];
    let outcome = "none";
    let interrupts = [];
    await agent.runAgent(resume === undefined ? {} : { resume }, {
      onEvent({ event }) {
        events.push(event);
      },
      onRunFinishedEvent(params) {
        outcome = params.outcome;
        if (params.outcome === "interrupt") interrupts = params.interrupts;
      },
      onRunErrorEvent() {
        outcome = "error";
      },
    });
    runs.push({ outcome, events, interrupts });
    if (outcome !== "interrupt") break;
    const answer = answers.length > 0 ? answers.shift() : "exit";
    resume = buildResumeArray(
      interrupts,
      Object.fromEntries(interrupts.map((it) => [it.id, { status: "resolved", payload: answer }])),
    );
  }
  output.turns.push({ runs, messages: agent.messages });
}
process.stdout.write(JSON.stringify(output));
