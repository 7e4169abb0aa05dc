"""Keyboard, accessibility and a refused socket, on the shared runtime.

Keyboard only: pick a workflow, start a chat, reach Stop right after the header (before the chat
list), stop, and skip to the conversation without leaving the chat. axe-core finds no serious or
critical violation on home and analytics (light and dark); the analytics page fits 390 px. A page
whose WebSocket is refused says so in words and follows the chat over REST to its end.
"""

from __future__ import annotations

import httpx
from playwright.async_api import Browser

from tests.browser.conftest import NARROW, TERMINAL, ChatUI, Runtime, accessibility_problems, new_chatui

FOCUSED = (
    "() => { const a = document.activeElement; return a ? (a.id || a.dataset.testid || a.tagName) : null; }"
)


async def tab_until(ui: ChatUI, target: str, limit: int = 30) -> list[str]:
    """Press Tab until the element with id/testid `target` has focus; returns what was passed on the way."""
    passed: list[str] = []
    for _ in range(limit):
        await ui.page.keyboard.press("Tab")
        focused = await ui.page.evaluate(FOCUSED)
        if focused == target:
            return passed
        passed.append(str(focused))
    raise AssertionError(f"{target} not reached in {limit} Tabs; passed {passed}")


async def back_to_the_top(ui: ChatUI, limit: int = 20) -> None:
    """Shift+Tab up the page to its first Tab stop, the skip link."""
    for _ in range(limit):
        await ui.page.keyboard.press("Shift+Tab")
        if await ui.page.evaluate(FOCUSED) == "skip-link":
            return
    raise AssertionError(f"the skip link not reached in {limit} Shift+Tabs")


async def test_keyboard_only_start_stop_and_skip_to_the_conversation(chatui: ChatUI) -> None:
    page = chatui.page
    await chatui.open("#new")
    await page.wait_for_selector('#workflow option[value="Assistant"]', state="attached")
    await tab_until(chatui, "workflow")
    await page.keyboard.type("Assistant")
    assert await page.input_value("#workflow") == "Assistant"
    await tab_until(chatui, "start-message")
    await page.keyboard.type("Research bees and keep notes")
    await page.keyboard.press("Enter")
    chat_id = await chatui.current_chat()
    await chatui.pending_request()
    # Focus went to where the user types next: the message box, then the agent's question box.
    focused = await page.evaluate(FOCUSED)
    assert focused == "composer-text" or focused.startswith("answer-"), focused
    assert await page.evaluate("() => document.activeElement.tagName") == "TEXTAREA"

    # From the top of the page (its first Tab stop, the skip link), Stop comes right after the header:
    # before any chat of the list.
    await back_to_the_top(chatui)
    passed = await tab_until(chatui, "stop-button", limit=8)
    assert "chat-item" not in passed and "new-chat" not in passed, passed
    await page.keyboard.press("Enter")
    await chatui.wait_for_event("[data-type='run.stopped']")
    assert await page.evaluate(FOCUSED) == "composer-text"
    assert "Stopped by you" in await page.inner_text("[data-type='run.stopped']")

    # The skip link moves focus to the conversation; the route (and the chat) stay.
    url = page.url
    await back_to_the_top(chatui)
    await page.keyboard.press("Enter")
    assert await page.evaluate(FOCUSED) == "events"
    assert page.url == url and await chatui.current_chat() == chat_id
    await chatui.assert_matches_log(chat_id)


async def test_home_and_analytics_pass_axe_and_analytics_fits_a_phone(
    browser: Browser, runtime: Runtime
) -> None:
    ui = await new_chatui(browser, runtime, viewport=NARROW)
    try:
        await ui.open("#new")
        await ui.page.wait_for_selector('#workflow option[value="Assistant"]', state="attached")
        problems = await accessibility_problems(ui, "home")
        await ui.page.goto(f"{runtime.base_url}/static/analyst.html")
        await ui.page.wait_for_selector("[data-testid=status]:not(:text('Loading…'))", timeout=15_000)
        sideways = await ui.page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert sideways <= 0, f"the analytics page scrolls {sideways} px sideways at 390 px"
        problems += await accessibility_problems(ui, "analytics")
    finally:
        await ui.context.close()
    assert not problems, "\n".join(problems)
    assert not ui.problems, ui.problems


# Every WebSocket the page opens is refused before it opens (as a proxy or a server without a
# WebSocket library would answer): the browser reports a close with code 1006.
REFUSE_SOCKETS = """
window.WebSocket = class RefusedSocket {
  static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
  constructor(url) {
    this.url = url; this.readyState = 3;
    window.__refused = (window.__refused || 0) + 1;
    setTimeout(() => { this.onerror?.({}); this.onclose?.({ code: 1006, reason: "" }); }, 20);
  }
  send() { throw new Error("refused"); }
  close() {}
};
"""


async def test_a_refused_socket_is_said_in_words_and_the_page_polls_rest(
    browser: Browser, runtime: Runtime
) -> None:
    async with httpx.AsyncClient(base_url=runtime.base_url, timeout=10) as http:
        started = await http.post(
            "/api/chats", json={"workflow": "Generator", "message": "Write about tides"}
        )
        assert started.status_code == 201, started.text
        chat_id = started.json()["chat_id"]
    ui = await new_chatui(browser, runtime)
    try:
        await ui.context.add_init_script(REFUSE_SOCKETS)
        await ui.open(f"#chat={chat_id}")
        await ui.wait_for_connection("polling")
        label = await ui.page.inner_text("[data-testid=connection-status]")
        assert "refused" in label and "Reconnecting" not in label, label
        assert await ui.wait_for_end(timeout=60) in TERMINAL
        await ui.assert_matches_log(chat_id)
        assert await ui.page.evaluate("() => window.__refused") >= 2
        await ui.screenshot("socket-refused-polling")
    finally:
        await ui.context.close()
    assert not ui.problems, ui.problems


async def test_the_schema_page_renders_under_the_csp(browser: Browser, runtime: Runtime) -> None:
    ui = await new_chatui(browser, runtime)
    blocked: list[str] = []
    ui.page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        await ui.page.goto(f"{runtime.base_url}/schema")
        await ui.page.wait_for_selector("[data-testid=operation]", timeout=15_000)
        assert await ui.page.locator("[data-testid=operation]").count() > 10
        assert "/api/chats" in await ui.page.inner_text("main")
    finally:
        await ui.context.close()
    assert not blocked, blocked
    assert not ui.problems, ui.problems
