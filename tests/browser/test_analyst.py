"""The analyst page in Chromium: cost and p95 latency per day by workflow, drawn as SVG under the CSP."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from playwright.async_api import Browser

from tests.browser.conftest import TERMINAL, Runtime, new_chatui


async def test_the_analyst_page_draws_cost_and_latency_per_day_by_workflow(
    browser: Browser, runtime: Runtime
) -> None:
    async with httpx.AsyncClient(base_url=runtime.base_url, timeout=10) as http:
        started = await http.post("/api/chats", json={"workflow": "Analyzer", "message": "numbers, please"})
        assert started.status_code == 201, started.text
        chat_id = started.json()["chat_id"]
        records = await runtime.wait_for_log(
            chat_id, lambda records: any(r["type"] in TERMINAL for r in records), timeout=60
        )
        made = sum(r["type"] == "llm.call" for r in records)

        def analyzer_calls(series: dict[str, Any]) -> int:
            return sum(p["calls"] for p in series.get("points", []) if p["workflow"] == "Analyzer")

        series: dict[str, Any] = {}
        async with asyncio.timeout(30):  # until the projection has every call of the chat, not just one
            while analyzer_calls(series) < made:
                series = (await http.get("/metrics/perf/series", params={"group_by": "workflow"})).json()
                await asyncio.sleep(0.1)
    ui = await new_chatui(browser, runtime)
    csp: list[str] = []
    ui.page.on(
        "console",
        lambda message: csp.append(message.text) if "Content Security Policy" in message.text else None,
    )
    try:
        await ui.open()
        await ui.page.click("[data-testid=analytics-link]")  # the ChatUI links to it
        await ui.page.wait_for_selector("[data-testid=status][data-state=ready]", timeout=15_000)
        for chart in ("cost-chart", "latency-chart"):
            points = ui.page.locator(f"[data-testid={chart}] svg [data-testid=point]")
            workflows = {
                await points.nth(i).get_attribute("data-workflow") for i in range(await points.count())
            }
            assert "Analyzer" in workflows, chart
            assert (
                await ui.page.locator(f"[data-testid={chart}] svg path[data-workflow=Analyzer]").count() == 1
            )
            assert "Analyzer" in await ui.page.locator(f"[data-testid={chart}] .legend").inner_text()
        calls = analyzer_calls(series)
        rows = ui.page.locator("[data-testid=series-table] tbody tr", has_text="Analyzer")
        shown = [int(await rows.nth(i).locator("td").nth(2).inner_text()) for i in range(await rows.count())]
        assert sum(shown) == calls
        await ui.screenshot("analyst-page")
    finally:
        await ui.context.close()
    assert not ui.problems, ui.problems
    assert not csp, csp
