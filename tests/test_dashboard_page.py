"""The hub's /dashboard page (server/static/dashboard.html) in a real headless Chromium.

Each test starts its own hub against the session's redis-server; jobs come from a
separate Python client and mock GPUs over real sockets, and the page reads
everything through its own monitor socket. Waits are on page conditions only.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from redisq_lab.client import QueueClient
from redisq_lab.mock_worker import MockWorker
from redisq_server import EngineLimits
from redisq_server.main import Hub

from .browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, HubPage, http_get, needs_chromium
from .helpers import hub_settings

TIMEOUT_MS = 15_000

pytestmark = [pytest.mark.browser, needs_chromium]

playwright_api = pytest.importorskip("playwright.async_api", reason="needs playwright (test extra)")
expect = playwright_api.expect


class Dashboard(HubPage):
    """The hub's /dashboard page."""

    async def updates(self) -> int:
        return int(await self.loc("#updates").get_attribute("data-count"))

    def check_clean(self) -> None:
        """No script error, and no request anywhere but the hub that served the page."""
        assert self.errors == []
        assert self.strays() == []


@asynccontextmanager
async def dashboard(
    tmp_path: Path, hub: Hub, query: str = "", live: bool = True
) -> AsyncIterator[Dashboard]:
    """Chromium (fresh profile) showing the hub's /dashboard. Enter it inside the
    hub's ``async with`` (the browser must be gone before the hub stops)."""
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
            d = Dashboard(page, hub)
            d.listen()
            await page.goto(f"http://127.0.0.1:{hub.port}/dashboard{query}")
            await expect(page).to_have_title("redisq dashboard")
            if live:
                await expect(d.loc("#conn")).to_have_attribute("data-state", "open")
                await expect(d.loc("#hub-id")).to_have_text(hub.hub_id)
                await expect(d.loc("#updates")).not_to_have_attribute("data-count", "0")
            yield d
        finally:
            await context.close()


@asynccontextmanager
async def own_hub(redis_url: str, limits: EngineLimits, **kw: Any) -> AsyncIterator[Hub]:
    async with Hub(hub_settings(redis_url, limits, **kw)) as hub:
        yield hub


# --------------------------------------------------------------------------- tests


async def test_every_hub_serves_the_page_from_the_package(
    redis_url: str, limits: EngineLimits
) -> None:
    async with own_hub(redis_url, limits) as hub:  # no debug flag needed
        status, ctype, body = await asyncio.to_thread(
            http_get, f"http://127.0.0.1:{hub.port}/dashboard"
        )
    assert status == 200 and ctype.startswith("text/html")
    assert body == resources.files("redisq_server").joinpath("static/dashboard.html").read_bytes()
    text = body.decode()
    # self-contained: no external script, style, font or image
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text and "url(http" not in text
    # it speaks only what the monitor role may send
    sent = set(re.findall(r'send\(\{ type: "(\w+)"', text))
    assert sent == {"subscribe_stats", "subscribe_events", "get_events", "get_job_status"}


