"""Live dashboards of a redisq namespace, for notebooks.

    dash = RedisMonitor(stack).dashboard()   # or Dashboard(stack), Dashboard("redis://...")
    dash                                     # a cell's last line: charts and tables, live
    ...
    dash.samples                             # what it collected, as a DataFrame
    dash.stop()

A :class:`Dashboard` shows one plotly ``FigureWidget`` (so the page loads plotly.js
once) whose panels chart queue depth by priority, throughput, latency percentiles
and worker utilisation, and a task stream (a row per GPU, a bar per recent job: its
wait in the queue, then its run, coloured by priority), and a table of workers and
jobs. The figure is as wide as its output area; its time axes end at the newest
sample. It samples the namespace every ``interval`` seconds (at least
0.25 s) from a task on the running event loop (a Jupyter kernel has one): the
Redis reads run in a thread, the widgets are updated on the loop by setting
traits. It keeps the last ``window`` samples only. Without a running loop (a plain
script) call :meth:`Dashboard.refresh` by hand. Saved or exported notebooks get a
static fallback: :meth:`Dashboard.to_html` (the charts, plotly inlined) and
``_repr_html_`` (plain tables, no JavaScript).

:func:`task_stream_figure` draws the task stream of any jobs as a static figure
(the ``redisq demo`` report uses it).

Each monitor also has a small live table: ``JobMonitor.widget()``,
``WorkerMonitor.widget()`` and ``RedisMonitor.widget()`` (built here).
"""

from __future__ import annotations

import asyncio
import html
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
import pandas as pd

from redisq_server import JobModel, RedisService

from .connect import NamespaceReader, RedisTarget
from .frames import (
    depth_by_priority,
    job_spans,
    percentiles,
    server_time,
    workers_frame,
)

if TYPE_CHECKING:
    from .widgets import LiveHTML

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_WINDOW",
    "MIN_INTERVAL",
    "Dashboard",
    "QueueStatsReader",
    "jobs_widget",
    "queue_widget",
    "task_stream",
    "task_stream_figure",
    "workers_widget",
]

#: Seconds between samples unless told otherwise, and the least allowed.
DEFAULT_INTERVAL: Final = 1.0
MIN_INTERVAL: Final = 0.25
#: Samples kept (at one a second: the last five minutes).
DEFAULT_WINDOW: Final = 300

_COUNTERS: Final = ("submitted", "completed", "failed", "cancelled", "retried", "requeued")
_OTHER: Final = "other"
_FIG_HEIGHT: Final = 960
_TABLE_STYLE: Final = "border-collapse:collapse;font-size:12px;margin-right:1.5em"


def _interval(seconds: float) -> float:
    if not isinstance(seconds, int | float) or math.isnan(seconds):
        raise ValueError(f"interval: expected seconds, got {seconds!r}")
    return max(MIN_INTERVAL, float(seconds))


def _finite(value: Any) -> float | None:
    """A float for a chart (None where missing: NaN is not valid JSON)."""
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _latency(jobs: Sequence[JobModel]) -> dict[str, Any]:
    """``latency_n`` and p50/p95/p99 of the wait, run and total seconds of ``jobs``
    (see :func:`~redisq_lab.frames.job_spans`), as ``wait_p50``, ...; NaN when there
    are none."""
    out: dict[str, Any] = {"latency_n": len(jobs)}
    for name, spans in job_spans(jobs).items():
        kind = name.removesuffix("_s")
        for p, v in percentiles(spans).items():
            out[f"{kind}_{p}"] = math.nan if v is None else v
    return out


# ----------------------------------------------------------------- tables


def _esc(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return html.escape(str(value))


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], more: int = 0) -> str:
    head = "".join(f"<th style='text-align:left;padding:1px 6px'>{_esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td style='padding:1px 6px'>{_esc(v)}</td>" for v in row) + "</tr>"
        for row in rows
    )
    if not body:
        body = f"<tr><td colspan='{len(columns)}' style='padding:1px 6px'><i>none</i></td></tr>"
    tail = f"<div style='font-size:11px;color:#666'>... and {more} more</div>" if more > 0 else ""
    return (
        f"<div style='display:inline-block;vertical-align:top'><b>{_esc(title)}</b>"
        f"<table style='{_TABLE_STYLE}'><tr>{head}</tr>{body}</table>{tail}</div>"
    )


def _short(job_id: Any) -> str:
    return "" if job_id is None or job_id is pd.NA else str(job_id)[:8]


def _share(value: Any) -> str:
    f = _finite(value)
    return "" if f is None else f"{100 * f:.0f}%"


