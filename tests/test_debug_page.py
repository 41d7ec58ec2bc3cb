"""The hub's /debug page (server/static/ws_debug.html) in a real headless Chromium.

Each test starts its own hub with debug routes on, against the session's private
redis-server, and drives the page with Playwright's async API (the tests run inside
an asyncio loop, where the sync API cannot). Waits are on page conditions only.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from redisq_lab.client import QueueClient
from redisq_lab.mock_worker import MockWorker
from redisq_server import EngineLimits, Settings, protocol
from redisq_server.main import Hub
from redisq_server.protocol import MessageType as T

from .browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, HubPage, http_get, needs_chromium

TIMEOUT_MS = 15_000

pytestmark = [
    pytest.mark.browser,
    needs_chromium,
]

playwright_api = pytest.importorskip("playwright.async_api", reason="needs playwright (test extra)")
expect = playwright_api.expect


@asynccontextmanager
async def debug_hub(
    redis_url: str, limits: EngineLimits, debug: bool = True, **kw: Any
) -> AsyncIterator[Hub]:
    settings = replace(Settings(redis_url=redis_url, hub_port=0, limits=limits), debug=debug, **kw)
    async with Hub(settings) as hub:
        yield hub


class DebugPage(HubPage):
    """The hub's /debug page."""

    async def connect(self, role: str, peer_id: str) -> None:
        await self.page.select_option("#role", role)
        await self.page.fill("#peer-id", peer_id)
        await self.page.click("#connect")
        await expect(self.loc("#conn-status")).to_have_attribute("data-state", "open")
        await expect(self.loc("#hub-id")).to_have_text(self.hub.hub_id)

    def job_row(self, job_id: str) -> Any:
        return self.loc(f'#jobs tr[data-job-id="{job_id}"]')

    def log_entry(self, direction: str, msg_type: str) -> Any:
        return self.loc(f'#log .entry[data-dir="{direction}"][data-type="{msg_type}"]')

    def check_clean(self, expected_errors: str | None = None) -> None:
        """No script error (but those matching ``expected_errors``), and no request
        anywhere but the hub that served the page."""
        errors = [e for e in self.errors if not (expected_errors and re.search(expected_errors, e))]
        assert errors == []
        assert self.strays() == []


@asynccontextmanager
async def debug_page(tmp_path: Path, hub: Hub, query: str = "") -> AsyncIterator[DebugPage]:
    """Chromium (fresh profile) showing the hub's /debug page, live panels connected.

    Enter it inside the hub's ``async with``: the browser must be gone before the hub
    stops, or the hub waits for Chromium's idle preconnected sockets to time out.
    """
    async with playwright_api.async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1440, "height": 1000},
        )
        try:
            context.set_default_timeout(TIMEOUT_MS)
            page = await context.new_page()
            dp = DebugPage(page, hub)
            dp.listen()
            await page.goto(f"http://127.0.0.1:{hub.port}/debug{query}")
            await expect(page).to_have_title(re.compile("redisq"))
            # the live panels connect by themselves as a monitor and get a first stats frame
            await expect(dp.loc("#monitor-status")).to_have_attribute("data-state", "open")
            await expect(dp.loc("#s-queued")).not_to_have_text("-")
            yield dp
        finally:
            await context.close()


# --------------------------------------------------------------------------- tests


async def test_debug_route_is_served_only_when_enabled(
    redis_url: str, limits: EngineLimits
) -> None:
    async with debug_hub(redis_url, limits, debug=False) as hub:
        status, _, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{hub.port}/debug")
        assert status == 404
    async with debug_hub(redis_url, limits, debug=True) as hub:
        status, ctype, body = await asyncio.to_thread(
            http_get, f"http://127.0.0.1:{hub.port}/debug"
        )
        health, _, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{hub.port}/health")
    assert status == 200 and health == 200
    assert ctype.startswith("text/html")
    # the page is the package resource that main.py serves
    assert body == resources.files("redisq_server").joinpath("static/ws_debug.html").read_bytes()
    text = body.decode()
    assert "<title>redisq" in text and 'id="submit"' in text
    # self-contained: no external script, style, font or image
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text and "url(http" not in text