async def test_page_shows_charts_and_jobs_a_separate_client_ran(
    redis_url: str, limits: EngineLimits, tmp_path: Path
) -> None:
    async with (
        own_hub(redis_url, limits) as hub,
        MockWorker("gpu-box", 2, hub=hub, job_types=["render"], run_time=0.05),
        QueueClient(hub, "py-client") as client,
    ):
        before = await client.submit("render", priority=5, params={"prompt": "fox"})
        await client.result(before, timeout=10)
        async with dashboard(tmp_path, hub) as d:
            # a job that finished before the page opened: read back from the event stream
            row = d.loc(f'#recent-jobs tr[data-job-id="{before}"]')
            await expect(row).to_have_attribute("data-status", "completed")
            await expect(row.locator("td").nth(2)).to_have_text("5")
            await expect(d.loc(f'#task-stream rect.bar.run[data-job-id="{before}"]')).to_have_count(
                1
            )
            await expect(d.loc('#workers .gpu[data-worker-id="gpu-box:gpu0"]')).to_be_visible()
            await expect(d.loc('#workers .machine[data-machine="gpu-box"]')).to_contain_text(
                "2 GPUs live"
            )

            # it keeps updating: stats ticks, and a job submitted now shows up live
            seen = await d.updates()
            live = await client.submit("render", priority=9, params={"prompt": "owl"})
            await client.result(live, timeout=10)
            await expect(d.loc(f'#recent-jobs tr[data-job-id="{live}"]')).to_have_attribute(
                "data-status", "completed"
            )
            await expect(d.loc(f'#task-stream rect.bar.run[data-job-id="{live}"]')).to_have_count(1)
            await d.page.wait_for_function(
                f"Number(document.querySelector('#updates').dataset.count) >= {seen + 2}"
            )
            assert await d.loc("#k-completed").inner_text() == "2"
            # the charts drew lines over the stats ticks, with labelled axes
            line = d.loc('#chart-throughput path.series[data-name="completed"]')
            await expect(line).to_have_count(1)
            assert int(await line.get_attribute("data-points")) >= 2
            await expect(d.loc("#chart-depth path.series")).not_to_have_count(0)
            await expect(d.loc('#chart-latency path.series[data-name="p95"]')).to_have_count(1)
            for chart, unit in [
                ("#chart-depth", "jobs queued"),
                ("#chart-throughput", "jobs/s"),
                ("#chart-latency", "seconds"),
                ("#task-stream", "time (s before now, server clock)"),
            ]:
                await expect(d.loc(chart)).to_contain_text(unit)
            await expect(d.loc("#latency-now")).to_contain_text("(n=2)")

            # a job's lifecycle on click, read with get_job_status
            await d.loc(f'#recent-jobs tr[data-job-id="{live}"]').click()
            box = d.loc("#lifecycle")
            await expect(box).to_have_attribute("data-status", "completed")
            await expect(box.locator('dd[data-field="worker"]')).to_have_text(
                re.compile(r"^gpu-box:gpu[01]$")
            )
            await expect(box.locator('dd[data-field="type / priority"]')).to_have_text("render / 9")
            await expect(box.locator('dd[data-field="run"]')).to_have_text(re.compile(r" s$"))
            await expect(box.locator('dd[data-field="events seen"]')).to_contain_text("submitted@")
            d.check_clean()


async def test_task_stream_shows_waits_and_priorities_under_a_backlog(
    redis_url: str, limits: EngineLimits, tmp_path: Path
) -> None:
    """A backlog on two GPUs: queued waits appear before their runs, one colour per
    priority, the newest bars at the right edge. Leaves a screenshot."""
    async with (
        own_hub(redis_url, limits) as hub,
        dashboard(tmp_path, hub) as d,
        QueueClient(hub, "py-client") as client,
    ):
        async with MockWorker("box", 2, hub=hub, job_types=["render"], run_time=0.15):
            await d.page.wait_for_function("window.redisqDashboard.workers.size === 2")
            ids = await client.submit_many(
                [{"job_type": "render", "priority": (0, 5, 10)[i % 3]} for i in range(30)]
            )
            await expect(d.loc("#k-queued")).not_to_have_text("0")
            await client.results(ids, timeout=60)
            await expect(d.loc("#k-completed")).to_have_text("30")
            await expect(d.loc("#task-stream rect.bar.run")).to_have_count(30)
        waits = d.loc("#task-stream rect.bar.wait")
        assert await waits.count() >= 20  # most jobs queued before a GPU took them
        colours = {
            p: await d.loc(f'#task-stream rect.bar.run[data-priority="{p}"]').first.get_attribute(
                "fill"
            )
            for p in (0, 5, 10)
        }
        assert len(set(colours.values())) == 3
        # the newest bar ends near the right edge of the plot (the x axis ends at now)
        right = await d.page.evaluate(
            """() => {
              const svg = document.querySelector('#task-stream');
              const xs = [...svg.querySelectorAll('rect.bar.run')].map(
                r => Number(r.getAttribute('x')) + Number(r.getAttribute('width')));
              return Math.max(...xs) / svg.viewBox.baseVal.width;
            }"""
        )
        assert right > 0.8
        # strict priority: on average the priority-10 jobs waited least
        await expect(d.loc("#latency-now")).to_contain_text("(n=30)")
        await d.page.wait_for_function(
            "Number(document.querySelector('#updates').dataset.count) >= 3"
        )
        ARTIFACTS.mkdir(exist_ok=True)
        await d.page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        d.check_clean()


async def test_page_survives_a_reload_and_a_lost_socket(
    redis_url: str, limits: EngineLimits, tmp_path: Path
) -> None:
    async with (
        own_hub(redis_url, limits) as hub,
        MockWorker("m", 1, hub=hub, job_types=["render"], run_time=0.0),
        QueueClient(hub, "py-client") as client,
        dashboard(tmp_path, hub) as d,
    ):
        first = await client.submit("render")
        await client.result(first, timeout=10)
        await expect(d.loc(f'#recent-jobs tr[data-job-id="{first}"]')).to_be_visible()
        await d.page.reload()
        await expect(d.loc("#conn")).to_have_attribute("data-state", "open")
        await expect(d.loc(f'#recent-jobs tr[data-job-id="{first}"]')).to_be_visible()
        # the hub drops the page's socket: it reconnects and catches up on what it missed
        for conn in list(hub.registry.monitors):
            await conn.ws.close()
        await expect(d.loc("#conn")).to_have_attribute("data-state", "closed")
        second = await client.submit("render")
        await client.result(second, timeout=10)
        await expect(d.loc("#conn")).to_have_attribute("data-state", "open")
        await expect(d.loc(f'#recent-jobs tr[data-job-id="{second}"]')).to_have_attribute(
            "data-status", "completed"
        )
        d.check_clean()