def workers_table(workers: pd.DataFrame, limit: int = 16) -> str:
    """An HTML table of the first ``limit`` rows of a worker frame (see
    :func:`~redisq_lab.frames.workers_frame`)."""
    rows = [
        (
            wid,
            r["status"],
            _short(r["current_job"]),
            r["jobs_done"],
            r["jobs_failed"],
            _share(r["busy_share"]),
        )
        for wid, r in workers.head(limit).iterrows()
    ]
    cols = ("worker", "status", "job", "done", "failed", "busy")
    return _table(f"Workers ({len(workers)})", cols, rows, len(workers) - limit)


def _job_rows(jobs: Sequence[JobModel], now: float) -> list[tuple[Any, ...]]:
    def age(j: JobModel) -> str:
        since = j.assigned if j.status.value in ("assigned", "running") else j.queued
        return "" if since is None else f"{max(0.0, now - since):.1f} s"

    return [
        (
            _short(j.job_id),
            j.job_type,
            j.priority,
            j.status.value,
            j.worker_id or "",
            j.attempt,
            "" if j.progress is None else f"{j.progress:.0f}%",
            age(j),
        )
        for j in jobs
    ]


_JOB_COLUMNS: Final = ("job", "type", "priority", "status", "worker", "attempt", "progress", "for")


def _jobs_html(service: RedisService, limit: int, now: float) -> str:
    """Active jobs (held by a worker or waiting to retry), then the next queued ones."""
    active = service.get_jobs(service.job_ids("active", limit))
    queued = service.get_jobs(service.job_ids("queued", limit))
    return _table("Active jobs", _JOB_COLUMNS, _job_rows(active, now)) + _table(
        "Next in queue", _JOB_COLUMNS, _job_rows(queued, now)
    )


def _workers_html(service: RedisService, limit: int, now: float) -> str:
    """The live workers (``now``: server time), as :func:`workers_table`."""
    return workers_table(workers_frame(service.get_workers(), now), limit)


class QueueStatsReader(Protocol):
    """What :func:`queue_widget` reads from: a
    :class:`~redisq_lab.monitors.RedisMonitor`, or anything with its
    ``get_queue_stats``."""

    def get_queue_stats(self, window_s: float = ..., sample: int = ...) -> dict[str, Any]: ...


def _queue_html(stats: Mapping[str, Any]) -> str:
    """A summary of a :meth:`QueueStatsReader.get_queue_stats` reply: depth,
    workers, rates."""
    lat = stats["latency"]

    def ms(d: Mapping[str, float | None]) -> str:
        return " / ".join("-" if v is None else f"{1000 * v:.0f}" for v in d.values())

    depth = ", ".join(f"p{p}: {n}" for p, n in stats["depth_by_priority"].items()) or "empty"
    rows = [
        ("Queued", f"{stats['queued']} ({depth})"),
        ("Running", stats["running"]),
        ("Retrying", stats["retrying"]),
        (
            "Workers",
            f"{stats['workers']} ({stats['workers_busy']} busy, {stats['workers_idle']} idle)",
        ),
        ("Throughput", f"{stats['throughput_per_s']:.1f} jobs/s (last {stats['window_s']:g} s)"),
        ("Wait p50/p95/p99", f"{ms(lat['wait_s'])} ms (last {lat['sample']} jobs)"),
        ("Run p50/p95/p99", f"{ms(lat['run_s'])} ms"),
        ("Completed", stats["totals"].get("completed", 0)),
        ("Failed", stats["totals"].get("failed", 0)),
    ]
    return _table(f"Queue {stats['namespace']}", ("", ""), rows)


def _live(render: Callable[[], str], interval: float) -> LiveHTML:
    from .widgets import LiveHTML

    return LiveHTML(render, _interval(interval))


def jobs_widget(
    monitor: NamespaceReader, interval: float = DEFAULT_INTERVAL, limit: int = 20
) -> Any:
    """A live HTML table of up to ``limit`` active jobs and the next ``limit`` queued
    ones, read through ``monitor.service`` (any monitor); ``.stop()`` it when done,
    before closing the monitor."""
    svc = monitor.service
    return _live(lambda: _jobs_html(svc, limit, server_time(svc)), interval)


def workers_widget(
    monitor: NamespaceReader, interval: float = DEFAULT_INTERVAL, limit: int = 32
) -> Any:
    """A live HTML table of the live workers (the first ``limit`` shown), read through
    ``monitor.service`` (any monitor); ``.stop()`` it when done, before closing the
    monitor."""
    svc = monitor.service
    return _live(lambda: _workers_html(svc, limit, server_time(svc)), interval)


