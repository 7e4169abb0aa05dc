"""Browser-test fixtures: a real `mozaiks serve` child process and Debian's Chromium through Playwright.

The runtime runs on the embedded database with offline fixtures (no OpenAI settings), the example
workflows plus the test-only `Xss` workflow, and a 1 s heartbeat so a stalled socket is noticed in
about 2 s. Chromium is the system one (`/usr/bin/chromium`, or `MOZAIKS_CHROMIUM`): Playwright never
downloads a browser here. Screenshots go to `test-artifacts/screenshots/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CHROMIUM = Path(os.environ.get("MOZAIKS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
# axe-core, installed by scripts/test from the committed lock file (npm ci --prefix tests/browser/axe).
AXE = HERE / "axe" / "node_modules" / "axe-core" / "axe.min.js"
HEARTBEAT_S = 1
DESKTOP = {"width": 1280, "height": 860}
NARROW = {"width": 390, "height": 844}
TERMINAL = ("run.completed", "run.failed", "run.stopped")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Runtime:
    """A running `mozaiks serve` and the REST reads the tests compare the page with."""

    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    token: str | None = None

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def get(self, path: str) -> Any:
        async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers(), timeout=10) as client:
            response = await client.get(path, headers={"Accept": "application/json"})
            response.raise_for_status()
            return response.json()

    async def events(self, chat_id: str) -> list[dict[str, Any]]:
        """Every record of the chat's log, from the audit endpoint, in seq order."""
        payload = await self.get(f"/api/chats/{chat_id}/events?after=0&limit=10000")
        records = (
            payload if isinstance(payload, list) else payload.get("events") or payload.get("items") or []
        )
        return sorted(records, key=lambda r: r["seq"])

    async def visible_events(self, chat_id: str) -> list[dict[str, Any]]:
        """The visible records the page shows as events: a message's deltas build its card, not events of their own."""
        return [
            r for r in await self.events(chat_id) if r.get("visible", True) and r["type"] != "message.delta"
        ]

    async def wait_for_log(self, chat_id: str, predicate: Any, timeout: float = 20) -> list[dict[str, Any]]:
        """Poll the log until `predicate(records)` holds; fail with the log's tail otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            records = await self.events(chat_id)
            if predicate(records):
                return records
            if time.monotonic() > deadline:
                tail = [(r["seq"], r["type"], r.get("agent")) for r in records[-8:]]
                raise AssertionError(f"log of {chat_id} never reached the expected state; tail: {tail}")
            await asyncio.sleep(0.1)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _mozaiks() -> list[str]:
    """The installed `mozaiks` command (pip install -e .), else the same click group through Python."""
    script = Path(sys.executable).parent / "mozaiks"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from app.cli import main; main()"]


def start_runtime(root: Path, extra_env: dict[str, str] | None = None) -> Runtime:
    """Start `mozaiks serve` under `root` (own data, workspace and workflows) and wait until ready."""
    workflows = root / "workflows"
    if not workflows.exists():
        shutil.copytree(REPO / "workflows", workflows)
        for extra in (HERE / "workflows").iterdir():  # the browser tests' own workflows (Xss, Story)
            shutil.copytree(extra, workflows / extra.name)
        for extra in (REPO / "tests" / "child_workflows").iterdir():  # child workflows (Patient, Waiter)
            shutil.copytree(extra, workflows / extra.name)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"OPENAI_API_KEY", "OPENAI_BASE_URL", "DATABASE_URI", "MOZAIKS_AUTH_SECRET", "MOZAIKS_DB"}
    }
    env.update(
        PYTHONPATH=str(REPO),
        MOZAIKS_DATA_DIR=str(root / ".mozaiks"),
        MOZAIKS_WORKSPACE=str(root / "workspace"),
        MOZAIKS_WORKFLOWS_PATH=str(workflows),
        MOZAIKS_WS_HEARTBEAT_S=str(HEARTBEAT_S),
        **(extra_env or {}),
    )
    port = _free_port()
    log_path = root / f"serve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*_mozaiks(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    runtime = Runtime(base_url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"mozaiks serve exited with {process.returncode}:\n{runtime.log_tail()}")
        try:
            if httpx.get(f"{runtime.base_url}/health/ready", timeout=2).status_code == 200:
                return runtime
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_runtime(runtime)
            raise RuntimeError(f"mozaiks serve not ready after 60 s:\n{runtime.log_tail()}")
        time.sleep(0.2)


def stop_runtime(runtime: Runtime) -> None:
    """Stop the child like Ctrl-C would, so it shuts its embedded database down cleanly."""
    process = runtime.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="package")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """One `mozaiks serve` (local mode, offline fixtures) shared by the browser tests."""
    server = start_runtime(tmp_path_factory.mktemp("runtime"))
    try:
        yield server
    finally:
        stop_runtime(server)


@pytest.fixture(scope="package")
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless; the tests skip (or fail under MOZAIKS_REQUIRE_BROWSER=1) without it."""
    if not CHROMIUM.exists():
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MOZAIKS_CHROMIUM)"
        if os.environ.get("MOZAIKS_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    playwright = await async_playwright().start()
    try:
        instance = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            await instance.close()
    finally:
        await playwright.stop()


@dataclass
class ChatUI:
    """The ChatUI in one browser context, with the reads and actions the tests share."""

    page: Page
    context: BrowserContext
    runtime: Runtime
    problems: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)

    async def open(self, fragment: str = "") -> None:
        await self.page.goto(f"{self.runtime.base_url}/{fragment}")

    async def start_chat(self, workflow: str, message: str) -> str:
        """Start a chat through the page's form; returns the chat id the page opened."""
        await self.open("#new")
        await self.page.wait_for_selector(f'#workflow option[value="{workflow}"]', state="attached")
        await self.page.select_option("[data-testid=workflow-select]", workflow)
        await self.page.fill("[data-testid=start-message]", message)
        await self.page.click("[data-testid=start-button]")
        return await self.current_chat()

    async def current_chat(self) -> str:
        view = await self.page.wait_for_selector("#chat-view[data-chat-id]:not([hidden])")
        assert view is not None
        chat_id = await view.get_attribute("data-chat-id")
        assert chat_id
        return chat_id

    async def wait_for_event(self, selector: str, timeout: float = 20) -> None:
        await self.page.wait_for_selector(
            f"[data-testid=event]{selector}", state="attached", timeout=timeout * 1000
        )

    async def wait_for_end(self, timeout: float = 30) -> str:
        """Wait until the page shows the run's terminal event; returns its type."""
        selector = ", ".join(f"[data-type='{t}']" for t in TERMINAL)
        node = await self.page.wait_for_selector(selector, state="attached", timeout=timeout * 1000)
        assert node is not None
        return str(await node.get_attribute("data-type"))

    async def wait_until(self, expression: str, timeout: float = 10) -> None:
        """Poll a JavaScript expression until truthy (page.wait_for_function needs eval, which CSP forbids)."""
        deadline = time.monotonic() + timeout
        while not await self.page.evaluate(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {timeout} s: {expression}")
            await asyncio.sleep(0.05)

    async def wait_for_connection(self, state: str, timeout: float = 15) -> None:
        await self.page.wait_for_selector(
            f"[data-testid=connection-status][data-state='{state}']", state="attached", timeout=timeout * 1000
        )

    async def pending_request(self) -> str:
        """The request_id of the input form waiting for an answer."""
        form = await self.page.wait_for_selector("[data-testid=input-form]", timeout=20_000)
        assert form is not None
        request_id = await form.get_attribute("data-request-id")
        assert request_id
        return request_id

    async def answer(self, text: str) -> str:
        """Answer the pending human-input request through its box; returns its request_id."""
        request_id = await self.pending_request()
        box = self.page.locator(f"[data-testid=input-form][data-request-id='{request_id}'] textarea")
        await box.fill(text)
        await box.press("Enter")
        await self.page.wait_for_selector(
            f"[data-testid=input-form][data-request-id='{request_id}']", state="detached", timeout=20_000
        )
        return request_id

    async def rendered(self) -> list[dict[str, Any]]:
        """Every rendered event element in DOM order: seq, type, agent."""
        return list(
            await self.page.eval_on_selector_all(
                "[data-testid=event]",
                "els => els.map(e => ({seq: Number(e.dataset.seq), type: e.dataset.type, agent: e.dataset.agent || null}))",
            )
        )

    async def groups(self) -> list[list[int]]:
        """Seqs per top-level item of the conversation (a turn card folds its tools and trace)."""
        return list(
            await self.page.eval_on_selector_all(
                "#events > li",
                """items => items.map(li => [li, ...li.querySelectorAll('[data-seq]')]
                    .filter(e => e.dataset.seq !== undefined).map(e => Number(e.dataset.seq)))""",
            )
        )

    async def wait_until_caught_up(self, chat_id: str, timeout: float = 20) -> list[dict[str, Any]]:
        """Wait until the page has rendered as many events as the log has visible ones."""
        deadline = time.monotonic() + timeout
        while True:
            logged = await self.runtime.visible_events(chat_id)
            shown = await self.rendered()
            if len(shown) >= len(logged):
                return logged
            if time.monotonic() > deadline:
                return logged
            await asyncio.sleep(0.1)

    async def assert_matches_log(self, chat_id: str) -> list[dict[str, Any]]:
        """Every visible event of the log is on the page exactly once, in order; nothing hidden is."""
        logged = await self.wait_until_caught_up(chat_id)
        shown = await self.rendered()
        seqs = [e["seq"] for e in shown]
        duplicates = sorted({s for s in seqs if seqs.count(s) > 1})
        assert not duplicates, f"shown more than once: {duplicates}"
        assert sorted(seqs) == [r["seq"] for r in logged], (
            f"page {sorted(seqs)} != log {[r['seq'] for r in logged]}"
        )
        by_seq = {r["seq"]: r for r in logged}
        for event in shown:
            record = by_seq[event["seq"]]
            assert event["type"] == record["type"], (event, record["type"])
            assert event["agent"] == record.get("agent"), (event, record.get("agent"))
        # In order: top-level items cover increasing, non-overlapping seq ranges.
        previous = 0
        for group in await self.groups():
            if not group:
                continue
            assert min(group) > previous, f"item {group} starts before seq {previous}"
            previous = max(group)
        return logged

    async def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        # Finished transitions (e.g. the chat drawer sliding after a resize), not a frame mid-way.
        await self.page.screenshot(path=str(path), animations="disabled")
        return path


async def new_chatui(browser: Browser, runtime: Runtime, viewport: dict[str, int] | None = None) -> ChatUI:
    """A fresh browser context (own storage) with the ChatUI's problems recorded."""
    context = await browser.new_context(viewport=viewport or DESKTOP)
    page = await context.new_page()
    ui = ChatUI(page=page, context=context, runtime=runtime)

    async def on_dialog(dialog: Any) -> None:
        ui.problems.append(f"dialog opened: {dialog.type} {dialog.message!r}")
        await dialog.dismiss()

    page.on("pageerror", lambda error: ui.problems.append(f"uncaught error: {error}"))
    page.on("dialog", on_dialog)
    page.on("websocket", lambda ws: ui.sockets.append(ws.url))
    return ui


@contextlib.asynccontextmanager
async def open_chatui(browser: Browser, runtime: Runtime) -> AsyncIterator[ChatUI]:
    """A ChatUI on `runtime`, closed afterwards; fails on an uncaught page error or any dialog."""
    ui = await new_chatui(browser, runtime)
    try:
        yield ui
    finally:
        await ui.context.close()
    assert not ui.problems, ui.problems


@pytest.fixture
async def chatui(browser: Browser, runtime: Runtime) -> AsyncIterator[ChatUI]:
    """The ChatUI on the shared runtime; fails the test on an uncaught page error or any dialog."""
    async with open_chatui(browser, runtime) as ui:
        yield ui


async def accessibility_problems(ui: ChatUI, view: str) -> list[str]:
    """axe-core's serious and critical violations of the page as it is now, in light and dark themes.

    axe is evaluated through the DevTools protocol (the page's CSP forbids inline scripts, not that);
    each theme's screenshot goes to test-artifacts as `a11y-{view}-{theme}.png`.
    """
    if not AXE.exists():
        pytest.fail(f"axe-core missing at {AXE}: npm ci --prefix tests/browser/axe (scripts/test does it)")
    if not await ui.page.evaluate("() => Boolean(window.axe)"):
        await ui.page.evaluate(AXE.read_text() + "\n;0")
    problems: list[str] = []
    for theme in ("light", "dark"):
        await ui.page.emulate_media(color_scheme=theme)  # type: ignore[arg-type]
        found = await ui.page.evaluate("""async () => {
            const result = await window.axe.run(document, {resultTypes: ["violations"]});
            if (!result.passes.length) return ["axe checked nothing: no rule passed"];
            return result.violations
                .filter((v) => v.impact === "serious" || v.impact === "critical")
                .map((v) => `${v.id} (${v.impact}): ${v.nodes.slice(0, 3).map((n) => n.target.join(" ")).join(" | ")}`
                    + ` ${v.nodes[0]?.failureSummary?.split("\\n").slice(1, 2).join("") || ""}`);
        }""")
        problems.extend(f"{view}/{theme}: {line}" for line in found)
        await ui.screenshot(f"a11y-{view}-{theme}")
    await ui.page.emulate_media(color_scheme="light")
    return problems


def records_of(records: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [r for r in records if r["type"] == type_]
