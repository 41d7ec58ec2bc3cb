"""JupyterLab smoke test: a real JupyterLab server, a notebook run in headless Chromium.

JupyterLab runs on a free loopback port with a token, its config, data, runtime,
settings and workspace dirs in a temp dir, and a ``python3`` kernelspec installed
there that points at this interpreter (the project's venv). The browser opens the
notebook, runs every cell through JupyterLab's own ``notebook:run-all-cells``
command, and the test checks that a live plotly chart in the page holds data
points; for the dashboard notebook, that its one figure is drawn within (and across)
its output area with every time axis ending at the newest sample. Autosave is off, so a notebook of the repo is never rewritten. Everything
started is shut down at the end: the server, its kernels and what they started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from redisq_lab.redis_process import free_port

from .browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, needs_chromium

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = "notebooks/02_mock_workers_dashboard.ipynb"
KERNEL_DISPLAY_NAME = "Python 3 (redisq venv)"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(240),
    needs_chromium,
]

playwright_api = pytest.importorskip("playwright.async_api", reason="needs playwright (test extra)")
pytest.importorskip("jupyterlab", reason="needs jupyterlab (lab extra)")
pytest.importorskip("plotly", reason="needs plotly (lab extra)")
expect = playwright_api.expect


# ------------------------------------------------------------------ the server


def _settings(path: Path, values: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))


class JupyterLab:
    """One ``jupyter lab`` process rooted at ``root``, all its state under ``work``."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root = root
        self.work = work
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work / "jupyterlab.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "IPYTHON"))}
        env.update(
            JUPYTER_CONFIG_DIR=str(self.work / "config"),
            JUPYTER_DATA_DIR=str(self.work / "data"),
            JUPYTER_RUNTIME_DIR=str(self.work / "runtime"),
            IPYTHONDIR=str(self.work / "ipython"),
            # the private data dir comes before the venv's share/jupyter
            JUPYTER_PREFER_ENV_PATH="0",
            # the kernel imports redisq_lab / redisq_server from this checkout
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        )
        return env

    def _prepare(self, env: dict[str, str]) -> None:
        # "python3" in the private data dir wins over any other: this venv's python
        subprocess.run(
            [
                *(sys.executable, "-m", "ipykernel", "install", "--user"),
                *("--name", "python3", "--display-name", KERNEL_DISPLAY_NAME),
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        # nothing fetched from outside, nothing saved, every cell attached to the DOM
        _settings(
            self.work / "config" / "jupyter_lab_config.json",
            {
                "LabApp": {
                    "news_url": None,
                    "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                    "extension_manager": "readonly",
                    "expose_app_in_browser": True,
                    "user_settings_dir": str(self.work / "settings"),
                    "workspaces_dir": str(self.work / "workspaces"),
                }
            },
        )
        # checkpoints (JupyterLab makes one when it opens a notebook) go to the temp dir
        _settings(
            self.work / "config" / "jupyter_server_config.json",
            {"FileCheckpoints": {"root_dir": str(self.work / "checkpoints")}},
        )
        _settings(
            self.work / "config" / "labconfig" / "page_config.json",
            {"disabledExtensions": {"@jupyterlab/extensionmanager-extension": True}},
        )
        user = self.work / "settings" / "@jupyterlab"
        _settings(
            user / "apputils-extension" / "notification.jupyterlab-settings",
            {"fetchNews": "false", "checkForUpdates": False},
        )
        _settings(user / "docmanager-extension" / "plugin.jupyterlab-settings", {"autosave": False})
        _settings(
            user / "notebook-extension" / "tracker.jupyterlab-settings",
            {"windowingMode": "none"},
        )

    def start(self, timeout: float = 60) -> JupyterLab:
        env = self.env()
        self._prepare(env)
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.open_browser=False",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.terminals_enabled=False",
            "--ServerApp.allow_root=True",
            "--KernelSpecManager.ensure_native_kernel=False",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self.api("GET", "/api/status") is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"JupyterLab did not start:\n{self.log()}")
            time.sleep(0.1)
        return self

    def api(self, method: str, path: str) -> Any:
        """A JSON call to the server's REST API (None when it does not answer)."""
        req = urllib.request.Request(
            self.base + path,
            method=method,
            headers={"Authorization": f"token {self.token}"},
            data=b"" if method == "POST" else None,
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                body = r.read()
                return json.loads(body) if body else {}
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Shut the server and its kernels down; kill what is left. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            self.api("POST", "/api/shutdown")  # shuts the kernels down, then exits
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


@contextlib.contextmanager
def jupyterlab(root: Path, work: Path) -> Iterator[JupyterLab]:
    lab = JupyterLab(root, work).start()
    try:
        yield lab
    finally:
        lab.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def is_this_venv(prefix: str) -> bool:
    """True when ``prefix`` (a kernel's ``sys.prefix``) is the test's own environment."""
    return Path(prefix).resolve() == Path(sys.prefix).resolve()


def reap(pids: list[int], timeout: float = 10) -> list[int]:
    """Wait up to ``timeout`` s for ``pids`` (processes the notebook's kernel started)
    to exit. Returns those that did not; they are killed, so nothing outlives the test."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive


# ----------------------------------------------------------------- the browser

# JS run in the page. JupyterLab exposes its application as window.jupyterapp
# (LabApp.expose_app_in_browser); the current widget is the notebook that was opened.
NOTEBOOK_JS = "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
KERNEL_READY_JS = """() => {
  const nb = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = nb && nb.sessionContext && nb.sessionContext.session && nb.sessionContext.session.kernel;
  if (document.querySelector('.jp-Dialog')) return 'dialog';
  return kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle' ? 'ready' : false;
}"""
RUN_ALL_JS = """() => {
  window.__runAll = { done: false, ok: null };
  window.jupyterapp.commands.execute('notebook:run-all-cells').then(
    (ok) => { window.__runAll = { done: true, ok: ok !== false }; },
    (err) => { window.__runAll = { done: true, ok: false, error: String(err) }; });
}"""
KERNEL_EXEC_JS = """async (code) => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const future = kernel.requestExecute({ code, silent: false, store_history: false });
  let out = '';
  future.onIOPub = (msg) => {
    if (msg.header.msg_type === 'stream') out += msg.content.text;
    if (msg.header.msg_type === 'error') out += msg.content.ename + ': ' + msg.content.evalue;
  };
  await future.done;
  return out;
}"""
# Data points drawn by plotly.js in the page: scatter markers, line vertices, bars.
PLOTLY_POINTS_JS = """() => {
  let n = 0;
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    const markers = plot.querySelectorAll('.scatterlayer .trace .points path').length;
    let vertices = 0;
    for (const line of plot.querySelectorAll('.scatterlayer .trace path.js-line')) {
      const d = line.getAttribute('d') || '';
      vertices += (d.match(/[ML]/g) || []).length;
    }
    const bars = plot.querySelectorAll('.barlayer .point path').length;
    n += Math.max(markers, vertices) + bars;
  }
  return n;
}"""
# The page's plotly figures, and for the only one: where its drawn SVG lies against
# its output area, the upper end of each x axis range, and the bars it draws.
FIGURE_FIT_JS = """() => {
  const plots = document.querySelectorAll('.js-plotly-plot');
  if (plots.length !== 1) return { plots: plots.length };
  const plot = plots[0];
  const svg = plot.querySelector('.main-svg').getBoundingClientRect();
  const area = plot.closest('.jp-OutputArea-output').getBoundingClientRect();
  const layout = plot._fullLayout;
  const axes = Object.keys(layout).filter((k) => /^xaxis[0-9]*$/.test(k)).sort();
  return {
    plots: 1,
    svg: { left: svg.left, right: svg.right, width: svg.width },
    area: { left: area.left, right: area.right, width: area.width },
    x_ends: axes.map((k) => layout[k].range[1]),
    bars: plot.querySelectorAll('.barlayer .point path').length,
  };
}"""
# The largest FigureWidget the kernel holds in its globals: total points of its traces.
KERNEL_FIGURE_POINTS = """
import plotly.graph_objects as _go
print("FIGURE_POINTS=%d" % max(
    (sum(len(getattr(t, "x", None) or ()) for t in _v.data)
     for _v in list(globals().values()) if isinstance(_v, _go.FigureWidget)),
    default=-1))
