"""The live dashboard: its charts fill while jobs run, it stops cleanly, it stays
bounded, and it renders without a kernel (static HTML)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from redisq_lab import Dashboard, JobMonitor, LocalStack, RedisMonitor, WorkerMonitor
from redisq_lab.dashboard import MIN_INTERVAL, task_stream
from redisq_server import JobModel, JobStatus

from .helpers import wait_for, wait_sync

INTERVAL = 0.25


def _points(fig: Any, name: str | None = None) -> list[float]:
    """The y values of a figure's trace (the first one, or the one named ``name``)."""
    trace = fig.data[0] if name is None else next(t for t in fig.data if t.name == name)
    return [0.0 if v is None else float(v) for v in trace.y]


def _figure_widgets(widget: Any) -> list[Any]:
    """Every plotly FigureWidget in a widget tree (the widget itself and its children,
    recursively)."""
    import plotly.graph_objects as go

    found = [widget] if isinstance(widget, go.FigureWidget) else []
    for child in getattr(widget, "children", ()):
        found += _figure_widgets(child)
    return found


def _plotlyjs_copies(page: str) -> int:
    """How many copies of plotly.js a page inlines (each starts with its banner)."""
    import plotly.offline

    return page.count(f"* plotly.js v{plotly.offline.get_plotlyjs_version()}")


def _queued_points(dash: Dashboard) -> list[float]:
    """Queued jobs per sample, summed over the per-priority depth traces."""
    traces = dash.figures["depth"].data
    return [sum(float(t.y[i]) for t in traces) for i in range(len(traces[0].y))]


async def test_dashboard_updates_while_jobs_run_and_stops_cleanly() -> None:
    with LocalStack(namespace="dash") as stack:
        stack.add_workers(machines=1, gpus=2, run_time=0.05, progress_steps=1)
        dash = RedisMonitor(stack).dashboard(interval=INTERVAL, window=100)
        assert dash.task is not None and dash.running
        assert len(dash.samples) == 1  # the first sample is taken at once
        n_jobs = 80
        with stack.service() as svc:
            for i in range(n_jobs):
                svc.add_job(job_type="inference", priority=(0, 5, 10)[i % 3])

        async def charts_filled() -> bool:
            queued = _queued_points(dash) if dash.figures["depth"].data else []
            done = _points(dash.figures["throughput"], "completed/s")
            return (
                len(queued) >= 4
                and max(queued) > 0
                and len(done) >= 4
                and max(done) > 0
                and dash.samples["completed"].iloc[-1] == n_jobs
            )

        await wait_for(charts_filled, timeout=30, what="depth and throughput data points")
        assert {t.name for t in dash.figures["depth"].data} == {
            "priority 10",
            "priority 5",
            "priority 0",
        }
        assert len(_points(dash.figures["latency"], "p95")) == len(dash.samples)
        assert max(_points(dash.figures["workers"], "busy")) > 0
        samples = dash.samples
        assert samples["elapsed_s"].is_monotonic_increasing
        assert (samples["throughput_per_s"].dropna() >= 0).all()
        assert samples["total_p50"].dropna().gt(0).any()
        assert {"depth_p10", "depth_p5", "depth_p0"} <= set(samples.columns)
        newest = samples["elapsed_s"].iloc[-1]
        assert all(
            a.range[1] == pytest.approx(newest, abs=1e-3) for a in dash.figure.select_xaxes()
        )

        dash.stop()
        assert not dash.running
        task = dash.task
        await asyncio.wait({task}, timeout=5)
        assert task.done() and task.cancelled() and dash.error is None
        n = len(dash.samples)
        points = len(dash.figures["throughput"].data[0].y)
        await asyncio.sleep(3 * INTERVAL)  # would have sampled three times if alive
        assert len(dash.samples) == n
        assert len(dash.figures["throughput"].data[0].y) == points
        assert "stopped" in dash._repr_html_()
        dash.stop()  # idempotent
        dash.close()


async def test_dashboard_stops_and_says_why_when_redis_goes_away() -> None:
    stack = LocalStack(namespace="gone")
    try:
        dash = Dashboard(stack, interval=INTERVAL)
        assert dash.running
    finally:
        await asyncio.to_thread(stack.close)
    assert dash.task is not None
    await asyncio.wait({dash.task}, timeout=30)
    assert dash.task.done() and not dash.running
    assert dash.error is not None
    assert "stopped:" in dash._repr_html_()
    dash.close()


