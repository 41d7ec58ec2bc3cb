"""Run All in JupyterLab: notebook 01's dashboard is live while its workload runs.

JupyterLab and Chromium are started as in ``tests/test_jupyterlab.py`` (same private
server, same Chromium settings, the page may reach only that server). Chrome's
DevTools protocol reports every WebSocket frame and HTTP response the page gets, so
the test can count the bytes sent for the dashboard and how often plotly's bundle
came. A timer in the page notes when each cell finished and when the dashboard's
figure was first drawn. It checks, for notebook 01 run with JupyterLab's own Run All:

- the dashboard is drawn while the workload cell still runs (waited for, bounded);
  its time to first render is printed (target <= 3 s, not asserted: it depends on
  the machine);
- every plotly figure on the page is drawn within its output area;
- on every time axis, the newest sample lies inside the visible x range, while the
  workload runs and after;
- plotly's bundle reached the page once (one WebSocket frame carrying it, no plotly
  script fetched over HTTP);
- the stack's card is a live widget: its count of completed jobs moves during the
  burst, it links to the hub's ``/dashboard`` page, and its worker breakdown, once
  opened, stays open across refreshes;

and saves screenshots under ``artifacts/``: ``notebook01_live.png`` (the dashboard
while the burst runs), ``notebook01_card.png`` (the card, its breakdown open),
``notebook01_dashboard.png`` (the figure, after) and ``notebook01_done.png`` (the
page after Run All).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .browser import ARTIFACTS, needs_chromium
from .test_jupyterlab import (
    REPO,
    RUN_ALL_JS,
    JupyterLab,
    chromium,
    jupyterlab,
    kernel_processes,
    open_notebook,
    outputs,
    playwright_api,
    reap,
)

NOTEBOOK = "notebooks/01_quickstart.ipynb"
#: code cells of notebook 01's three-cell start (0-based, code cells only)
STACK_CELL, DASHBOARD_CELL, WORKLOAD_CELL = 0, 1, 2
#: what "plotly's bundle" looks like on the wire: anywidget's ``_esm`` of a FigureWidget
BUNDLE_MARK = b'"_esm"'
BUNDLE_MIN_BYTES = 1_000_000

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300), needs_chromium]

# Runs in the page every 20 ms: the wall-clock time (ms) at which each code cell's
# prompt first showed an execution count, and at which the dashboard's figure
# (in the second code cell) was first drawn, then first drawn with data.
MARKS_JS = """() => {
  window.__marks = {};
  const now = () => performance.timeOrigin + performance.now();
  const mark = (k) => { if (!(k in window.__marks)) window.__marks[k] = now(); };
  window.__marksTimer = setInterval(() => {
    const cells = document.querySelectorAll('.jp-Notebook .jp-CodeCell');
    cells.forEach((c, i) => {
      const prompt = (c.querySelector('.jp-InputPrompt') || {}).textContent || '';
      if (/\\[\\d+\\]/.test(prompt)) mark('done' + i);
    });
    const plot = cells[DASHBOARD] && cells[DASHBOARD].querySelector('.js-plotly-plot');
    if (plot && plot.querySelector('.main-svg')) mark('plot');
    if (plot && plot.querySelector('.scatterlayer .trace path.js-line')) mark('data');
  }, 20);
}""".replace("DASHBOARD", str(DASHBOARD_CELL))
WORKLOAD_RUNNING_JS = """() => {
  const cell = document.querySelectorAll('.jp-Notebook .jp-CodeCell')[WORKLOAD];
  return ((cell.querySelector('.jp-InputPrompt') || {}).textContent || '').includes('*');
}""".replace("WORKLOAD", str(WORKLOAD_CELL))
# The stack's card (first code cell's output): a live widget, its "Completed" row
# and all its rows (each refresh changes "Since start"), its link to the hub's page,
# and whether its worker breakdown is open.
CARD_JS = """() => {
  const cell = document.querySelectorAll('.jp-Notebook .jp-CodeCell')[STACK];
  const rows = [...cell.querySelectorAll('.widget-html-content tr')].map((r) => r.innerText);
  const link = cell.querySelector('.widget-html-content a[href$="/dashboard"]');
  const fold = cell.querySelector('.jupyter-widget-Collapse-contents');
  return {
    widget: !!cell.querySelector('.jupyter-widgets'),
    completed: rows.find((r) => r.startsWith('Completed')) || null,
    rows: rows.join(' | '),
    link: link && link.getAttribute('href'),
    open: !!cell.querySelector('.jupyter-widget-Collapse-open'),
    fold: fold ? fold.innerText : '',
  };
}""".replace("STACK", str(STACK_CELL))
# For each scatter trace drawn: how many line paths it has and the length of the first.
LINES_JS = """() => [...document.querySelectorAll('.js-plotly-plot .scatterlayer .trace')].map(
  (t) => [t.querySelectorAll('path.js-line').length,
          ((t.querySelector('path.js-line') || { getAttribute: () => '' }).getAttribute('d') || '').length])"""
# Every plotly figure on the page: its drawn width against its output area's, and
# per x axis the visible range and the newest x among the scatter traces drawn on
# it (bars, such as the task stream's, are left out: their x is a duration).
FIGURES_JS = """() => [...document.querySelectorAll('.js-plotly-plot')].map((plot) => {
  const svg = plot.querySelector('.main-svg');
  const area = plot.closest('.jp-OutputArea-output');
  const lay = plot._fullLayout || {};
  const axes = {};
  for (const k of Object.keys(lay).filter((k) => /^xaxis[0-9]*$/.test(k))) {
    axes[k] = { range: lay[k].range.map(Number), type: lay[k].type, newest: null };
  }
  for (const t of plot._fullData || []) {
    if (t.type !== 'scatter' || !t.visible || !t.x || !t.x.length) continue;
    const key = 'xaxis' + (t.xaxis || 'x').slice(1);
    const xs = Array.from(t.x).map(Number).filter((x) => Number.isFinite(x));
    if (!xs.length || !axes[key]) continue;
    const newest = Math.max(...xs);
    axes[key].newest = axes[key].newest === null ? newest : Math.max(axes[key].newest, newest);
  }
  const s = svg ? svg.getBoundingClientRect() : null;
  const a = area ? area.getBoundingClientRect() : null;
  return {
    svg: s && { left: s.left, right: s.right, width: s.width },
    area: a && { left: a.left, right: a.right, width: a.width },
    axes,
  };
})"""


# ------------------------------------------------------------------ the wire


@dataclass
class Wire:
    """What Chrome's DevTools protocol saw the page receive, each item stamped with
    the wall-clock time (ms) at which it was reported."""

    frames: list[tuple[float, int, bool]] = field(default_factory=list)  # t, bytes, bundle?
    http: list[tuple[float, int, str]] = field(default_factory=list)  # t, bytes, url
    urls: dict[str, str] = field(default_factory=dict)

    def on_frame(self, event: dict[str, Any]) -> None:
        response = event["response"]
        data = response["payloadData"]
        raw = base64.b64decode(data) if response.get("opcode") == 2 else data.encode()
        bundle = len(raw) >= BUNDLE_MIN_BYTES and BUNDLE_MARK in raw
        self.frames.append((time.time() * 1000, len(raw), bundle))

    def on_response(self, event: dict[str, Any]) -> None:
        self.urls[event["requestId"]] = event["response"]["url"]

    def on_finished(self, event: dict[str, Any]) -> None:
        url = self.urls.get(event["requestId"], "")
        self.http.append((time.time() * 1000, int(event["encodedDataLength"]), url))

    def bytes_between(self, start: float, end: float) -> int:
        return sum(n for t, n, _ in self.frames if start <= t <= end) + sum(
            n for t, n, _ in self.http if start <= t <= end
        )

    @property
    def bundles(self) -> int:
        return sum(b for _, _, b in self.frames)

    @property
    def plotly_scripts(self) -> list[str]:
        """Scripts fetched over HTTP big enough to be plotly.js (JupyterLab's plotly
        extension registers itself with a small ``remoteEntry`` script at start)."""
        return [
            u
            for _, n, u in self.http
            if "plotly" in u.lower() and u.endswith(".js") and n >= BUNDLE_MIN_BYTES
        ]


class _Prepared:
    """Hands ``open_notebook`` a page made beforehand (with DevTools attached)."""

    def __init__(self, page: Any) -> None:
        self.page = page

    async def new_page(self) -> Any:
        return self.page


async def open_watched(context: Any, lab: JupyterLab, path: str) -> tuple[Any, Wire]:
    """Open ``path`` like ``open_notebook``, with the page's network watched from its
    first request on (so the kernel's WebSocket is seen from its first frame)."""
    page = await context.new_page()
    wire = Wire()
    cdp = await context.new_cdp_session(page)
    cdp.on("Network.webSocketFrameReceived", wire.on_frame)
    cdp.on("Network.responseReceived", wire.on_response)
    cdp.on("Network.loadingFinished", wire.on_finished)
    await cdp.send("Network.enable", {"maxTotalBufferSize": 0, "maxResourceBufferSize": 0})
    return await open_notebook(_Prepared(page), lab, path), wire


# -------------------------------------------------------------- the checks


def check_figures(figures: list[dict[str, Any]], when: str) -> int:
    """Assert each figure is drawn within its output area and its newest sample is
    in view on every time axis that has samples. Returns the axes checked."""
    checked = 0
    for i, f in enumerate(figures):
        assert f["svg"] and f["area"], (when, i, f)
        assert f["svg"]["left"] >= f["area"]["left"] - 1, (when, i, f)
        assert f["svg"]["right"] <= f["area"]["right"] + 1, (when, i, f)
        for name, axis in f["axes"].items():
            if axis["newest"] is None or axis["type"] != "linear":
                continue
            low, high = sorted(axis["range"])
            slack = 1e-6 * max(1.0, abs(high))
            assert low - slack <= axis["newest"] <= high + slack, (when, i, name, axis)
            checked += 1
    return checked


async def test_run_all_shows_notebook_01s_dashboard_live(tmp_path: Path) -> None:
    with jupyterlab(REPO, tmp_path) as lab:
        async with chromium(tmp_path, lab) as (context, blocked, writes):
            page, wire = await open_watched(context, lab, NOTEBOOK)
            await page.evaluate(MARKS_JS)
            await page.evaluate(RUN_ALL_JS)
            # the card's breakdown is opened as soon as the card shows (the stack's cell
            # runs first, long before the burst ends): it must stay open through every
            # refresh that follows
            card = page.locator(".jp-Notebook .jp-CodeCell").nth(STACK_CELL)
            header = card.locator(".jupyter-widget-Collapse-header").first
            await header.wait_for(timeout=60_000)
            await header.click()
            await card.locator(".jupyter-widget-Collapse-open").wait_for()
            seen_open = {(await page.evaluate(CARD_JS))["rows"]}  # the card's rows, while open
            counts = set()  # the completed counts the card showed
            # the dashboard is drawn, with data, while the burst still runs; the card is
            # read meanwhile (on a loaded machine the burst may be near its end by then)
            drawn_js = f"() => ['data' in window.__marks || window.__runAll.done, ({CARD_JS})()]"
            for _ in range(240):  # 60 s
                drawn, card_now = await page.evaluate(drawn_js)
                counts.add(card_now["completed"])
                if card_now["open"]:
                    seen_open.add(card_now["rows"])
                if drawn:
                    break
                await page.wait_for_timeout(250)
            else:
                raise AssertionError(f"no dashboard after 60 s:\n{await outputs(page)}")
            marks = await page.evaluate("() => window.__marks")
            workload_done = marks.get(f"done{WORKLOAD_CELL}", float("inf"))
            if not ("data" in marks and marks["data"] < workload_done):
                figures = await page.evaluate(FIGURES_JS)
                lines = await page.evaluate(LINES_JS)
                raise AssertionError(
                    f"no data drawn while the workload ran: {marks} {figures} {lines}"
                )
            # while it runs: the figure fits, the newest sample is in view, and the
            # card counts the completed jobs, its breakdown still open
            live_checks = 0
            plot = page.locator(".js-plotly-plot").first
            running = f"() => ({WORKLOAD_RUNNING_JS})() && [({FIGURES_JS})(), ({CARD_JS})()]"
            while live := await page.evaluate(running):
                figures, card_now = live
                if not live_checks:  # the first look: screenshots
                    await plot.scroll_into_view_if_needed()
                    ARTIFACTS.mkdir(exist_ok=True)
                    await page.screenshot(path=str(ARTIFACTS / "notebook01_live.png"))
                    await card.scroll_into_view_if_needed()
                    await card.screenshot(path=str(ARTIFACTS / "notebook01_card.png"))
                if card_now["open"]:
                    seen_open.add(card_now["rows"])
                live_checks += check_figures(figures, "live")
                assert card_now["widget"] and card_now["link"], card_now
                counts.add(card_now["completed"])
                await page.wait_for_timeout(250)
            assert live_checks > 0, "the workload ended before a figure could be checked"
            assert len(counts) >= 2, f"the card did not move: {counts}"
            if len(seen_open) < 2:
                # no refresh seen while the page was looked at (a loaded machine is slow
                # to draw the dashboard): the card's next refresh still comes (its "Since
                # start" moves, and its state reads closed when the stack closes), and
                # the breakdown must be open then
                seen = json.dumps(sorted(seen_open))
                refreshed = f"() => !{seen}.includes(({CARD_JS})().rows)"
                try:
                    await page.wait_for_function(refreshed, timeout=60_000)
                except playwright_api.TimeoutError:
                    now = await page.evaluate(CARD_JS)
                    raise AssertionError(f"the card did not refresh: {seen_open} {now}") from None
                last = await page.evaluate(CARD_JS)
                if last["open"]:
                    seen_open.add(last["rows"])
            assert len(seen_open) >= 2, f"the breakdown closed on a refresh: {seen_open}"
            assert card_now["link"].endswith("/dashboard") and "By machine" in card_now["fold"]
            await page.wait_for_function("() => window.__runAll.done", timeout=120_000)
            result = await page.evaluate("() => window.__runAll")
            assert result["ok"], f"a cell failed:\n{await outputs(page)}"
            marks = await page.evaluate("() => window.__marks")
            figures = await page.evaluate(FIGURES_JS)
            assert len(figures) == 1, figures  # one dashboard, one figure
            assert check_figures(figures, "after") >= 4  # depth, throughput, latency, workers
            await plot.scroll_into_view_if_needed()
            await plot.screenshot(path=str(ARTIFACTS / "notebook01_dashboard.png"))
            await page.screenshot(path=str(ARTIFACTS / "notebook01_done.png"), full_page=True)
            pids = await kernel_processes(page)
            # plotly's bundle came once: one frame on the kernel's socket, no script
            assert wire.bundles == 1 and wire.plotly_scripts == [], (
                wire.bundles,
                wire.plotly_scripts,
            )
            started = marks[f"done{STACK_CELL}"]  # the dashboard's cell starts here
            report = {
                "time to first render (s)": (marks["plot"] - started) / 1000,
                "time to first data (s)": (marks["data"] - started) / 1000,
                "drawn after its cell ended (s)": (marks["plot"] - marks[f"done{DASHBOARD_CELL}"])
                / 1000,
                "workload cell ended (s)": (marks[f"done{WORKLOAD_CELL}"] - started) / 1000,
                "bytes to first render": wire.bytes_between(started, marks["plot"]),
                "plotly bundles": wire.bundles,
                "bytes over the kernel socket, Run All": sum(n for _, n, _ in wire.frames),
            }
            print("\n".join(f"{k}: {v:.3g}" for k, v in report.items()))
            assert blocked == [] and writes == []
    assert reap(pids) == []