def queue_widget(monitor: QueueStatsReader, interval: float = DEFAULT_INTERVAL) -> Any:
    """A live summary of ``monitor.get_queue_stats(sample=200)`` (a
    :class:`~redisq_lab.monitors.RedisMonitor`, say); ``.stop()`` it when done, before
    closing the monitor."""
    return _live(lambda: _queue_html(monitor.get_queue_stats(sample=200)), interval)


# -------------------------------------------------------------- dashboard


@dataclass
class _Snapshot:
    """One read of the namespace (taken in a thread, applied on the loop)."""

    stats: dict[str, Any]
    latency: dict[str, Any]
    table: str
    #: the jobs of the task stream (active ones first, then the newest finished)
    jobs: list[JobModel]
    #: the live workers' ids
    workers: list[str]


#: The time series panels of the dashboard's figure: key, title, y axis title, row,
#: column (the x axes are seconds since the first sample, by the server clock).
_PANELS: Final = (
    ("depth", "Queue depth by priority", "queued jobs", 1, 1),
    ("throughput", "Throughput", "jobs/s over the sample interval", 1, 2),
    ("latency", "Latency, submit to finish (recent jobs)", "seconds", 2, 1),
    ("workers", "Workers", "GPUs", 2, 2),
)
_X_TITLE: Final = "time since start (s, server clock)"
_TASKS_Y_TITLE: Final = "GPU (worker id)"
_TASKS_TITLE: Final = (
    "Task stream: recent jobs by GPU (thin hatched: waiting in the queue,"
    " solid: running; colour: priority)"
)
#: Priority colours (depth traces and task bars), in the order priorities are first
#: seen; priorities beyond ``max_priorities`` share the last one.
_PRIORITY_COLOURS: Final = (
    "#636efa",
    "#ef553b",
    "#00cc96",
    "#ab63fa",
    "#ffa15a",
    "#19d3f3",
    "#ff6692",
    "#b6e880",
    "#ff97ff",
    "#fecb52",
)
_OTHER_COLOUR: Final = "#999999"
_RUNNING: Final = frozenset({"assigned", "running"})
#: The two bar traces of the task stream (plotly ``Bar`` properties): a thin hatched
#: bar for the wait in the queue, a solid one for the run, overlaid on a GPU's row.
_TASK_BARS: Final[tuple[dict[str, Any], ...]] = (
    {
        "name": "waiting",
        "width": 0.2,
        "offset": -0.45,
        "marker": {"opacity": 0.6, "pattern": {"shape": "/", "solidity": 0.4}},
    },
    {
        "name": "running",
        "width": 0.6,
        "offset": -0.2,
        "marker": {"line": {"color": "white", "width": 1}},  # a gap between jobs
    },
)
_TASK_BAR_STYLE: Final[dict[str, Any]] = {
    "orientation": "h",
    "showlegend": False,
    "hoverinfo": "text",
}
_PLOT_LAYOUT: Final[dict[str, Any]] = {
    "autosize": True,  # the width follows the output area; no fixed width
    "height": _FIG_HEIGHT,
    "margin": {"l": 60, "r": 20, "t": 40, "b": 50},
    "uirevision": "keep",
    "template": "plotly_white",
    "font": {"size": 11},
}
_LEGEND: Final[dict[str, Any]] = {
    "orientation": "h",
    "xanchor": "left",
    "yanchor": "top",
    "bgcolor": "rgba(255,255,255,0.7)",
    "font": {"size": 10},
    "traceorder": "normal",
}


# ------------------------------------------------------------ task stream


