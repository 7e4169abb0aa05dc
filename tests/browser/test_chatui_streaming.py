"""Streaming in the ChatUI: an agent's card grows as the model writes, becomes final with the message,
is announced once, and a message cut off by a failed run is shown as incomplete.

The runtime is a `mozaiks serve` of its own whose OpenAI-compatible model server runs in this test
and streams SSE through the real `openai` SDK; the test lets chunks through one step at a time.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser

from domain.store import MongoEventStore
from tests.browser.conftest import ChatUI, Runtime, open_chatui, start_runtime, stop_runtime
from tests.llm_server import Gate, StreamingModel, text_reply

STORY = "## A streamed story\n\n" + " ".join(f"word{i}" for i in range(60)) + "\n\n**The end.**"
CUT = "This answer will be cut off in the middle of a sentence because the"


@pytest.fixture(scope="module")
def gate() -> Iterator[Gate]:
    held = Gate()
    yield held
    held.close()


@pytest.fixture(scope="module")
def model(gate: Gate) -> Iterator[StreamingModel]:
    # Request 0: the story, let through by the test; request 1: an answer whose connection drops.
    server = StreamingModel([text_reply(STORY, 30), text_reply(CUT, 8, cut_after=4)], before_chunk=gate.wait)
    yield server
    server.close()


@pytest.fixture(scope="module")
def streaming_runtime(tmp_path_factory: pytest.TempPathFactory, model: StreamingModel) -> Iterator[Runtime]:
    server = start_runtime(
        tmp_path_factory.mktemp("streaming"),
        # One try per model call: the cut-off answer must end the run, not be retried (retries: tests/faults/).
        {
            "OPENAI_BASE_URL": model.base_url,
            "OPENAI_API_KEY": "sk-test",
            "MOZAIKS_STREAM_FLUSH_MS": "0",
            "MOZAIKS_LLM_ATTEMPTS": "1",
        },
    )
    try:
        yield server
    finally:
        stop_runtime(server)


@pytest.fixture
async def ui(browser: Browser, streaming_runtime: Runtime) -> AsyncIterator[ChatUI]:
    async with open_chatui(browser, streaming_runtime) as page:
        yield page


CARD = "document.querySelector('[data-message-id]')"


async def card(ui: ChatUI) -> dict[str, Any]:
    """The streamed card's state as the user (and a screen reader) gets it."""
    return dict(
        await ui.page.evaluate(f"""() => {{
        const body = {CARD};
        const user = document.querySelector("[data-type='message.user']");
        return {{
            text: body ? body.innerText : null,
            streaming: body ? body.classList.contains("is-streaming") : null,
            busy: body ? body.getAttribute("aria-busy") : null,
            type: body ? body.dataset.type || null : null,
            heading: body ? Boolean(body.querySelector("h2")) : null,
            userTop: user ? user.offsetTop : null,
            announced: document.querySelector("[data-testid=announcer]").textContent,
        }};
    }}""")
    )


async def test_an_agent_card_grows_while_the_model_streams_then_becomes_final(
    ui: ChatUI, gate: Gate, model: StreamingModel
) -> None:
    chunks = model.replies[0].chunks
    gate.allow_through(3)
    chat_id = await ui.start_chat("Story", "Tell me a story")
    # Every text the polite live region gets (what a screen reader would read out).
    await ui.page.evaluate("""() => {
        const region = document.querySelector("[data-testid=announcer]");
        window.__announced = [];
        new MutationObserver(() => window.__announced.push(region.textContent))
            .observe(region, {childList: true, characterData: true, subtree: true});
    }""")
    seen: list[dict[str, Any]] = []
    for step in (3, 12, 21):
        gate.allow_through(step)
        last_word = "".join(chunks[: step + 1]).split()[-1]
        await ui.wait_until(f"({CARD}?.innerText || '').includes({last_word!r})", timeout=30)
        state = await card(ui)
        # Still the growing card: not final, busy for assistive tech, nothing announced yet.
        assert state["streaming"] and state["busy"] == "true" and state["type"] is None, state
        assert "word" not in state["announced"], state["announced"]
        seen.append(state)
    lengths = [len(s["text"]) for s in seen]
    assert lengths == sorted(lengths) and len(set(lengths)) == 3, lengths
    assert seen[0]["heading"], "the partial text is rendered as Markdown"
    assert len({s["userTop"] for s in seen}) == 1, "earlier cards never move while the card grows"

    gate.open()
    await ui.wait_for_event("[data-type='message.agent'][data-agent='Narrator']")
    final = await card(ui)
    assert final["type"] == "message.agent" and not final["streaming"] and final["busy"] is None
    assert "The end." in final["text"] and "**" not in final["text"]
    assert final["userTop"] == seen[0]["userTop"]
    await ui.wait_for_end()
    announced = await ui.page.evaluate("() => window.__announced")
    # The message is read out once, when final; no delta was.
    assert [a for a in announced if "word" in a] == [f"Narrator: {STORY[:200]}"], announced
    logged = await ui.assert_matches_log(chat_id)
    message = next(r for r in logged if r["type"] == "message.agent")
    assert message["data"]["content"] == STORY
    assert await ui.page.locator("[data-testid=incomplete]").count() == 0


