"""A child workflow in the ChatUI: an inline, collapsible sub-thread that grows live from the child's socket."""

from __future__ import annotations

from tests.browser.conftest import ChatUI


async def test_a_child_workflow_grows_live_as_a_sub_thread_of_its_parent(chatui: ChatUI) -> None:
    parent = await chatui.start_chat("Patient", "Find my colour")
    page = chatui.page
    thread = page.locator("details.child")
    await thread.wait_for(timeout=20_000)
    assert "Waiter" in await thread.locator("summary").inner_text()
    # The child's question streams into the sub-thread, and its input box is there to answer.
    await thread.locator("[data-type='message.agent']", has_text="Which colour").wait_for(timeout=20_000)
    await chatui.answer("blue")
    await thread.locator("[data-type='message.agent']", has_text="Blue it is").wait_for(timeout=20_000)
    await chatui.answer("exit")
    status = thread.locator("[data-testid=child-status]")
    await page.locator("details.child [data-testid=child-status][data-status=completed]").wait_for(
        timeout=20_000
    )
    assert await status.inner_text() == "completed"
    # The parent records the child's end and goes on to its own.
    await page.locator("#events > [data-type='child.completed']").wait_for(timeout=20_000)
    assert await chatui.wait_for_end() == "run.completed"
    await chatui.screenshot("chatui-child-workflow")
    # Collapsible: a click on its summary folds the sub-thread.
    await thread.locator("summary").click()
    assert await thread.get_attribute("open") is None
    tree = await chatui.runtime.get(f"/api/chats/{parent}/tree")
    assert [c["workflow"] for c in tree["children"]] == ["Waiter"]