async def test_page_as_client_submits_a_job_a_mock_worker_completes(
    redis_url: str, limits: EngineLimits, tmp_path: Path
) -> None:
    async with (
        debug_hub(redis_url, limits) as hub,
        MockWorker("mock", 1, hub=hub, job_types=["render"], run_time=0.05) as mock,
        debug_page(tmp_path, hub) as dp,
    ):
        # the panels already saw the mock GPU register (event catch-up or live)
        await expect(dp.loc('#workers tr[data-worker-id="mock:gpu0"]')).to_have_attribute(
            "data-status", "idle"
        )
        await dp.connect("client", "page-client")
        await dp.page.fill("#job-type", "render")
        await dp.page.fill("#priority", "5")
        await dp.page.fill("#params", '{"prompt": "a red fox", "steps": 2}')
        await dp.page.click("#submit")
        await expect(dp.loc("#last-job-id")).to_have_text(re.compile(r"^[0-9a-f]{32}$"))
        job_id = await dp.loc("#last-job-id").inner_text()

        row = dp.job_row(job_id)
        await expect(row).to_have_attribute("data-status", "completed")
        await expect(row.locator('[data-field="worker"]')).to_have_text("mock:gpu0")
        await expect(row.locator('[data-field="detail"]')).to_contain_text(
            '"worker_id":"mock:gpu0"'
        )
        await expect(row.locator("td").nth(2)).to_have_text("5")
        # every frame in and out is in the log
        for direction, kind in [
            ("out", T.SUBMIT_JOB),
            ("in", T.JOB_ACCEPTED),
            ("in", T.JOB_UPDATE),
            ("in", T.JOB_COMPLETED),
        ]:
            await expect(dp.log_entry(direction, kind).first).to_be_visible()
        sent = json.loads(await dp.log_entry("out", T.SUBMIT_JOB).locator(".j").inner_text())
        assert sent["type"] == T.SUBMIT_JOB and isinstance(sent["id"], str)
        assert sent["job_type"] == "render" and sent["priority"] == 5
        assert sent["params"] == {"prompt": "a red fox", "steps": 2}
        # the stats panel counts the completion; the worker is idle again with one job done
        await expect(dp.loc('#queue-depth tr[data-job-type="render"]')).to_be_visible()
        await expect(dp.loc("#s-completed")).to_have_text("1")
        mock_row = dp.loc('#workers tr[data-worker-id="mock:gpu0"]')
        await expect(mock_row).to_have_attribute("data-status", "idle")
        await expect(mock_row.locator('[data-field="done"]')).to_have_text("1")
        dp.check_clean()
    assert [(r.job_id, r.priority, r.outcome) for r in mock.history] == [(job_id, 5, "completed")]


async def test_page_as_worker_completes_a_job_from_a_python_client(
    redis_url: str, limits: EngineLimits, tmp_path: Path
) -> None:
    async with (
        debug_hub(redis_url, limits) as hub,
        QueueClient(hub, "py-client") as client,
        debug_page(tmp_path, hub) as dp,
    ):
        await dp.connect("worker", "page:gpu0")
        await dp.page.fill("#job-types", "manual, other")
        await dp.page.click("#register")
        await expect(dp.loc("#worker-state")).to_have_attribute("data-status", "idle")
        await expect(dp.loc("#complete")).to_be_disabled()

        job_id = await client.submit("manual", priority=2, params={"prompt": "by hand"})
        await expect(dp.loc("#assigned-job-id")).to_have_text(job_id)
        await expect(dp.loc("#assigned-attempt")).to_have_text("1")
        await expect(dp.loc("#assigned-job")).to_contain_text('"prompt": "by hand"')
        await expect(dp.loc("#worker-state")).to_have_attribute("data-status", "busy")
        registered = json.loads(
            await dp.log_entry("out", "register_worker").locator(".j").inner_text()
        )
        assert registered["job_types"] == ["manual", "other"]

        await dp.page.fill("#progress-value", "40")
        await dp.page.fill("#progress-message", "halfway there")
        await dp.page.click("#send-progress")
        await expect(dp.job_row(job_id)).to_have_attribute("data-status", "running")
        await expect(dp.job_row(job_id).locator('[data-field="detail"]')).to_have_text(
            "halfway there"
        )
        await expect(dp.log_entry("in", "ack").first).to_be_visible()
        ARTIFACTS.mkdir(exist_ok=True)
        await dp.page.screenshot(path=str(ARTIFACTS / "ws_debug_worker.png"))

        typed = {"answer": 42, "by": "page", "tags": ["a", "b"], "none": None}
        await dp.page.fill("#result", json.dumps(typed, indent=1))
        await dp.page.click("#complete")
        assert await client.result(job_id, timeout=15) == typed

        await expect(dp.loc("#worker-state")).to_have_attribute("data-status", "idle")
        await expect(dp.loc("#assigned-job-id")).to_have_text("-")
        await expect(dp.job_row(job_id)).to_have_attribute("data-status", "completed")
        acks = dp.loc('#log .entry[data-dir="in"][data-type="ack"]')
        await expect(acks).to_have_count(2)
        last_ack = json.loads(await acks.last.locator(".j").inner_text())
        assert last_ack["outcome"] == "completed" and last_ack["has_next"] is False
        status = await client.status(job_id)
        assert status["worker_id"] == "page:gpu0" and status["progress"] == 100
        dp.check_clean()


