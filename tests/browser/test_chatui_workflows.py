"""Each example workflow through the ChatUI: messages by agent, folded tools, offline badge, summary."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import Browser

from tests.browser.conftest import NARROW, ChatUI, Runtime, new_chatui, records_of

# (workflow, first message, answers typed into the page's human-input box, in order)
EXAMPLES = [
    ("Generator", "Write about solar energy", []),
    ("Analyzer", "Bees pollinate crops. They matter.", []),
    ("Brainstorm", "Ideas for our school", []),
    ("Assistant", "Research bees and keep notes", ["more please", "exit"]),
]


async def check_rendering(ui: ChatUI, chat_id: str) -> None:
    """What a user must see once the run ended: agents by name, tools folded, badge, summary."""
    logged = await ui.assert_matches_log(chat_id)
    page = ui.page
    assert await page.is_visible("[data-testid=offline-badge]"), "offline badge missing on a fixture run"
    messages = records_of(logged, "message.agent")
    assert messages, "the run produced no visible agent message"
    for record in messages:
        body = page.locator(f"[data-type='message.agent'][data-seq='{record['seq']}']")
        card = page.locator(
            f"li[data-testid=turn]:has([data-type='message.agent'][data-seq='{record['seq']}'])"
        )
        assert await card.get_attribute("data-agent") == record["agent"]
        assert (await card.locator(".msg__agent").inner_text()).strip() == record["agent"]
        # The first words as a reader sees them (Markdown marks gone, whitespace collapsed).
        expected = " ".join(re.sub(r"[*_`#>\[\]]", "", record["data"]["content"]).split())[:24]
        assert expected in " ".join((await body.inner_text()).split())
    for record in records_of(logged, "tool.called"):
        details = page.locator(f"details[data-type='tool.called'][data-seq='{record['seq']}']")
        assert await details.get_attribute("open") is None, "tool calls start folded"
        assert record["data"]["tool"] in await details.locator("summary").inner_text()
    for record in records_of(logged, "tool.result"):
        call = page.locator(f"details[data-type='tool.called'][data-call-id='{record['data']['call_id']}']")
        assert await call.locator(f"[data-type='tool.result'][data-seq='{record['seq']}']").count() == 1
    summary = page.locator("[data-testid=run-summary-body] [data-metric=turns]")
    await summary.wait_for(state="attached", timeout=15_000)
    # Agents that only ever spoke hidden are not named anywhere on the page, summary included.
    everything = await ui.runtime.events(chat_id)
    shown_agents = {r.get("agent") for r in logged}
    hidden_agents = {r.get("agent") for r in everything if not r.get("visible", True)} - shown_agents - {None}
    page_text = await page.locator("#chat-view").inner_text()
    for agent in hidden_agents:
        assert agent not in page_text, f"hidden agent {agent} is named on the page"


@pytest.mark.parametrize(("workflow", "message", "answers"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
async def test_example_workflow_renders_in_the_page(
    chatui: ChatUI, workflow: str, message: str, answers: list[str]
) -> None:
    chat_id = await chatui.start_chat(workflow, message)
    for answer in answers:
        await chatui.answer(answer)
    assert await chatui.wait_for_end() == "run.completed"
    await check_rendering(chatui, chat_id)
    await chatui.wait_for_connection("live")
    assert await chatui.page.get_attribute("[data-testid=chat-status]", "data-status") == "completed"
    if answers:
        logged = await chatui.runtime.events(chat_id)
        texts = [r["data"]["text"] for r in records_of(logged, "input.received")]
        assert texts == answers, "each answer typed in the page reaches the log as input.received"


async def test_chat_list_reopens_an_old_chat_with_its_full_history(
    browser: Browser, runtime: Runtime
) -> None:
    first = await new_chatui(browser, runtime)
    chat_id = await first.start_chat("Brainstorm", "Ideas for the weekend")
    await first.wait_for_end()
    await first.context.close()
    # A new context has no stored history: the chat list and the replay alone must rebuild the view.
    ui = await new_chatui(browser, runtime)
    try:
        await ui.open()
        item = ui.page.locator(f"[data-testid=chat-item][data-chat-id='{chat_id}']")
        await item.wait_for()
        assert "Brainstorm" in await item.inner_text()
        await item.click()
        assert await ui.current_chat() == chat_id
        await ui.wait_for_end()
        await ui.assert_matches_log(chat_id)
        assert any("after=0" in url for url in ui.sockets)
    finally:
        await ui.context.close()
    assert not ui.problems, ui.problems


async def test_screenshots_of_the_chat_view(browser: Browser, runtime: Runtime) -> None:
    """Desktop and 390 px screenshots of a finished run, saved as test artifacts."""
    ui = await new_chatui(browser, runtime)
    try:
        await ui.open()
        await ui.page.wait_for_selector("#workflow option", state="attached")
        await ui.screenshot("start-desktop")
        chat_id = await ui.start_chat("Generator", "Write about solar energy")
        await ui.wait_for_end()
        await ui.assert_matches_log(chat_id)
        await ui.page.locator("[data-testid=run-summary-body] [data-metric=turns]").wait_for(timeout=15_000)
        # Open the last tool call so the picture shows what a folded call holds, then show the end.
        await ui.page.locator("details[data-type='tool.called'] summary").last.click()
        await ui.page.locator("#events").evaluate("list => { list.scrollTop = list.scrollHeight; }")
        await ui.screenshot("chat-desktop")
        await ui.page.set_viewport_size(NARROW)
        await ui.page.locator("#events").evaluate("list => { list.scrollTop = list.scrollHeight; }")
        await ui.screenshot("chat-narrow")
        assert await ui.page.is_visible("#composer-text")
        # Narrow width: nothing may force horizontal scrolling of the page.
        overflow = await ui.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"page is {overflow}px wider than a 390px screen"
        await ui.page.click("#summary-toggle")
        await ui.page.locator("[data-testid=run-summary]").wait_for(state="visible")
        await ui.screenshot("chat-narrow-summary")
        await ui.page.click("#summary-toggle")
        await ui.page.click("#nav-toggle")
        await ui.page.locator("#chat-nav").wait_for(state="visible")
        await ui.screenshot("chats-narrow")
    finally:
        await ui.context.close()
    assert not ui.problems, ui.problems


async def test_keyboard_only_chat_with_human_input(chatui: ChatUI) -> None:
    """Landmarks are named, and a chat can be started and answered without a mouse."""
    page = chatui.page
    await chatui.open("#new")
    await page.wait_for_selector("#workflow option[value='Assistant']", state="attached")
    assert await page.get_by_role("banner").count() == 1
    assert await page.get_by_role("navigation", name="Chats").count() == 1
    assert await page.get_by_role("main").count() == 1
    assert await page.get_by_role("combobox", name="Workflow").count() == 1
    await page.focus("[data-testid=workflow-select]")
    await page.select_option("[data-testid=workflow-select]", "Assistant")  # what arrow keys do in a select
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "start-message"
    await page.keyboard.type("Research bees and keep notes")
    await page.keyboard.press("Enter")
    chat_id = await chatui.current_chat()
    await chatui.pending_request()
    # The question takes the focus, so the answer can be typed right away.
    await chatui.wait_until("document.activeElement?.closest('[data-testid=input-form]') != null")
    await page.keyboard.type("exit")
    await page.keyboard.press("Enter")
    assert await chatui.wait_for_end() == "run.completed"
    assert await page.get_by_role("complementary", name="Run summary").count() == 1
    await chatui.assert_matches_log(chat_id)
