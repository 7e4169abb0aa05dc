"""LLM output is untrusted: script payloads render inert. With an auth secret the page uses a token."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.async_api import Browser

from app.http.auth import issue_token
from tests.browser.conftest import ChatUI, Runtime, new_chatui, records_of, start_runtime, stop_runtime

SECRET = "browser-test-secret-with-enough-length-for-hs256"


async def test_script_payloads_in_agent_output_stay_inert(chatui: ChatUI) -> None:
    requests: list[str] = []
    chatui.page.on("request", lambda request: requests.append(request.url))
    chat_id = await chatui.start_chat("Xss", "Show me everything")
    assert await chatui.wait_for_end() == "run.completed"
    logged = await chatui.assert_matches_log(chat_id)
    message = records_of(logged, "message.agent")[-1]
    body = chatui.page.locator(f"[data-type='message.agent'][data-seq='{message['seq']}']")

    # Nothing ran: no dialog (the fixture fails the test on one), no marker set by a payload.
    assert await chatui.page.evaluate("window.__xss") is None
    # The payloads are shown as text, not turned into elements.
    text = await body.inner_text()
    assert "<img src=x onerror=" in text
    assert "<script>" in text
    for tag in ("img", "script", "svg", "iframe", "style"):
        assert await chatui.page.locator(f"#events {tag}").count() == 0, f"a <{tag}> reached the page"
    handlers = await chatui.page.eval_on_selector_all(
        "#events *",
        "els => els.flatMap(e => [...e.attributes].map(a => a.name)).filter(n => n.startsWith('on'))",
    )
    assert handlers == []
    hrefs = await chatui.page.eval_on_selector_all(
        "#events a[href]", "els => els.map(a => a.getAttribute('href'))"
    )
    assert "https://example.org/docs" in hrefs
    assert all(h.startswith(("https:", "http:", "mailto:", "#")) for h in hrefs), hrefs
    # The Markdown javascript: link keeps its text but loses its target.
    assert await body.locator("a:not([href])", has_text="markdown javascript link").count() == 1
    # The image becomes a link the user may follow; the browser never fetches it by itself.
    assert not [url for url in requests if "attacker.invalid" in url]
    # Tool arguments and results carrying markup are shown as text too.
    tool = chatui.page.locator("details[data-type='tool.called']").first
    await tool.locator("summary").click()
    assert "onerror" in await tool.inner_text()
    # Clicking the neutered links runs nothing either.
    await body.locator("a:not([href])").first.click()
    assert await chatui.page.evaluate("window.__xss") is None


@pytest.fixture(scope="module")
def auth_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """A second `mozaiks serve` with MOZAIKS_AUTH_SECRET set."""
    server = start_runtime(tmp_path_factory.mktemp("auth-runtime"), {"MOZAIKS_AUTH_SECRET": SECRET})
    # The same token `mozaiks token --user ada --app browser-tests` prints.
    server.token = issue_token(SECRET, "ada", "browser-tests", ["user"])
    try:
        yield server
    finally:
        stop_runtime(server)


async def test_with_auth_the_page_asks_for_a_token_and_streams_with_it(
    browser: Browser, auth_runtime: Runtime
) -> None:
    ui = await new_chatui(browser, auth_runtime)
    try:
        await ui.open()
        dialog = ui.page.locator("#token-dialog")
        await dialog.wait_for(state="visible")
        await ui.page.fill("[data-testid=token-input]", auth_runtime.token or "")
        await ui.page.click("#token-form button[type=submit]")
        await dialog.wait_for(state="hidden")
        chat_id = await ui.start_chat("Brainstorm", "Ideas with a token")
        assert await ui.wait_for_end() == "run.completed"
        await ui.assert_matches_log(chat_id)
        record = (await auth_runtime.events(chat_id))[0]
        assert record["user_id"] == "ada"

        # A fresh tab opened with the token in the URL fragment needs no dialog, and drops it from the URL.
        other = await new_chatui(browser, auth_runtime)
        try:
            await other.open(f"#token={auth_runtime.token}")
            item = other.page.locator(f"[data-testid=chat-item][data-chat-id='{chat_id}']")
            await item.wait_for()
            assert "token=" not in other.page.url
            assert not await other.page.locator("#token-dialog").is_visible()
        finally:
            await other.context.close()
        assert not other.problems, other.problems
    finally:
        await ui.context.close()
    assert not ui.problems, ui.problems