async def test_monitor_widgets_refresh_on_the_running_loop() -> None:
    with LocalStack(namespace="widgets") as stack:
        stack.add_workers(machines=1, gpus=1, run_time=0.01, progress_steps=1)
        widgets = [
            JobMonitor(stack).widget(interval=INTERVAL),
            WorkerMonitor(stack).widget(interval=INTERVAL),
            RedisMonitor(stack).widget(interval=INTERVAL),
        ]
        try:
            assert all(w.task is not None for w in widgets)
            assert "machine1:gpu0" in widgets[1].value
            assert "Queued" in widgets[2].value
            stack.submit("inference", priority=3)

            async def counted() -> bool:
                return re.search(r"Completed</td><td[^>]*>1<", widgets[2].value) is not None

            await wait_for(counted, timeout=10, what="the queue widget to show the job")
        finally:
            for w in widgets:
                w.stop()


async def test_the_x_axes_end_at_the_newest_sample_as_the_window_rolls() -> None:
    with LocalStack(namespace="xrange") as stack:
        dash = Dashboard(stack, interval=INTERVAL, window=4)
        try:

            async def rolled() -> bool:  # the first samples have left the window
                return bool(dash.samples["elapsed_s"].iloc[0] >= 2 * INTERVAL)

            await wait_for(rolled, timeout=10, what="the window to roll")
            elapsed = dash.samples["elapsed_s"]  # read between two samples
            ranges = [tuple(a.range) for a in dash.figure.select_xaxes()]
            assert len(ranges) == 5  # four time series and the task stream
            for low, high in ranges:
                assert high == pytest.approx(elapsed.iloc[-1], abs=1e-3)
                assert low == pytest.approx(elapsed.iloc[0], abs=1e-3)
            x = dash.figures["throughput"].data[0].x
            assert x[-1] == pytest.approx(elapsed.iloc[-1], abs=1e-3)
        finally:
            dash.close()


def test_the_task_stream_draws_a_job_on_the_row_of_its_gpu() -> None:
    """A completed job: its wait bar starts at its queued time and its run bar ends
    at its finished time (server clock, seconds since the first sample), both on the
    row of the worker that ran it; a running job's bar reaches the newest sample."""
    with LocalStack(namespace="stream") as stack:
        stack.add_workers(machines=1, gpus=2, run_time=0.05, progress_steps=1)
        dash = Dashboard(stack, start=False)
        with stack.service() as svc:
            job_id = stack.submit("inference", priority=4)

            def finished() -> Any:
                job = svc.get_job(job_id)
                return job if job is not None and job.status.value == "completed" else None

            job = wait_sync(finished, timeout=10, what="the job to complete")
            stack.submit("inference", priority=2, params={"duration_s": 30})  # still running
            wait_sync(lambda: svc.job_ids("active"), timeout=10, what="a job on a GPU")
            running = svc.get_jobs(svc.job_ids("active"))[0]
        try:
            wait_sync(
                lambda: (
                    running.job_id in dash.figures["tasks"].data[1].customdata
                    if dash.refresh()
                    else False
                ),
                timeout=10,
                what="the running job in the task stream",
            )
            samples = dash.samples
            t0 = samples["time"].iloc[0].timestamp() - samples["elapsed_s"].iloc[0]
            wait, run = dash.figures["tasks"].data
            assert all(t in dash.figure.data for t in (wait, run))
            i = list(wait.customdata).index(job_id)
            assert wait.y[i] == job.worker_id
            assert wait.base[i] == pytest.approx(job.queued - t0, abs=1e-3)
            assert wait.base[i] + wait.x[i] == pytest.approx(job.assigned - t0, abs=2e-3)
            i = list(run.customdata).index(job_id)
            assert run.y[i] == job.worker_id
            assert run.base[i] + run.x[i] == pytest.approx(job.finished - t0, abs=2e-3)
            assert run.base[i] < run.base[i] + run.x[i]
            i = list(run.customdata).index(running.job_id)
            assert run.y[i] == running.worker_id
            newest = samples["elapsed_s"].iloc[-1]
            assert run.base[i] + run.x[i] == pytest.approx(newest, abs=2e-3)
            rows = dash.figure.layout.yaxis5.categoryarray
            assert set(rows) == {"machine1:gpu0", "machine1:gpu1"}
        finally:
            dash.close()