"""


@asynccontextmanager
async def chromium(
    tmp_path: Path, lab: JupyterLab
) -> AsyncIterator[tuple[Any, list[str], list[str]]]:
    """A Chromium context (fresh profile) that may only reach the JupyterLab server:
    any other request is aborted and listed (``blocked``); ``writes`` lists the
    requests that would change a file (saves)."""
    blocked: list[str] = []
    writes: list[str] = []
    async with playwright_api.async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            context.set_default_timeout(60_000)
            allowed = re.compile(rf"^(https?|wss?)://127\.0\.0\.1:{lab.port}/")

            async def guard(route: Any) -> None:
                request = route.request
                if request.method in ("PUT", "PATCH") and "/api/contents/" in request.url:
                    writes.append(f"{request.method} {request.url}")  # a save or a rename
                if allowed.match(request.url):
                    await route.continue_()
                else:
                    blocked.append(request.url)
                    await route.abort()

            await context.route("**/*", guard)
            yield context, blocked, writes
        finally:
            await context.close()


async def open_notebook(context: Any, lab: JupyterLab, path: str) -> Any:
    """Open ``path`` in JupyterLab and wait for its kernel (the venv's python) to be idle."""
    page = await context.new_page()
    await page.goto(f"{lab.base}/lab/tree/{path}?token={lab.token}")
    await page.wait_for_function(NOTEBOOK_JS)
    state = await (await page.wait_for_function(KERNEL_READY_JS)).json_value()
    if state == "dialog":  # the notebook names a kernel we do not have: take the default
        await page.locator(".jp-Dialog .jp-mod-accept").click()
        await page.wait_for_function(KERNEL_READY_JS.replace("'dialog'", "false"))
    name = await page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.kernelDisplayName"
    )
    assert name == KERNEL_DISPLAY_NAME
    prefix = await page.evaluate(KERNEL_EXEC_JS, "import sys; print(sys.prefix, end='')")
    assert is_this_venv(prefix), prefix
    return page


