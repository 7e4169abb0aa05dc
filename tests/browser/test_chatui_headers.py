"""The security headers every response carries: the page works under them, framing and inline scripts are blocked."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from app.http.server import CONTENT_SECURITY_POLICY
from tests.browser.conftest import ChatUI

INDEX = Path(__file__).resolve().parents[2] / "app" / "static" / "index.html"


def test_every_response_carries_the_page_policy_plus_frame_ancestors(runtime: object) -> None:
    meta = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', INDEX.read_text())
    assert meta is not None
    assert meta.group(1) + "; frame-ancestors 'none'" == CONTENT_SECURITY_POLICY
    base = runtime.base_url  # type: ignore[attr-defined]
    for path in ("/", "/api/workflows", "/health/live", "/static/chatui.css", "/no-such-page"):
        response = httpx.get(f"{base}{path}")
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["referrer-policy"] == "no-referrer", path


async def test_the_page_works_under_the_headers_and_blocks_framing_and_injected_scripts(
    chatui: ChatUI,
) -> None:
    page = chatui.page
    response = await page.goto(f"{chatui.runtime.base_url}/")
    assert response is not None and response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    chat_id = await chatui.start_chat("Assistant", "Research bees and keep notes")
    await chatui.pending_request()
    await chatui.answer("exit")
    assert await chatui.wait_for_end() == "run.completed"
    await chatui.assert_matches_log(chat_id)

    # An inline script injected into the live page does not run; the browser reports the violation.
    violations = await page.evaluate(
        """() => new Promise(resolve => {
            const seen = [];
            document.addEventListener('securitypolicyviolation', e => seen.push(e.violatedDirective));
            const s = document.createElement('script');
            s.textContent = 'window.__injected = 1';
            document.body.appendChild(s);
            setTimeout(() => resolve(seen), 300);
        })"""
    )
    assert await page.evaluate("window.__injected") is None
    assert any(v.startswith("script-src") for v in violations), violations

    # Another origin framing the ChatUI gets nothing: frame-ancestors 'none' (only a header can say it).
    framer = await chatui.context.new_page()
    blocked: list[str] = []
    framer.on("console", lambda message: blocked.append(message.text))
    await framer.set_content(f'<iframe id="ui" src="{chatui.runtime.base_url}/"></iframe>')
    frame_element = await framer.wait_for_selector("#ui")
    assert frame_element is not None
    inner = await frame_element.content_frame()
    assert inner is not None
    await inner.wait_for_load_state()
    assert await inner.locator("[data-testid=start-button]").count() == 0
    await framer.close()