def test_without_a_loop_refresh_by_hand_and_the_window_is_bounded() -> None:
    with LocalStack(namespace="script") as stack:
        dash = Dashboard(stack, interval=0.01, window=3)
        assert dash.task is None and not dash.running
        assert dash.interval == MIN_INTERVAL  # throttled
        stack.submit("inference", priority=7)
        for _ in range(5):
            dash.refresh()
        samples = dash.samples
        assert len(samples) == 3
        assert samples["depth_p7"].tolist() == [1, 1, 1]
        assert samples["elapsed_s"].is_monotonic_increasing
        assert len(dash.figures["depth"].data[0].y) == 3
        page = dash.to_html()
        assert page.startswith("<!doctype html>") and _plotlyjs_copies(page) == 1
        part = dash.to_html(include_plotlyjs=False, full_html=False)
        assert "Queue depth by priority" in part and _plotlyjs_copies(part) == 0
        assert "Task stream" in part
        static = dash._repr_html_()
        assert "<script" not in static and "Next in queue" in static
        dash.close()
        dash.close()


def test_one_figure_as_wide_as_its_output_area() -> None:
    """The four panels are one FigureWidget (plotly.js is sent to the page once) that
    takes the width of its output area, and every axis says its unit."""
    with LocalStack(namespace="onefig") as stack:
        dash = Dashboard(stack, start=False)
        try:
            figures = _figure_widgets(dash.widget)
            assert figures == [dash.figure]
            fig = dash.figure
            assert fig.layout.autosize is True and fig.layout.width is None
            boxes = [w for w in _boxes(dash.widget) if fig in getattr(w, "children", ())]
            assert [b.layout.width for b in boxes] == ["100%"]
            for key in ("depth", "throughput", "latency", "workers"):
                assert all(t in fig.data for t in dash.figures[key].data)
            x_titles = {a.title.text for a in fig.select_xaxes()}
            y_titles = {a.title.text for a in fig.select_yaxes()}
            assert x_titles == {"time since start (s, server clock)"}
            assert {"queued jobs", "jobs/s over the sample interval", "seconds", "GPUs"} <= (
                y_titles
            )
        finally:
            dash.close()


def _boxes(widget: Any) -> list[Any]:
    found = [widget]
    for child in getattr(widget, "children", ()):
        found += _boxes(child)
    return found


def test_rejects_a_bad_window_or_interval() -> None:
    with pytest.raises(ValueError, match="window"):
        Dashboard("redis://127.0.0.1:1/0", window=1)
    with pytest.raises(ValueError, match="interval"):
        Dashboard("redis://127.0.0.1:1/0", interval=float("nan"))


def test_the_task_stream_shows_a_job_held_ahead_as_waiting_until_its_gpu_takes_it() -> None:
    """Prefetch: a job its GPU holds ahead (``held``, ``assigned`` still that time)
    has a wait bar to now and no run bar beside the job running there; once it
    became the GPU's job (``assigned`` moved to the end of the one before) it waited
    from queued to then, and ran from then."""
    base = {"job_type": "t", "priority": 1, "params": {}, "worker_id": "m:gpu0"}
    running = JobModel(
        job_id="a", status=JobStatus.RUNNING, queued=0.0, assigned=1.0, started=1.0, **base
    )
    held = JobModel(
        job_id="b", status=JobStatus.ASSIGNED, queued=0.5, held=2.0, assigned=2.0, **base
    )
    (wait, run), rows = task_stream([running, held], t0=0.0, now=5.0, colour=lambda p: "#000")
    assert run["customdata"] == ["a"] and run["base"] == [1.0] and run["x"] == [4.0]
    i = wait["customdata"].index("b")
    assert (wait["base"][i], wait["x"][i]) == (0.5, 4.5)
    assert "held ahead" in wait["hovertext"][i]
    assert rows == ["m:gpu0"]

    took = JobModel(
        job_id="b",
        status=JobStatus.COMPLETED,
        queued=0.5,
        held=2.0,
        assigned=6.0,
        started=6.0,
        finished=7.0,
        **base,
    )
    (wait, run), _ = task_stream([took], t0=0.0, now=8.0, colour=lambda p: "#000")
    assert (wait["base"], wait["x"]) == ([0.5], [5.5])
    assert (run["base"], run["x"]) == ([6.0], [1.0])
    assert "4.000 s of it held" in wait["hovertext"][0]