async def run_all_cells(page: Any, timeout_ms: float) -> None:
    await page.evaluate(RUN_ALL_JS)
    await page.wait_for_function("() => window.__runAll.done", timeout=timeout_ms)
    result = await page.evaluate("() => window.__runAll")
    if not result["ok"]:
        raise AssertionError(f"a cell failed:\n{await outputs(page)}")


async def outputs(page: Any) -> str:
    texts = await page.locator(".jp-OutputArea-output").all_inner_texts()
    return "\n".join(texts)


async def kernel_processes(page: Any) -> list[int]:
    """The kernel's pid and those of every process it started (e.g. a redis-server)."""
    out = await page.evaluate(
        KERNEL_EXEC_JS,
        "import os, psutil; print('PIDS=' + ','.join(str(p) for p in "
        "[os.getpid()] + [c.pid for c in psutil.Process().children(recursive=True)]))",
    )
    return [int(p) for p in _grab(r"PIDS=([\d,]+)", out).split(",")]


async def kernel_figure_points(page: Any) -> int:
    out = await page.evaluate(KERNEL_EXEC_JS, KERNEL_FIGURE_POINTS)
    m = re.search(r"FIGURE_POINTS=(-?\d+)", out)
    assert m, out
    return int(m.group(1))


# ---------------------------------------------------------------- the notebook


def _code(source: str) -> dict[str, Any]:
    return {
        "cell_type": "code",
        "execution_count": None,
        "id": secrets.token_hex(4),
        "metadata": {},
        "outputs": [],
        "source": source.strip("\n"),
    }


SMOKE_CELLS = [
    """
import os, sys
print(f"PREFIX={sys.prefix}")
print(f"KERNEL_PID={os.getpid()}")
""",
    """
from redisq_lab.stack import LocalStack

stack = LocalStack(namespace="nbsmoke")
workers = stack.add_workers(1, 2, run_time=0.01)
print(f"REDIS_PID={stack.redis.proc.pid}")
stack
""",
    """
import asyncio
import plotly.graph_objects as go

fig = go.FigureWidget(
    data=[go.Scatter(x=[], y=[], mode="lines+markers", name="completed")],
    layout=go.Layout(title="Completed jobs", height=320, margin=dict(l=40, r=10, t=40, b=30)),
)

async def feed(n=12):
    # submit one job at a time; after each result, add a point with the completed total
    async with stack.client("smoke") as client:
        for i in range(n):
            job_id = await client.submit("default", params={"i": i})
            await client.result(job_id, timeout=15)
            completed = stack.stats()["totals"]["completed"]
            with fig.batch_update():
                fig.data[0].x = (*fig.data[0].x, i + 1)
                fig.data[0].y = (*fig.data[0].y, completed)

task = asyncio.get_running_loop().create_task(feed())
fig
""",
    """
await asyncio.wait_for(task, 60)
print(f"POINTS={len(fig.data[0].x)}")
""",
    """
stack.close()
print("DONE")
""",
]