async def test_a_message_cut_off_by_a_failed_run_is_shown_incomplete(
    ui: ChatUI, gate: Gate, browser: Browser
) -> None:
    gate.open()
    chat_id = await ui.start_chat("Story", "Tell me another one")
    assert await ui.wait_for_end() == "run.failed"
    note = ui.page.locator("[data-testid=incomplete]")
    await note.wait_for(state="attached")
    state = await card(ui)
    assert state["type"] is None and not state["streaming"] and state["busy"] is None
    assert state["text"].startswith("This answer will be cut off") and "Incomplete" in state["text"]
    # Opened afresh (a replay from the log, nothing cached), the partial message is shown the same way.
    async with open_chatui(browser, ui.runtime) as other:
        await other.open(f"#chat={chat_id}")
        await other.page.locator("[data-testid=incomplete]").wait_for(state="attached")
        assert (await card(other))["text"].startswith("This answer will be cut off")
    records = await ui.runtime.events(chat_id)
    assert [r["type"] for r in records if r["type"] in ("message.delta", "message.agent")][
        -1
    ] == "message.delta"


async def test_kill_9_mid_stream_keeps_the_deltas_and_the_surviving_node_shows_the_message_incomplete(
    browser: Browser,
    tmp_path_factory: pytest.TempPathFactory,
    mongo_uri: str,
    db_name: str,
    store: MongoEventStore,
) -> None:
    """Two `mozaiks serve` on one database; the one running the chat is killed with SIGKILL mid-stream."""
    held = Gate()
    reply = text_reply("The start of an answer that the node will not live to finish " * 4, 40)
    model = StreamingModel([reply], before_chunk=held.wait)
    env = {
        "DATABASE_URI": mongo_uri,
        "MOZAIKS_DB": db_name,
        "OPENAI_BASE_URL": model.base_url,
        "OPENAI_API_KEY": "sk-test",
        "MOZAIKS_LEASE_TTL_S": "1.5",
        "MOZAIKS_STREAM_FLUSH_MS": "20",
    }
    root = tmp_path_factory.mktemp("killed")
    doomed = start_runtime(root / "a", env)
    survivor = start_runtime(root / "b", env)
    try:
        held.allow_through(9)
        async with httpx.AsyncClient(base_url=doomed.base_url) as http:
            response = await http.post(
                "/api/chats", json={"workflow": "Story", "message": "Tell me something"}
            )
            chat_id = str(response.json()["chat_id"])
        so_far = "".join(reply.chunks[:10])
        # Wait until the first ten chunks are in the log, then kill the node in the middle of the message.
        async with asyncio.timeout(60):
            streamed = ""
            async for record in store.subscribe(chat_id):
                if record.type == "message.delta":
                    streamed += record.data["text"]
                    if streamed == so_far:
                        break
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait(timeout=10)

        async with asyncio.timeout(60):
            async for record in store.subscribe(chat_id):
                if record.type in ("run.failed", "run.completed", "run.stopped"):
                    break
        assert record.type == "run.failed" and record.data["reason"] == "interrupted", record
        records = [r async for r in store.read(chat_id)]
        assert "".join(r.data["text"] for r in records if r.type == "message.delta") == so_far
        assert not [r for r in records if r.type == "message.agent"]
        assert (await store.verify(chat_id)).ok

        async with open_chatui(browser, survivor) as ui:
            await ui.open(f"#chat={chat_id}")
            assert await ui.wait_for_end() == "run.failed"
            await ui.page.locator("[data-testid=incomplete]").wait_for(state="attached")
            state = await card(ui)
            assert state["text"].startswith(so_far.strip()) and "Incomplete" in state["text"], state
            assert state["type"] is None and not state["streaming"]
    finally:
        held.close()
        stop_runtime(survivor)
        stop_runtime(doomed)
        model.close()