async def test_page_uses_the_monitor_token(
    redis_url: str, limits: EngineLimits, tmp_path: Path
) -> None:
    async with own_hub(redis_url, limits, monitor_token="m-secret") as hub:
        async with dashboard(tmp_path, hub, live=False) as d:
            await expect(d.loc("#conn")).to_have_attribute("data-state", "closed")
            await expect(d.loc("#conn")).to_contain_text("token")
        async with dashboard(tmp_path, hub, "?token=m-secret") as d:
            await expect(d.loc("#k-queued")).to_have_text("0")
            assert any("token=m-secret" in u for u in d.requests if u.startswith("ws://"))


async def test_gpu_tiles_and_task_stream_follow_a_prefetch_window(
    redis_url: str, limits: EngineLimits, tmp_path: Path
) -> None:
    """One GPU with a prefetch window: the job it holds ahead shows as its next job
    (not as its job), in a held lane with no run bar; it becomes the GPU's job when
    the one before it ends, at the time the engine records (its ``assigned``), so
    each completed job counts once on the tile, runs never overlap on the GPU's row
    and the wait for a GPU is the engine's queued -> assigned. A cancelled job held
    ahead leaves the tile without a run. Leaves a screenshot."""
    async with (
        own_hub(redis_url, limits) as hub,
        QueueClient(hub, "py-client") as client,
        dashboard(tmp_path, hub) as d,
    ):
        # the order the one GPU takes them: first, long, held (ahead of long), then the rest
        first = await client.submit("render", priority=10)
        long = await client.submit("long", priority=5)
        held = await client.submit("render", priority=1)
        rest = [await client.submit("render", priority=0) for _ in range(8)]
        async with MockWorker(
            "gpu-box",
            1,
            hub=hub,
            job_types=["render", "long"],
            run_time={"render": 0.05, "long": 600.0},
            prefetch=1,
        ):
            gpu = d.loc('#workers .gpu[data-worker-id="gpu-box:gpu0"]')
            await expect(gpu).to_have_attribute("data-job", long)  # first done: long runs
            await expect(gpu.locator(f'[data-next="{held}"]')).to_contain_text("next:")
            await expect(d.loc(f'#active-jobs tr[data-job-id="{held}"] td').nth(4)).to_have_text(
                "held ahead"
            )
            await expect(d.loc(f'#task-stream rect.bar.held[data-job-id="{held}"]')).to_have_count(
                1
            )
            await expect(d.loc(f'#task-stream rect.bar.run[data-job-id="{held}"]')).to_have_count(0)
            # the tables fit their panels at 1280 px: no column cut off at the edge
            await d.page.set_viewport_size({"width": 1280, "height": 1000})
            cut = await d.page.evaluate(
                """() => [...document.querySelectorAll('.scroll')]
                     .filter((e) => e.scrollWidth > e.clientWidth).map((e) => e.innerText.slice(0, 40))"""
            )
            assert cut == []
            ARTIFACTS.mkdir(exist_ok=True)
            await d.page.screenshot(path=str(ARTIFACTS / "dashboard-prefetch.png"), full_page=True)

            await client.cancel(held)  # out of the window: the GPU still runs `long`
            await expect(gpu.locator("[data-next]")).to_have_count(0)
            await expect(gpu).to_have_attribute("data-job", long)
            await client.cancel(long)  # acknowledged: the rest run through the window
            await client.results(rest, timeout=30)
            await expect(d.loc("#k-completed")).to_have_text(str(1 + len(rest)))
            await expect(d.loc(f'#recent-jobs tr[data-job-id="{rest[-1]}"]')).to_have_attribute(
                "data-status", "completed"
            )
        await expect(d.loc(f'#task-stream rect.bar.run[data-job-id="{held}"]')).to_have_count(0)
        page = await d.page.evaluate(
            """() => {
              const s = window.redisqDashboard, w = s.workers.get('gpu-box:gpu0');
              const runs = [];
              for (const j of s.jobs.values())
                for (const a of j.attempts) if (a.start !== null) runs.push([a.start, a.end, j.id]);
              const last = (id) => { const j = s.jobs.get(id); return j.attempts[j.attempts.length - 1]; };
              return { done: w.done, next: w.next, runs,
                       starts: Object.fromEntries([...s.jobs.keys()].map((id) => [id, [last(id).start, last(id).wait]])) };
            }"""
        )
        assert page["done"] == 1 + len(rest) and page["next"] is None
        runs = sorted(page["runs"])
        assert len(runs) == 2 + len(rest)  # first, long, the rest; never the held one
        for (_, end, a), (start, _, b) in pairwise(runs):
            assert end is not None and start >= end, (a, b)  # one job at a time on the GPU
        for job_id in [first, *rest]:
            job = await client.status(job_id)
            start, wait = page["starts"][job_id]
            assert abs(start - job["assigned"]) < 1e-5, job_id  # the engine's own time
            assert abs(wait - (job["assigned"] - job["queued"])) < 1e-5, job_id
        held_rest = [await client.status(j) for j in rest]
        assert sum(j["held"] is not None for j in held_rest) >= len(rest) - 1
        # a job's lifecycle names the time it was held ahead
        one = next(j for j in held_rest if j["held"] is not None)
        await d.loc(f'#recent-jobs tr[data-job-id="{one["job_id"]}"]').click()
        box = d.loc("#lifecycle")
        await expect(box).to_have_attribute("data-status", "completed")
        await expect(box.locator('dd[data-field="held ahead"]')).to_contain_text("Z")
        wait = f"{one['assigned'] - one['queued']:.3f} s (of which"
        await expect(box.locator('dd[data-field="wait for a GPU"]')).to_contain_text(wait)
        d.check_clean()


