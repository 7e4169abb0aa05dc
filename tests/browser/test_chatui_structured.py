"""ChatUI: an AgentDriven chat started without a message, and a structured reply shown as a card
titled from its schema, with a keyboard-usable "raw JSON" toggle."""

from __future__ import annotations

import json

from tests.browser.conftest import ChatUI, records_of


async def test_an_agent_driven_structured_reply_is_a_readable_card_with_raw_json_on_demand(
    chatui: ChatUI,
) -> None:
    page = chatui.page
    await chatui.open("#new")
    await page.wait_for_selector("#workflow option[value='Triage']", state="attached")
    await page.select_option("[data-testid=workflow-select]", "Triage")
    # The agent speaks first: the chat starts with an empty message box.
    await page.click("[data-testid=start-button]")
    chat_id = await chatui.current_chat()
    assert await chatui.wait_for_end() == "run.completed"

    card = page.locator("[data-testid=structured]")
    await card.wait_for()
    assert await card.get_attribute("aria-label") == "Support ticket"
    assert await card.locator(":scope > dl > dt").all_inner_texts() == [
        "Summary",
        "Priority",
        "Needs a visit",
        "Tags",
    ]
    assert await card.locator(":scope > dl > dd").all_inner_texts() == [
        "Printer jammed on the third floor",
        "2",
        "Yes",
        "printer\nfloor-3",
    ]
    raw = card.locator("pre")
    assert not await raw.is_visible()
    toggle = card.locator("[data-testid=structured-toggle]")
    assert await toggle.inner_text() == "Show raw JSON"
    await toggle.focus()
    await page.keyboard.press("Enter")
    assert await raw.is_visible() and await toggle.get_attribute("aria-expanded") == "true"
    assert await toggle.inner_text() == "Hide raw JSON"
    await chatui.screenshot("chatui-structured")
    logged = await chatui.runtime.events(chat_id)
    [message] = records_of(logged, "message.agent")
    assert json.loads(await raw.inner_text()) == message["data"]["structured"]
    await page.keyboard.press("Space")
    assert not await raw.is_visible() and await toggle.get_attribute("aria-expanded") == "false"

    # The hidden initial message is in the log, never on the page; the invalid try is a trace line.
    [initial] = records_of(logged, "message.user")
    assert initial["visible"] is False and initial["data"]["origin"] == "initial_message"
    assert await page.locator("[data-type='message.user']").count() == 0
    [invalid] = records_of(logged, "output.invalid")
    assert invalid["data"]["errors"][0]["path"] == "$.priority"
    await chatui.assert_matches_log(chat_id)