def task_stream(
    jobs: Iterable[JobModel],
    t0: float,
    now: float,
    colour: Callable[[int], str],
    workers: Iterable[str] = (),
) -> tuple[list[dict[str, Any]], list[str]]:
    """The task stream's bars: per job on a worker, its wait (queued -> assigned) and
    its run (started, or assigned, -> finished, or -> ``now`` while it runs), on the
    row of its worker. Jobs never assigned a worker have no bar. A job its GPU holds
    ahead (prefetch window: ``held``, and ``assigned`` not yet moved past it) is
    still waiting for that GPU: a wait bar to ``now``, no run bar.

    Pass times as Unix seconds by the server clock (``t0``: the x axis' zero, ``now``:
    where a running job's bar ends) and ``colour(priority)``, a bar's colour.
    Returns ``([waiting, running], rows)``: two plotly ``Bar`` property dicts (``x``
    is a bar's length, ``base`` its start in seconds since ``t0``, ``customdata`` the
    job ids, ``hovertext`` a line per bar) and the rows, the worker ids of ``workers``
    and of the bars in reverse order (the y axis' ``categoryarray``: first at the top).
    """
    keys = ("y", "base", "x", "color", "id", "text")
    wait: dict[str, list[Any]] = {k: [] for k in keys}
    run: dict[str, list[Any]] = {k: [] for k in keys}

    def bar(to: dict[str, list[Any]], j: JobModel, start: float, end: float, what: str) -> None:
        b, e = round(start - t0, 3), round(end - t0, 3)
        to["y"].append(j.worker_id)
        to["base"].append(b)
        to["x"].append(round(e - b, 3))
        to["color"].append(colour(j.priority))
        to["id"].append(j.job_id)
        to["text"].append(
            f"job {_short(j.job_id)} ({j.job_type}, priority {j.priority}, {j.status.value})"
            f"<br>{what} {b:.2f} to {e:.2f} s ({e - b:.3f} s)"
        )

    for j in jobs:
        if j.worker_id is None:
            continue
        # in its GPU's window still: sent ahead, not yet that GPU's job
        held_now = j.held is not None and j.assigned == j.held and j.started is None
        if held_now and j.queued is not None and j.status.value in _RUNNING:
            bar(wait, j, j.queued, max(now, j.queued), "waiting (held ahead on its GPU)")
            continue
        if j.queued is not None and j.assigned is not None and j.assigned >= j.queued:
            held = "" if j.held is None else f" ({j.assigned - j.held:.3f} s of it held on its GPU)"
            bar(wait, j, j.queued, j.assigned, "waited" + held)
        start = j.started if j.started is not None else j.assigned
        end = j.finished if j.finished is not None else None
        if end is None and j.status.value in _RUNNING:
            end = max(now, start or now)
        if start is not None and end is not None and end >= start:
            bar(run, j, start, end, "ran")
    rows = sorted({*workers, *wait["y"], *run["y"]}, reverse=True)
    traces = [
        {
            **style,
            **_TASK_BAR_STYLE,
            "marker": {**style["marker"], "color": d["color"]},
            "y": d["y"],
            "base": d["base"],
            "x": d["x"],
            "customdata": d["id"],
            "hovertext": d["text"],
        }
        for style, d in zip(_TASK_BARS, (wait, run), strict=True)
    ]
    return traces, rows


def task_stream_figure(
    jobs: Sequence[JobModel],
    *,
    title: str = _TASKS_TITLE,
    t0: float | None = None,
    now: float | None = None,
    workers: Iterable[str] = (),
    max_priorities: int = 8,
) -> Any:
    """The task stream of ``jobs`` (see :func:`task_stream`) as a plotly ``Figure``,
    with a legend of the priority colours (highest first; priorities beyond
    ``max_priorities`` share one grey) and a height that fits its rows.

    ``t0`` (the x axis' zero) defaults to the earliest ``created`` and ``now`` (the
    x axis' end, and a running job's) to the latest stored time of ``jobs`` (Unix
    seconds, server clock); pass the same ``t0`` as other charts of the run so that
    their x axes agree."""
    import plotly.graph_objects as go

    times = [t for j in jobs for t in (j.created, j.queued, j.assigned, j.started, j.finished)]
    known = [t for t in times if t is not None]
    created = [j.created for j in jobs if j.created is not None]
    start = min(created or known or [0.0]) if t0 is None else t0
    end = max(known, default=start) if now is None else now
    named = sorted({j.priority for j in jobs}, reverse=True)[:max_priorities]

    def colour(priority: int) -> str:
        if priority not in named:
            return _OTHER_COLOUR
        return _PRIORITY_COLOURS[named.index(priority) % len(_PRIORITY_COLOURS)]

    traces, rows = task_stream(jobs, start, end, colour, workers)
    fig = go.Figure([go.Bar(**t) for t in traces])
    legend = [(f"priority {p}", colour(p)) for p in named]
    if len({j.priority for j in jobs}) > len(named):
        legend.append((_OTHER, _OTHER_COLOUR))
    for name, c in legend:  # legend entries only: a marker without a point
        fig.add_scatter(
            x=[None], y=[None], mode="markers", name=name, hoverinfo="skip",
            marker={"symbol": "square", "size": 10, "color": c},
        )  # fmt: skip
    fig.update_layout(
        title=title,
        barmode="overlay",
        height=max(320, 160 + 40 * len(rows)),
        margin={"l": 60, "r": 20, "t": 80, "b": 50},
        legend={"orientation": "h", "x": 0, "y": -0.18, "xanchor": "left", "yanchor": "top"},
    )
    # from t0 to now (an autorange pads the bars' ends)
    fig.update_xaxes(title_text=_X_TITLE, range=[0, round(max(end - start, 1e-3), 3)])
    fig.update_yaxes(
        title_text=_TASKS_Y_TITLE,
        type="category",
        categoryorder="array",
        categoryarray=rows,
        automargin=True,
    )
    return fig


