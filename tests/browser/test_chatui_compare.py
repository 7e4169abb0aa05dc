"""The ChatUI's "Compare with…" view: the open chat and another one side by side (the diff route)."""

from __future__ import annotations

from tests.browser.conftest import ChatUI


async def test_compare_with_shows_two_chats_turn_by_turn(chatui: ChatUI) -> None:
    first = await chatui.start_chat("Analyzer", "Bees pollinate crops.")
    assert await chatui.wait_for_end() == "run.completed"
    second = await chatui.start_chat("Analyzer", "Wasps eat garden pests.")
    assert second != first and await chatui.wait_for_end() == "run.completed"
    page = chatui.page
    await page.click("[data-testid=compare-button]")
    await page.wait_for_selector(f"[data-testid=compare-with] option[value='{first}']", state="attached")
    await page.select_option("[data-testid=compare-with]", first)
    await page.click("[data-testid=compare-run]")
    summary = page.locator("[data-testid=compare-summary]")
    await summary.wait_for(timeout=10_000)
    assert await summary.get_attribute("data-same") == "false"
    rows = page.locator("[data-testid=compare-turn]")
    assert await rows.count() >= 2
    # The user's opening message is the turn that differs; each side shows its own text.
    opening = rows.nth(0)
    assert await opening.get_attribute("data-changed") == "true"
    text = await opening.inner_text()
    assert "Wasps eat garden pests." in text and "Bees pollinate crops." in text
    assert chatui.problems == [], chatui.problems