def smoke_notebook(path: Path) -> None:
    nb = {
        "cells": [_code(c) for c in SMOKE_CELLS],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb, indent=1))


def _grab(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the outputs:\n{text}"
    return m.group(1)


# ------------------------------------------------------------------------ tests


async def test_notebook_with_a_live_chart_runs_in_jupyterlab(tmp_path: Path) -> None:
    """Self-contained: a temp notebook starts a LocalStack with mock workers, submits
    jobs, and a task feeds a plotly FigureWidget that the page draws."""
    root = tmp_path / "root"
    root.mkdir()
    smoke_notebook(root / "smoke.ipynb")
    with jupyterlab(root, tmp_path) as lab:
        async with chromium(tmp_path, lab) as (context, blocked, writes):
            page = await open_notebook(context, lab, "smoke.ipynb")
            await run_all_cells(page, timeout_ms=75_000)
            text = await outputs(page)
            assert "DONE" in text, text
            points = int(_grab(r"POINTS=(\d+)", text))
            assert points == 12
            assert is_this_venv(_grab(r"PREFIX=(\S+)", text))
            kernel_pid = int(_grab(r"KERNEL_PID=(\d+)", text))
            redis_pid = int(_grab(r"REDIS_PID=(\d+)", text))
            # the chart in the page holds every point, and the kernel's figure agrees
            await page.wait_for_function(f"() => ({PLOTLY_POINTS_JS})() >= {points}")
            assert await kernel_figure_points(page) == points
            await expect(page.locator(".js-plotly-plot .gtitle")).to_have_text("Completed jobs")
            await page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "jupyterlab_smoke.png"))
            pids = await kernel_processes(page)
            assert kernel_pid in pids and redis_pid not in pids  # the notebook closed its stack
            assert blocked == [] and writes == []
        assert len(lab.api("GET", "/api/kernels")) == 1  # still running
    # the server, its kernel, and the redis-server the notebook started are all gone
    assert reap([*pids, redis_pid]) == []
    assert not (root / ".ipynb_checkpoints").exists()


async def test_mock_workers_dashboard_notebook_runs_in_jupyterlab(tmp_path: Path) -> None:
    """The repo's mock-workers dashboard, opened in JupyterLab rooted at the repo."""
    notebook = REPO / DASHBOARD
    if not notebook.exists():
        pytest.skip(f"{DASHBOARD} does not exist yet")
    with jupyterlab(REPO, tmp_path) as lab:
        async with chromium(tmp_path, lab) as (context, blocked, writes):
            page = await open_notebook(context, lab, DASHBOARD)
            await run_all_cells(page, timeout_ms=75_000)
            await page.wait_for_function(f"() => ({PLOTLY_POINTS_JS})() > 0")
            # the notebook stopped the dashboard: its last sample is the newest
            out = await page.evaluate(
                KERNEL_EXEC_JS, "print('NEWEST=%.6f' % dash.samples['elapsed_s'].iloc[-1])"
            )
            newest = float(_grab(r"NEWEST=([\d.]+)", out))
            # one figure (plotly.js loaded once), drawn within its output area and
            # filling it, every x axis ending at the newest sample, task bars drawn
            fits = (
                f"() => {{ const f = ({FIGURE_FIT_JS})(); return f.plots === 1"
                " && f.svg.right <= f.area.right + 1 && f.svg.width >= 0.9 * f.area.width"
                f" && f.x_ends.every((x) => Math.abs(x - {newest}) < 2e-3) && f.bars > 0; }}"
            )
            try:
                await page.wait_for_function(fits, timeout=15_000)
            except playwright_api.TimeoutError:
                raise AssertionError(await page.evaluate(FIGURE_FIT_JS)) from None
            fit = await page.evaluate(FIGURE_FIT_JS)
            assert len(fit["x_ends"]) == 5, fit
            await page.set_viewport_size({"width": 1400, "height": 1300})
            plot = page.locator(".js-plotly-plot").first
            await plot.scroll_into_view_if_needed()
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "jupyterlab_dashboard.png"))
            await plot.screenshot(path=str(ARTIFACTS / "jupyterlab_dashboard_figure.png"))
            pids = await kernel_processes(page)
            assert blocked == []
            assert writes == []  # opened and run, never saved
    # the kernel and whatever it started ended with the server
    assert reap(pids) == []