async def test_a_page_opened_mid_job_follows_a_prefetch_window_it_saw_only_in_part(
    redis_url: str, limits: EngineLimits, tmp_path: Path
) -> None:
    """The page can open after a GPU's job began (its assignment older than what it
    reads back): it sees that job's end but cannot place it, while the GPU holds
    the next job ahead. The held job still becomes the GPU's job: at the latest
    when the engine sends the next one ahead, at its first progress report, or when
    it ends itself. So every job that ran is counted once and none stays "held
    ahead" for ever. Events are fed to the page as the hub would send them; three
    GPUs, one way each."""

    def ev(e: str, t: float, job: str, gpu: int, **more: str) -> dict[str, str]:
        return {
            "e": e,
            "t": f"{t:.6f}",
            "job": job,
            "worker": f"box:gpu{gpu}",
            "attempt": "1",
            **more,
        }

    ahead = {"ahead": "1", "jtype": "t", "priority": "1"}
    events = [
        # gpu0: A began before the page; H is held, then N is sent ahead when A ends
        ev("assigned", 100.0, "H", 0, **ahead),
        ev("completed", 101.0, "A", 0),
        ev("assigned", 101.0, "N", 0, **ahead),  # so H is the GPU's job by now
        ev("completed", 102.0, "H", 0),  # N's turn
        ev("completed", 103.0, "N", 0),
        # gpu1: B ends with nothing left to send ahead; X's progress says it runs
        ev("assigned", 200.0, "X", 1, **ahead),
        ev("completed", 201.0, "B", 1),
        ev("progress", 201.5, "X", 1, progress="0"),
        ev("completed", 202.0, "X", 1),
        # gpu2: as gpu1, but Z reports nothing before its end
        ev("assigned", 300.0, "Z", 2, **ahead),
        ev("completed", 301.0, "C", 2),
        ev("completed", 302.0, "Z", 2),
    ]
    async with own_hub(redis_url, limits) as hub, dashboard(tmp_path, hub) as d:
        page = await d.page.evaluate(
            """(events) => {
              window.redisqApply(events);
              const s = window.redisqDashboard;
              const start = (id) => { const a = s.jobs.get(id).attempts; return a[a.length - 1].start; };
              const gpus = [0, 1, 2].map((i) => s.workers.get('box:gpu' + i));
              return { done: gpus.map((g) => g.done), busy: gpus.map((g) => g.job || g.next),
                       starts: Object.fromEntries(['H', 'N', 'X', 'Z'].map((id) => [id, start(id)])) };
            }""",
            events,
        )
        assert page["starts"] == {"H": 101.0, "N": 102.0, "X": 201.5, "Z": 302.0}, page
        assert page["done"] == [2, 1, 1] and page["busy"] == [None, None, None], page
        await expect(d.loc("#active-jobs tbody")).to_contain_text("none")
        d.check_clean()
