"""UI tools in the ChatUI (the Intake workflow): a generated form with a client-side error corrected
first, a choice, the artifact panel updated in place, and a confirm answered after a reload."""

from __future__ import annotations

from tests.browser.conftest import ChatUI, accessibility_problems


async def test_intake_form_choice_artifact_and_a_confirm_answered_after_reload(chatui: ChatUI) -> None:
    page = chatui.page
    chat_id = await chatui.start_chat("Intake", "sign me up")
    form = page.locator("[data-component=form] form")
    await form.wait_for(timeout=20_000)
    # Generated from the schema: labels, help text, an enum as a select, required marks.
    assert await form.locator("select option").all_inner_texts() == ["—", "EU", "US", "APAC"]
    assert "invoices" in await form.inner_text()
    await form.get_by_label("Name").fill("Ada")
    await form.get_by_label("Email").fill("not-an-email")
    await form.get_by_label("Team size").fill("3")
    await form.get_by_label("Team size").press("Enter")  # the keyboard submits
    email = form.get_by_label("Email")
    assert await email.get_attribute("aria-invalid") == "true"
    assert not await accessibility_problems(chatui, "ui-form"), "axe: the form with an error"
    assert not [e for e in await chatui.runtime.events(chat_id) if e["type"] == "ui.responded"]
    await email.fill("ada@example.com")
    await page.keyboard.press("Enter")
    answered = page.locator("[data-component=form] [data-testid=ui-answer]")
    await answered.wait_for(timeout=20_000)
    assert "ada@example.com" in await answered.inner_text()

    choice = page.locator("[data-component=choice] button", has_text="Team")
    await choice.wait_for(timeout=20_000)
    await choice.focus()
    await page.keyboard.press("Enter")
    panel = page.locator("[data-testid=artifact][data-artifact-id=summary]")
    await panel.wait_for(timeout=20_000)
    assert "not confirmed yet" in await panel.inner_text()

    # A pending confirm survives a reload, and is answered after it.
    await page.locator("[data-component=confirm] button", has_text="Yes").wait_for(timeout=20_000)
    await page.reload()
    yes = page.locator("[data-component=confirm] button", has_text="Yes")
    await yes.wait_for(timeout=20_000)
    await yes.click()
    assert await chatui.wait_for_end() == "run.completed"
    assert await page.locator("[data-testid=artifact]").count() == 1  # updated in place
    await chatui.wait_until(
        "document.querySelector('[data-artifact-id=summary]').innerText.includes('confirmed**') === false"
        " && !document.querySelector('[data-artifact-id=summary]').innerText.includes('not confirmed')"
    )
    assert (await page.locator("[data-component=confirm] [data-testid=ui-answer]").inner_text()).endswith(
        "Yes"
    )
    log = await chatui.runtime.events(chat_id)
    answers = [e["data"]["answer"] for e in log if e["type"] == "ui.responded"]
    assert answers == [
        {"name": "Ada", "email": "ada@example.com", "team_size": 3, "newsletter": False},
        "Team",
        True,
    ]
    assert not await accessibility_problems(chatui, "ui-done"), (
        "axe: answered requests and the artifact panel"
    )
    await chatui.screenshot("chatui-ui-tools")
