"""Network drop and page reload in the middle of a run: every visible event shows exactly once, in order.

The Assistant workflow waits for the user between turns, which keeps a run open for as long as the
test needs; the answers given while the page is away come from a second WebSocket client, so the
log grows while the page cannot see it.
"""

from __future__ import annotations

import json
import re

from websockets.asyncio.client import connect

from tests.browser.conftest import HEARTBEAT_S, ChatUI, Runtime, records_of


async def answer_from_elsewhere(runtime: Runtime, chat_id: str, request_id: str, text: str) -> None:
    """Answer an input request as another client of the same chat would (e.g. a second tab)."""
    async with connect(f"{runtime.ws_url}/ws/chats/{chat_id}?after=0") as socket:
        await socket.send(json.dumps({"type": "input.response", "request_id": request_id, "text": text}))
        # Read until the answer is in the log, so the socket does not close before the server took it.
        async for raw in socket:
            frame = json.loads(raw)
            if frame.get("type") == "error":
                raise AssertionError(f"server refused the answer: {frame}")
            event = frame.get("event") or {}
            if event.get("type") == "input.received" and event["data"].get("request_id") == request_id:
                return


def last_request(records: list[dict]) -> str:
    return str(records_of(records, "input.requested")[-1]["data"]["request_id"])


async def test_network_drop_mid_run_resumes_from_the_last_rendered_seq(chatui: ChatUI) -> None:
    runtime = chatui.runtime
    chat_id = await chatui.start_chat("Assistant", "Research bees and keep notes")
    first_request = await chatui.pending_request()
    await chatui.wait_for_connection("live")
    shown_before = await chatui.rendered()

    # Chromium's offline mode stalls the open socket without closing it: only heartbeat silence
    # (no frame for 2 x MOZAIKS_WS_HEARTBEAT_S) tells the page the connection is gone.
    await chatui.context.set_offline(True)
    await chatui.wait_for_connection("reconnecting", timeout=2 * HEARTBEAT_S + 8)

    # While the page is cut off the run goes on: the answer comes from another client.
    await answer_from_elsewhere(runtime, chat_id, first_request, "more please")
    records = await runtime.wait_for_log(chat_id, lambda rs: len(records_of(rs, "input.requested")) == 2)
    missed = [r for r in records if r.get("visible", True) and r["seq"] > max(e["seq"] for e in shown_before)]
    assert len(await chatui.rendered()) == len(shown_before), "the page saw events while offline"
    assert missed, "nothing happened while the page was offline"

    await chatui.context.set_offline(False)
    await chatui.wait_for_connection("live", timeout=20)
    second_request = await chatui.pending_request()
    assert second_request == last_request(records)
    resumed = [url for url in chatui.sockets if re.search(r"after=([1-9]\d*)$", url)]
    assert resumed, f"the page did not resume after a seq: {chatui.sockets}"

    await chatui.answer("exit")
    assert await chatui.wait_for_end() == "run.completed"
    await chatui.assert_matches_log(chat_id)


async def test_reload_mid_run_shows_each_event_once_and_keeps_the_pending_question(chatui: ChatUI) -> None:
    runtime = chatui.runtime
    chat_id = await chatui.start_chat("Assistant", "Research bees and keep notes")
    await chatui.answer("more please")
    await runtime.wait_for_log(chat_id, lambda rs: len(records_of(rs, "input.requested")) == 2)
    await chatui.pending_request()
    sockets_before = len(chatui.sockets)

    await chatui.page.reload()
    assert await chatui.current_chat() == chat_id
    await chatui.wait_for_connection("live")
    records = await chatui.assert_matches_log(chat_id)
    # The reloaded page shows what it had from localStorage and streams only what came after it.
    after_reload = chatui.sockets[sockets_before:]
    assert after_reload and not after_reload[0].endswith("after=0"), after_reload
    # The question still open before the reload is answerable after it, bound to the same request.
    assert await chatui.pending_request() == last_request(records)
    answered = await chatui.page.locator(".msg--input.is-answered").count()
    assert answered == 1, "the first, answered question must not offer a box again"

    await chatui.answer("exit")
    assert await chatui.wait_for_end() == "run.completed"
    await chatui.assert_matches_log(chat_id)


async def test_stop_button_stops_the_run(chatui: ChatUI) -> None:
    chat_id = await chatui.start_chat("Assistant", "Research bees and keep notes")
    await chatui.pending_request()
    await chatui.page.click("[data-testid=stop-button]")
    assert await chatui.wait_for_end() == "run.stopped"
    await chatui.assert_matches_log(chat_id)
    assert await chatui.page.get_attribute("[data-testid=chat-status]", "data-status") == "stopped"
    assert await chatui.page.locator("[data-testid=input-form]").count() == 0
    # A finished chat continues with a new message from the composer (user.message).
    await chatui.page.fill("[data-testid=composer-text]", "Please continue")
    await chatui.page.press("[data-testid=composer-text]", "Enter")
    await chatui.wait_for_event("[data-type='message.user'] >> nth=1")
    records = await chatui.runtime.wait_for_log(chat_id, lambda rs: len(records_of(rs, "run.started")) == 2)
    assert records_of(records, "message.user")[-1]["data"]["content"] == "Please continue"