async def test_page_cancels_a_queued_job_and_sends_raw_frames(
    redis_url: str, limits: EngineLimits, tmp_path: Path
) -> None:
    async with debug_hub(redis_url, limits) as hub, debug_page(tmp_path, hub) as dp:
        await dp.connect("client", "page-client")
        for priority in ("7", "7", "-1"):
            await dp.page.fill("#job-type", "nobody")
            await dp.page.fill("#priority", priority)
            await dp.page.click("#submit")
        await expect(dp.log_entry("in", "job_accepted")).to_have_count(3)
        # the queue panel shows the depth by priority, highest first
        chips = dp.loc('#queue-depth tr[data-job-type="nobody"] .chip')
        await expect(chips).to_have_count(2)
        await expect(chips.nth(0)).to_have_attribute("data-priority", "7")
        await expect(chips.nth(0)).to_have_attribute("data-count", "2")
        await expect(chips.nth(1)).to_have_attribute("data-priority", "-1")

        job_id = await dp.loc("#last-job-id").inner_text()
        await expect(dp.job_row(job_id)).to_have_attribute("data-status", "queued")
        await expect(dp.loc("#target-job")).to_have_value(job_id)
        await dp.page.click("#cancel")
        await expect(dp.job_row(job_id)).to_have_attribute("data-status", "cancelled")
        await expect(chips).to_have_count(1)

        # a bad params object is refused by the page, not sent
        await dp.page.fill("#params", "[1, 2]")
        await dp.page.click("#submit")
        await expect(dp.loc("#last-error")).to_contain_text("expected a JSON object")
        await expect(dp.log_entry("out", T.SUBMIT_JOB)).to_have_count(3)

        # raw frames: an unknown type is answered with an error that quotes our id
        await dp.page.fill("#raw", '{"type": "launch_missiles", "id": "raw-1"}')
        await dp.page.click("#raw-send")
        await expect(dp.loc("#last-error")).to_contain_text("unknown_type")
        error = json.loads(await dp.log_entry("in", T.ERROR).last.locator(".j").inner_text())
        assert error["code"] == "unknown_type" and error["ref"] == "raw-1"
        await dp.page.fill("#raw", json.dumps(protocol.get_stats()))
        await dp.page.click("#raw-send")
        await expect(dp.log_entry("out", T.GET_STATS)).to_have_count(1)
        sent = json.loads(await dp.log_entry("out", T.GET_STATS).locator(".j").inner_text())
        await expect(
            dp.loc('#log .entry[data-dir="in"][data-type="stats"][data-sock="main"]')
        ).to_have_count(1)
        assert sent["id"]  # the page gave it an id
        dp.check_clean()


