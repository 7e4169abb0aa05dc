// The run summary panel's data: a chat's metrics, fetched again while the projection catches up.

import { api, ApiError } from "./api.js";
import { renderMetrics } from "./metrics.js";
import { state, ui } from "./page.js";
import { el } from "./render.js";
import { visibleAgents } from "./workflows.js";

export async function loadMetrics(chatId) {
  try {
    const metrics = await api.metrics(chatId);
    // A run going on says "Running…" (main.js); numbers fetched before it started must not replace that.
    if (chatId === state.chatId && !state.runActive) renderMetrics(ui.summaryBody, metrics, visibleAgents(ui.chatTitle.textContent));
    return metrics;
  } catch (err) {
    if (chatId !== state.chatId) return null;
    if (err instanceof ApiError && err.status === 404) {
      renderMetrics(ui.summaryBody, null);
    } else if (!(err instanceof ApiError && err.status === 401)) {
      ui.summaryBody.replaceChildren(el("p", { class: "muted" }, `Metrics unavailable: ${err.message}`));
    }
    return null;
  }
}

/** Metrics are a projection and may lag the log a little: fetch now and again shortly after. */
export function refreshMetricsAfterRun(chatId, seq) {
  state.metricsTimers.forEach(clearTimeout);
  const delays = [0, 1200, 4000];
  state.metricsTimers = delays.map((delay, index) =>
    setTimeout(async () => {
      const metrics = await loadMetrics(chatId);
      const caughtUp = metrics && Number.isFinite(metrics.last_seq) && metrics.last_seq >= seq;
      if (caughtUp) state.metricsTimers.slice(index + 1).forEach(clearTimeout);
    }, delay),
  );
}
