"""The ChatUI in plain words, on a run with a hidden agent and a real (local) model server.

The `Relay` workflow's hidden Planner works first (its model call is held by the test: the page must
say "Working…" and never its name), then the visible Writer streams a question and hands the
conversation to the user. Along the way: a reload mid-stream and one while waiting render the same
cards as before; the model server goes away and the failure reads as a sentence with a Retry that
succeeds once the server is back; Escape in the message box stops the run. axe-core checks the
streaming, waiting and failed views in light and dark themes.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from playwright.async_api import Browser

from tests.browser.conftest import (
    ChatUI,
    Runtime,
    accessibility_problems,
    open_chatui,
    start_runtime,
    stop_runtime,
)
from tests.llm_server import StreamingModel, text_reply

PLAN = "Plan: ask which city, then write a short piece about it."
QUESTION = "Which city should I write about? Tell me one, and I will write about it."
PIECE = "Here is your piece about Paris. Anything else?"
# Words the user must never read: AG2's prompt, its handoff kinds, hidden names, internal ids.
JARGON = (
    "Replying as",
    "chat_manager",
    "after_work",
    "llm_condition",
    "Revert to User",
    "Next speaker",
    "Planner",
)


class Holds:
    """Hold chosen (reply, chunk) pairs of the model server until the test releases them."""

    def __init__(self) -> None:
        self.held: dict[tuple[int, int], threading.Event] = {}
        self.closed = False

    def hold(self, reply: int, chunk: int) -> None:
        self.held[(reply, chunk)] = threading.Event()

    def release(self, reply: int, chunk: int) -> None:
        self.held[(reply, chunk)].set()

    def wait(self, reply: int, chunk: int) -> None:
        event = self.held.get((reply, chunk))
        if event is not None and not self.closed and not event.wait(timeout=60):
            raise TimeoutError(f"reply {reply} chunk {chunk} was never released")

    def close(self) -> None:
        self.closed = True
        for event in self.held.values():
            event.set()


@pytest.fixture(scope="module")
def holds() -> Iterator[Holds]:
    held = Holds()
    yield held
    held.close()


@pytest.fixture(scope="module")
def model(holds: Holds) -> Iterator[StreamingModel]:
    # Reply 0: the hidden Planner; reply 1: the Writer's question, streamed in 8 pieces.
    server = StreamingModel([text_reply(PLAN, 3), text_reply(QUESTION, 8)], before_chunk=holds.wait)
    yield server
    server.close()


@pytest.fixture(scope="module")
def relay_runtime(tmp_path_factory: pytest.TempPathFactory, model: StreamingModel) -> Iterator[Runtime]:
    server = start_runtime(
        tmp_path_factory.mktemp("plain"),
        {
            "OPENAI_BASE_URL": model.base_url,
            "OPENAI_API_KEY": "sk-test",
            "MOZAIKS_STREAM_FLUSH_MS": "0",
            "MOZAIKS_LLM_ATTEMPTS": "1",  # a refused model call fails the run at once
        },
    )
    try:
        yield server
    finally:
        stop_runtime(server)


@pytest.fixture
async def ui(browser: Browser, relay_runtime: Runtime) -> AsyncIterator[ChatUI]:
    async with open_chatui(browser, relay_runtime) as page:
        yield page


async def cards(ui: ChatUI) -> list[str]:
    """Each top-level item of the conversation as the reader sees it (kind, agent, text), and the exact
    instants behind its times (a streamed message's shown to the minute hid its first piece's time)."""
    return list(
        await ui.page.eval_on_selector_all(
            "#events > li",
            "items => items.map(li => `${li.className} | ${li.dataset.agent || ''} | ${li.innerText.trim()}`"
            " + ` | ${[...li.querySelectorAll('time')].map((t) => t.dateTime).join(' ')}`)",
        )
    )


async def reload_shows_the_same(ui: ChatUI, ready: str) -> list[str]:
    before = await cards(ui)
    await ui.page.reload()
    await ui.page.wait_for_selector(ready, state="attached", timeout=20_000)
    await ui.wait_for_connection("live")
    after = await cards(ui)
    assert after == before, f"reloaded page differs:\nbefore {before}\nafter  {after}"
    return after


async def working(ui: ChatUI) -> Any:
    return await ui.page.evaluate(
        "() => { const w = document.querySelector('[data-testid=working]'); return w.hidden ? null : w.innerText; }"
    )


async def chat_text(ui: ChatUI) -> str:
    return str(await ui.page.locator("#chat-view").inner_text())


async def test_a_run_in_plain_words_reload_retry_and_escape(
    ui: ChatUI, holds: Holds, model: StreamingModel, browser: Browser
) -> None:
    holds.hold(0, 0)  # the hidden Planner's call hangs until released
    holds.hold(1, 3)  # the Writer's question stops after three pieces
    chat_id = await ui.start_chat("Relay", "Write about a city")
    page = ui.page
    assert await page.evaluate("() => document.activeElement.id") == "composer-text"
    # Only the hidden Planner is at work: the page says so without naming it.
    await ui.wait_until("document.querySelector('[data-testid=working]').hidden === false")
    assert await working(ui) == "Working…"
    assert (await page.inner_text("[data-testid=chat-title]")) == "Relay"
    assert (await page.inner_text("[data-testid=chat-subtitle]")) == "Write about a city"
    assert chat_id not in await page.inner_text(".chat__head")
    assert "Running…" in await page.inner_text("[data-testid=run-summary-body]")
    await ui.screenshot("plain-working")

    holds.release(0, 0)
    stream = "[data-testid=stream][data-agent=Writer]"
    await page.wait_for_selector(stream, timeout=20_000)
    await ui.wait_until("document.querySelector('[data-testid=working]').hidden === true")
    # Mid-stream: a reload shows the same cards (the partial text included), then streams on.
    await reload_shows_the_same(ui, stream)
    problems = await accessibility_problems(ui, "streaming")

    holds.release(1, 3)
    await ui.pending_request()
    question = await page.inner_text("[data-testid=input-form] >> xpath=.. >> [data-testid=input-question]")
    assert question.strip() == QUESTION
    assert "Writer handed the conversation to you" in await chat_text(ui)
    assert await working(ui) is None
    await reload_shows_the_same(ui, "[data-testid=input-form]")
    for word in JARGON:
        assert word not in await chat_text(ui), f"the page says {word!r}"
    problems += await accessibility_problems(ui, "waiting")

    # The model server goes away: the answer's run fails, said in a sentence, with a Retry.
    port = int(model.httpd.server_address[1])
    model.close()
    await ui.answer("Paris")
    assert await ui.wait_for_end() == "run.failed"
    failure = page.locator("[data-type='run.failed']")
    assert "The model could not be reached" in await failure.inner_text()
    assert "APIConnectionError" not in await failure.inner_text()  # folded under Details
    problems += await accessibility_problems(ui, "failed")

    back = StreamingModel([text_reply(PLAN, 2), text_reply(PIECE, 3)], port=port)
    try:
        await failure.locator("[data-testid=retry]").click()
        await page.wait_for_selector(
            f"[data-type='message.agent'][data-agent=Writer] >> text={PIECE}", timeout=20_000
        )
        await ui.pending_request()
        records = await ui.runtime.events(chat_id)
        assert [r["data"]["content"] for r in records if r["type"] == "message.user"][-1] == "Paris"
        assert await page.locator("[data-testid=retry]").count() == 0, "Retry stays after the retried run"

        # Escape in the message box stops the run; focus stays there.
        await page.focus("[data-testid=composer-text]")
        await page.keyboard.press("Escape")
        await ui.wait_for_event("[data-type='run.stopped']")
        assert "Stopped by you" in await page.inner_text("[data-type='run.stopped']")
        assert await page.evaluate("() => document.activeElement.id") == "composer-text"
        await ui.assert_matches_log(chat_id)
        await ui.screenshot("plain-stopped")
    finally:
        back.close()
    assert not problems, "\n".join(problems)