async def test_page_as_monitor_with_tokens(
    redis_url: str, limits: EngineLimits, tmp_path: Path
) -> None:
    async with (
        debug_hub(redis_url, limits, monitor_token="m-secret", client_token="c-secret") as hub,
        QueueClient(hub, "py-client", token="c-secret") as client,
        debug_page(tmp_path, hub, query="?monitor_token=m-secret") as dp,
    ):
        # without the token the hub refuses the handshake (HTTP 401)
        await dp.page.select_option("#role", "monitor")
        await dp.page.fill("#peer-id", "page-monitor")
        await dp.page.click("#connect")
        await expect(dp.loc("#conn-detail")).to_contain_text("refused")
        await expect(dp.loc("#conn-status")).to_have_attribute("data-state", "closed")
        await dp.page.fill("#token", "m-secret")
        await dp.page.click("#connect")
        await expect(dp.loc("#conn-status")).to_have_attribute("data-state", "open")
        await expect(dp.loc("#ws-url")).to_have_text(
            f"ws://127.0.0.1:{hub.port}/ws/monitor/page-monitor?token=***"
        )

        await dp.page.click("#mon-subscribe-events")
        subscribed = dp.loc('#log .entry[data-sock="main"][data-dir="in"][data-type="subscribed"]')
        await expect(subscribed).to_have_count(1)
        job_id = await client.submit("nobody", priority=4)
        event = dp.loc('#log .entry[data-sock="main"][data-dir="in"][data-type="event"]')
        await expect(event).to_have_count(1)
        assert json.loads(await event.locator(".j").inner_text())["job"] == job_id
        await dp.job_row(job_id).click()  # fills the job id fields
        await expect(dp.loc("#mon-job")).to_have_value(job_id)
        await dp.page.click("#mon-job-status")
        status = dp.log_entry("in", T.JOB_STATUS)
        await expect(status).to_have_count(1)
        assert json.loads(await status.locator(".j").inner_text())["priority"] == 4
        # a monitor may not cancel: the hub says so
        await dp.page.fill("#raw", json.dumps(protocol.cancel_job(job_id)))
        await dp.page.click("#raw-send")
        await expect(dp.loc("#last-error")).to_contain_text("not_allowed")
        await expect(dp.job_row(job_id)).to_have_attribute("data-status", "queued")
        dp.check_clean(expected_errors=r"WebSocket connection to .* failed")


async def test_screenshot_of_a_busy_page(
    redis_url: str, limits: EngineLimits, tmp_path: Path
) -> None:
    """Keeps artifacts/ws_debug.png: the page with every panel holding data."""
    async with (
        debug_hub(redis_url, limits) as hub,
        MockWorker("gpu-box", 2, hub=hub, job_types=["render", "upscale"], run_time=0.05),
        QueueClient(hub, "py-client") as client,
    ):
        for i in range(4):
            await client.result(await client.submit("render", priority=i, params={"i": i}), 15)
        await client.submit("render", params={"duration_s": 120})  # keeps one GPU busy
        for priority in (5, 5, 1, 0):
            await client.submit("train", priority=priority, params={"epochs": 3})
        # opened late: the panels catch up on what happened from the event stream
        async with debug_page(tmp_path, hub) as dp:
            await dp.connect("client", "page-client")
            await dp.page.fill("#job-type", "upscale")
            await dp.page.fill("#priority", "3")
            await dp.page.fill("#params", '{"image": "fox.png", "scale": 4}')
            await dp.page.click("#submit")
            await expect(dp.loc("#last-job-id")).to_have_text(re.compile(r"^[0-9a-f]{32}$"))
            job_id = await dp.loc("#last-job-id").inner_text()
            await expect(dp.job_row(job_id)).to_have_attribute("data-status", "completed")
            await dp.page.fill("#raw", json.dumps(protocol.get_job_status("nope")))
            await dp.page.click("#raw-send")
            await expect(dp.loc("#last-error")).to_contain_text("not_found")
            await expect(dp.loc('#queue-depth tr[data-job-type="train"]')).to_have_attribute(
                "data-queued", "4"
            )
            await expect(dp.loc('#workers tr[data-status="busy"]')).to_have_count(1)
            await expect(dp.loc('#jobs tr[data-status="completed"]')).to_have_count(5)
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "ws_debug.png"
            await dp.page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            dp.check_clean()
