"""ChatUI: "Fork from here" on a message opens the fork, which shows its origin with a link to the
parent; a file dragged onto the chat is uploaded and shown as a chip in the transcript."""

from __future__ import annotations

from tests.browser.conftest import ChatUI, records_of

DROP = """([name, text]) => {
  const files = new DataTransfer();
  files.items.add(new File([text], name, { type: "text/plain" }));
  const zone = document.getElementById("chat-view");
  for (const type of ["dragenter", "dragover", "drop"]) {
    zone.dispatchEvent(new DragEvent(type, { dataTransfer: files, bubbles: true, cancelable: true }));
  }
}"""


async def test_fork_from_a_message_then_drop_a_file_on_the_fork(chatui: ChatUI) -> None:
    page = chatui.page
    parent = await chatui.start_chat("Analyzer", "Bees are small. They make honey.")
    assert await chatui.wait_for_end() == "run.completed"
    logged = await chatui.runtime.events(parent)
    [asked] = records_of(logged, "message.user")
    answers = [r for r in records_of(logged, "message.agent") if r["visible"]]
    beside = page.locator("[data-type='message.agent'] + [data-testid=fork-button]")
    assert answers and await beside.count() == len(answers)  # every answer can be forked at, too
    button = page.locator(f"[data-testid=event][data-seq='{asked['seq']}'] [data-testid=fork-button]")
    await button.click()
    await page.wait_for_selector(f"#chat-view[data-chat-id]:not([data-chat-id='{parent}'])")
    fork = await chatui.current_chat()
    origin = page.locator("[data-testid=fork-origin]")
    await origin.wait_for()
    assert f"at #{asked['seq']}" in await origin.inner_text()
    assert await page.locator("[data-testid=fork-origin-link]").get_attribute("href") == f"#chat={parent}"
    await chatui.wait_for_event(f"[data-type='message.user'][data-seq='{asked['seq']}']")
    assert await page.locator("[data-testid=chat-status]").get_attribute("data-status") == "forked"
    assert await page.locator("[data-testid=composer-text]").is_enabled()
    assert await page.locator("[data-testid=working]").is_hidden()  # copied messages are no run
    agent_fork = page.locator("[data-type='message.agent'] + [data-testid=fork-button]")
    assert await agent_fork.count() == 0  # the fork was made at the user's message: no answer yet

    await page.evaluate(DROP, ["notes.txt", "Bees dance."])
    chip = page.locator("[data-testid=file-chip]")
    await chip.wait_for()
    assert "notes.txt" in await chip.inner_text()
    [uploaded] = records_of(await chatui.runtime.events(fork), "file.uploaded")
    assert uploaded["data"]["name"] == "notes.txt" and uploaded["data"]["size"] == len("Bees dance.")
    await chatui.screenshot("chatui-fork-and-file")
    await chatui.assert_matches_log(fork)
    # The parent is as it was.
    assert await chatui.runtime.events(parent) == logged