class _Panel:
    """The traces of one panel of the dashboard's figure (``.data``, in the order
    they were added), so that callers can read a panel as they would a figure."""

    def __init__(self, figure: Any, indices: list[int]) -> None:
        self.figure = figure
        self.indices = indices

    @property
    def data(self) -> tuple[Any, ...]:
        return tuple(self.figure.data[i] for i in self.indices)

    def __repr__(self) -> str:
        return f"<panel of {len(self.indices)} traces>"


class Dashboard(NamespaceReader):
    """Live charts and tables of one namespace; see the module docstring.

    ``source`` is what a monitor accepts (a local stack, a Redis URL, ...) or a
    monitor (any :class:`~redisq_lab.connect.NamespaceReader`), whose connection the
    dashboard then shares; ``service=`` shares a service. ``interval`` is seconds
    between samples (at least 0.25), ``window`` the number of samples kept.
    Latency percentiles cover the ``latency_sample`` most recently completed jobs
    that finished in the last ``latency_window_s`` seconds. The task stream draws
    the ``stream_jobs`` most recent jobs (those on a GPU now, then the newest
    completed ones). ``start=False`` takes
    one sample and leaves refreshing to :meth:`refresh`. Call :meth:`stop` to end
    the refreshing, and :meth:`close` (or leave a ``with`` block) to also close a
    connection the dashboard opened.

    Attributes: ``figure`` (the one ``FigureWidget``), ``figures`` (``{"depth",
    "throughput", "latency", "workers", "tasks"}`` -> that panel's traces, as
    ``.data``; ``tasks`` holds the waiting and the running bars, ``customdata``
    their job ids),
    ``widget`` (the box to display), ``task`` (the refresh task,
    or None), ``error`` (what stopped it, if anything).
    """

    def __init__(
        self,
        source: str | RedisTarget | NamespaceReader | None = None,
        *,
        interval: float = DEFAULT_INTERVAL,
        window: int = DEFAULT_WINDOW,
        latency_sample: int = 200,
        latency_window_s: float = 30.0,
        stream_jobs: int = 200,
        table_rows: int = 8,
        max_priorities: int = 8,
        start: bool = True,
        service: RedisService | None = None,
        namespace: str | None = None,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window: expected an integer of at least 2, got {window!r}")
        self.interval = _interval(interval)
        if isinstance(source, NamespaceReader):
            if service is not None or namespace is not None:
                raise TypeError("pass a monitor, or service=/namespace=, not both")
            service = source.service
            source = None
        super().__init__(source, namespace=namespace, service=service)
        self.window = window
        self.latency_sample = latency_sample
        self.latency_window_s = float(latency_window_s)
        self.stream_jobs = stream_jobs
        self.table_rows = table_rows
        self.max_priorities = max_priorities
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        self._samples: deque[dict[str, Any]] = deque(maxlen=window)
        self._t0: float | None = None
        self._priorities: list[int] = []  # in the order first seen
        self._stream: tuple[list[JobModel], float, list[str]] = ([], 0.0, [])
        self._stopped = False
        self._build_widgets()
        self.refresh()
        from .widgets import running_loop  # ipywidgets: imported when first needed

        loop = running_loop() if start else None
        if loop is not None:
            self.task = loop.create_task(self._run(), name="redisq dashboard")

    @property
    def running(self) -> bool:
        """True while the refresh task is alive."""
        return self.task is not None and not self.task.done() and not self._stopped

    # ------------------------------------------------------------ sampling

    def _read(self) -> _Snapshot:
        """Read everything one sample needs (blocking; a few round trips)."""
        svc = self.service
        stats = svc.get_stats(self.interval)
        now = float(stats["time"])
        done = svc.get_jobs(svc.job_ids("completed", max(self.latency_sample, self.stream_jobs)))
        recent = [
            j
            for j in done[: self.latency_sample]
            if j.finished is not None and j.finished >= now - self.latency_window_s
        ]
        active = svc.get_jobs(svc.job_ids("active", self.stream_jobs))
        workers = svc.get_workers()
        table = workers_table(workers_frame(workers, now), 2 * self.table_rows) + _jobs_html(
            svc, self.table_rows, now
        )
        jobs = [*active, *done][: self.stream_jobs]
        return _Snapshot(stats, _latency(recent), table, jobs, [w.worker_id for w in workers])

    def refresh(self) -> dict[str, Any]:
        """Take one sample now and update the charts and tables; returns the sample.

        Blocks for the Redis reads (milliseconds). The background task calls this
        itself; call it by hand in a script, or for a final sample."""
        sample = self._apply(self._read())
        return sample if sample is not None else self._samples[-1]

    async def _run(self) -> None:
        try:
            while not self._stopped:
                await asyncio.sleep(self.interval)
                snap = await asyncio.to_thread(self._read)
                if self._stopped:
                    return
                self._apply(snap)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis gone, stack closed, ...: stop and say why
            self.error = exc
            self._stopped = True
            self._status()

    def _apply(self, snap: _Snapshot) -> dict[str, Any] | None:
        """Turn a snapshot into a sample, append it and redraw (on the caller's thread)."""
        s = snap.stats
        t = float(s["time"])
        prev = self._samples[-1] if self._samples else None
        if prev is not None and t <= prev["time"]:
            return None  # an older read finished late: drop it
        if self._t0 is None:
            self._t0 = t
        totals = s["totals"]
        sample: dict[str, Any] = {
            "time": t,
            "elapsed_s": t - self._t0,
            "queued": s["queued"],
            "running": s["running"],
            "retrying": s["retrying"],
            "workers": s["workers"],
            "workers_busy": s["workers_busy"],
            "workers_idle": s["workers_idle"],
            "utilisation": s["workers_busy"] / s["workers"] if s["workers"] else math.nan,
            **{name: int(totals.get(name, 0)) for name in _COUNTERS},
        }
        if prev is None:
            # no previous sample: completions over the last interval, by the server
            sample["throughput_per_s"] = float(s["throughput_per_s"])
            sample["submitted_per_s"] = math.nan
        else:
            dt = t - prev["time"]
            for name, rate in (("completed", "throughput_per_s"), ("submitted", "submitted_per_s")):
                delta = sample[name] - prev[name]
                sample[rate] = delta / dt if delta >= 0 else math.nan  # counters reset
        sample |= snap.latency
        sample["depth"] = depth_by_priority(s["job_types"])
        self._samples.append(sample)
        self._stream = (snap.jobs, t, snap.workers)
        self._redraw()
        self._table_text = self._table.value = snap.table
        self._status()
        return sample

    # ------------------------------------------------------------- display

    def _build_widgets(self) -> None:
        import ipywidgets
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        grid = make_subplots(
            rows=3,
            cols=2,
            specs=[[{}, {}], [{}, {}], [{"colspan": 2}, None]],
            subplot_titles=[*(title for _, title, *_ in _PANELS), _TASKS_TITLE],
            row_heights=[0.34, 0.34, 0.32],
            horizontal_spacing=0.09,
            vertical_spacing=0.1,
        )
        fig = self.figure = go.FigureWidget(grid)
        fig.update_layout(_PLOT_LAYOUT)
        fig.update_xaxes(title_text=_X_TITLE, matches="x")
        fig.update_yaxes(rangemode="tozero")
        # window resizes redraw at the new width (each sample also re-measures it)
        fig._config = {**fig._config, "responsive": True}
        traces: dict[str, list[dict[str, Any]]] = {
            "depth": [],
            "throughput": [
                {"name": "completed/s"},
                {"name": "submitted/s", "line": {"dash": "dot"}},
            ],
            "latency": [
                {"name": "p50"},
                {"name": "p95"},
                {"name": "p99"},
                {"name": "wait p50", "line": {"dash": "dot"}},
            ],
            "workers": [
                {"name": "busy", "stackgroup": "w", "line": {"color": "#2a7ab9"}},
                {"name": "idle", "stackgroup": "w", "line": {"color": "#b8c4ce"}},
            ],
        }
        self._legends: dict[str, str] = {}
        self.figures: dict[str, _Panel] = {}
        for n, (key, _, ytitle, row, col) in enumerate(_PANELS, start=1):
            suffix = "" if n == 1 else str(n)
            legend = self._legends[key] = f"legend{suffix}"
            xdomain = fig.layout[f"xaxis{suffix}"].domain
            ydomain = fig.layout[f"yaxis{suffix}"].domain
            fig.update_layout({legend: {**_LEGEND, "x": xdomain[0] + 0.005, "y": ydomain[1]}})
            fig.update_yaxes(title_text=ytitle, row=row, col=col)
            self.figures[key] = _Panel(fig, [])
            for tr in traces[key]:
                self._add_trace(key, tr)
        # the task stream: a row per GPU, a bar per job (waiting, then running)
        fig.update_yaxes(
            title_text=_TASKS_Y_TITLE,
            type="category",
            categoryorder="array",
            automargin=True,
            row=3,
            col=1,
        )
        for style in _TASK_BARS:
            fig.add_bar(**style, **_TASK_BAR_STYLE, row=3, col=1)
        self.figures["tasks"] = _Panel(fig, [len(fig.data) - 2, len(fig.data) - 1])
        fig.update_layout(barmode="overlay")
        self._status_html = ipywidgets.HTML()
        self._table = ipywidgets.HTML()
        self._status_text = self._table_text = ""
        chart = ipywidgets.VBox([fig], layout=ipywidgets.Layout(width="100%"))
        self.widget = ipywidgets.VBox(
            [self._status_html, chart, self._table], layout=ipywidgets.Layout(width="100%")
        )

    def _add_trace(self, key: str, trace: Mapping[str, Any]) -> Any:
        """Add a line to panel ``key`` (not inside a batch update: plotly forbids it)."""
        row, col = next((r, c) for k, _, _, r, c in _PANELS if k == key)
        fig = self.figure
        fig.add_scatter(
            x=[], y=[], mode="lines", legend=self._legends[key], row=row, col=col, **trace
        )
        self.figures[key].indices.append(len(fig.data) - 1)
        return fig.data[-1]

    def _depth_traces(self) -> list[tuple[str, int, Callable[[dict[int, int]], int]]]:
        """(name, legend rank, depth -> queued) per depth trace. The first
        ``max_priorities`` priorities seen keep their own trace (and colour) for
        good, ranked highest first in the legend; any others are summed."""

        def one(p: int) -> Callable[[dict[int, int]], int]:
            return lambda depth: depth.get(p, 0)

        def rest(keep: set[int]) -> Callable[[dict[int, int]], int]:
            return lambda depth: sum(n for p, n in depth.items() if p not in keep)

        named = self._priorities[: self.max_priorities]
        ranked = sorted(named, reverse=True)
        out = [(f"priority {p}", ranked.index(p) + 1, one(p)) for p in named]
        if len(self._priorities) > self.max_priorities:
            out.append((_OTHER, len(named) + 1, rest(set(named))))
        return out

    def _redraw(self) -> None:
        samples = list(self._samples)
        jobs, now, workers = self._stream
        seen = set(samples[-1]["depth"]) | {j.priority for j in jobs}
        self._priorities.extend(sorted(seen - set(self._priorities), reverse=True))
        wanted = self._depth_traces()
        while len(self.figures["depth"].indices) < len(wanted):
            self._add_trace("depth", {"stackgroup": "depth"})
        x = [round(s["elapsed_s"], 3) for s in samples]

        def col(name: str) -> list[float | None]:
            return [_finite(s[name]) for s in samples]

        series = {
            "throughput": [col("throughput_per_s"), col("submitted_per_s")],
            "latency": [col("total_p50"), col("total_p95"), col("total_p99"), col("wait_p50")],
            "workers": [col("workers_busy"), col("workers_idle")],
        }
        with self.figure.batch_update():  # one message to the page per sample
            depth = self.figures["depth"].data
            for trace, (name, rank, count) in zip(depth, wanted, strict=True):
                trace.name, trace.legendrank = name, rank
                trace.line.color = self._colour(name)
                trace.x, trace.y = x, [count(s["depth"]) for s in samples]
            for key, ys in series.items():
                for trace, y in zip(self.figures[key].data, ys, strict=True):
                    trace.x, trace.y = x, y
            self._draw_tasks(jobs, now, workers)
            # the window, ending at the newest sample (an autorange the page computed
            # once would stay behind); setting it each sample also re-measures the width
            self.figure.update_xaxes(range=self._x_range(x))

    def _colour(self, priority: int | str) -> str:
        """The colour of a priority (or of the depth trace named ``priority ...``)."""
        named = self._priorities[: self.max_priorities]
        if isinstance(priority, str):
            _, _, p = priority.partition(" ")
            priority = int(p) if p.lstrip("-").isdigit() else _OTHER
        if priority not in named:
            return _OTHER_COLOUR
        return _PRIORITY_COLOURS[named.index(priority) % len(_PRIORITY_COLOURS)]

    def _draw_tasks(self, jobs: Sequence[JobModel], now: float, workers: Sequence[str]) -> None:
        """The task stream (see :func:`task_stream`), in seconds since the first sample."""
        t0 = self._t0 if self._t0 is not None else now
        traces, rows = task_stream(jobs, t0, now, self._colour, workers)
        self.figure.update_yaxes(categoryarray=rows, row=3, col=1)
        for trace, d in zip(self.figures["tasks"].data, traces, strict=True):
            trace.y, trace.base, trace.x = d["y"], d["base"], d["x"]
            trace.marker.color = d["marker"]["color"]
            trace.customdata, trace.hovertext = d["customdata"], d["hovertext"]

    def _x_range(self, x: Sequence[float]) -> list[float]:
        """[max(0, newest - span), newest], ``span`` the time the kept samples cover
        (at least one interval, so that the first sample gets a range too)."""
        newest = x[-1]
        span = max(newest - x[0], self.interval)
        low = max(0.0, newest - span)
        return [low, max(newest, round(low + self.interval, 3))]

    def _state(self) -> str:
        if self.error is not None:
            return f"stopped: {type(self.error).__name__}: {self.error}"
        if self.running:
            return f"live, every {self.interval:g} s"
        return "stopped"

    def _status(self) -> None:
        last = self._samples[-1] if self._samples else None
        detail = ""
        if last is not None:
            detail = (
                f" &middot; {last['queued']} queued, {last['running']} running, "
                f"{last['completed']} completed, {last['failed']} failed"
            )
        self._status_text = self._status_html.value = (
            f"<b>redisq dashboard</b> &middot; namespace <code>{_esc(self.namespace)}</code>"
            f" &middot; {len(self._samples)} samples &middot; {_esc(self._state())}{detail}"
        )

    @property
    def samples(self) -> pd.DataFrame:
        """The samples kept, oldest first: ``time`` (UTC), ``elapsed_s``, ``queued``,
        ``running``, ``retrying``, worker counts and ``utilisation``, the counters
        since the namespace began (``submitted``, ``completed``, ...),
        ``throughput_per_s`` and ``submitted_per_s`` (since the previous sample),
        ``latency_n`` and ``{wait,run,total}_p{50,95,99}`` seconds, then one
        ``depth_p<priority>`` column per priority seen (queued jobs)."""
        rows = list(self._samples)
        frame = pd.DataFrame([{k: v for k, v in r.items() if k != "depth"} for r in rows])
        if frame.empty:
            return frame
        frame["time"] = pd.to_datetime(frame["time"], unit="s", utc=True)
        prios = sorted({p for r in rows for p in r["depth"]}, reverse=True)
        for p in prios:
            frame[f"depth_p{p}"] = np.array([r["depth"].get(p, 0) for r in rows], dtype="int64")
        return frame

    def to_html(self, include_plotlyjs: bool | str = True, full_html: bool = True) -> str:
        """The current charts and tables as static HTML. ``include_plotlyjs`` goes to
        plotly's ``to_html`` for the figure (``True`` inlines plotly.js once, so the
        page opens offline; ``False`` when the page already loads it)."""
        import plotly.graph_objects as go

        charts = go.Figure(self.figure).to_html(
            full_html=False, include_plotlyjs=include_plotlyjs, default_width="100%"
        )
        body = f"<div>{self._status_text}</div>{charts}<div>{self._table_text}</div>"
        if not full_html:
            return body
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>redisq dashboard {_esc(self.namespace)}</title></head><body>{body}</body></html>"
        )

    def _repr_html_(self) -> str:
        """A static fallback (where widgets do not render): the latest sample and the
        tables, without JavaScript."""
        last = self._samples[-1] if self._samples else {}
        keys = (
            "queued",
            "running",
            "workers_busy",
            "workers_idle",
            "completed",
            "failed",
            "throughput_per_s",
            "total_p50",
            "total_p95",
            "total_p99",
        )
        rows = [
            (k, f"{v:.3g}" if isinstance(v, float) else v) for k, v in last.items() if k in keys
        ]
        return (
            f"<div>{self._status_text}</div>"
            + _table("Latest sample", ("", ""), rows)
            + self._table_text
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"<Dashboard {self.namespace} {self._state()} samples={len(self._samples)}>"

    # ------------------------------------------------------------ stopping

    def stop(self) -> None:
        """Stop refreshing (the charts keep their data). Idempotent."""
        self._stopped = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._status()

    def close(self) -> None:
        """Stop, and close the connection unless it was shared. Idempotent."""
        self.stop()
        super().close()
