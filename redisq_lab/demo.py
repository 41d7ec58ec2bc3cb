"""The main job, end to end: ``redisq demo`` (the README's first command).

Starts a local stack (private redis-server and hub), mock GPU machines, pushes a
mixed workload through real client sockets with a progress bar, prints a summary and
writes an HTML report with the charts, among them the dashboard's task stream (a row
per GPU, a bar per job).

The default workload offers more work than the GPUs can serve (every job is
submitted at once: about 12 s of work for the 8 GPUs), so a backlog builds and the
queue's strict priority shows: priority 10 waits least, then 5, then 0.

Clocks: the wait for a GPU is the queue's own (queued -> assigned, timestamps by the
Redis server's clock, read from the engine after the run); submit -> accepted (the
client's own submit backlog plus the hub's reply) and submit -> result are what the
submitting client measured.
"""

from __future__ import annotations

import asyncio
import html
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .frames import jobs_frame, percentiles
from .load import LoadGenerator
from .stack import LocalStack

if TYPE_CHECKING:
    import pandas as pd

    from redisq_server import JobModel

__all__ = ["print_summary", "progress_bar", "run_demo", "wait_by_priority", "write_report"]

JOB_TYPES = {"image_generation": 5, "inference": 3, "training": 1}
PRIORITIES = {0: 6, 5: 3, 10: 1}
#: per job type: (distribution, mean s, ...) as MockWorker's ``run_time`` takes them
RUN_TIMES: dict[str, tuple[Any, ...]] = {
    "image_generation": ("lognormal", 0.08, 0.5),
    "inference": ("exponential", 0.03),
    "training": ("uniform", 0.15, 0.35),
}
#: submissions in flight at once when ``rate`` is None
CONCURRENCY = 256
#: the most jobs the report's task stream draws (beyond: the first to start)
STREAM_JOBS = 2000

_WAIT_AXIS = "wait for a GPU (ms, server queued→assigned)"
_TIME_AXIS = "time since start (s, server clock)"
_TOTAL_AXIS = "submit → result (ms, client clock)"


def progress_bar(stream: TextIO | None = None, width: int = 40) -> Any:
    """A ``(done, total)`` callback drawing a one-line text progress bar (stderr)."""
    last = [-1]

    def update(done: int, total: int) -> None:
        out = sys.stderr if stream is None else stream
        filled = width * done // max(total, 1)
        if filled == last[0] and done != total:
            return
        last[0] = filled
        end = "\n" if done == total else ""
        out.write(f"\r  jobs [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")
        out.flush()

    return update


def _mean_run_time(spec: tuple[Any, ...]) -> float:
    """The mean seconds of a run-time distribution (see :data:`RUN_TIMES`)."""
    kind, *args = spec
    if kind == "uniform":
        return (float(args[0]) + float(args[1])) / 2
    return float(args[0])  # fixed, exponential and lognormal name the mean first


def _describe_run_time(spec: tuple[Any, ...]) -> str:
    """``lognormal(mean 80 ms, sigma 0.5)``, ``uniform(150-350 ms)`` and the like."""
    kind, *args = spec
    ms = [float(a) * 1000 for a in args]
    if kind == "uniform":
        return f"uniform({ms[0]:g}-{ms[1]:g} ms)"
    if kind == "lognormal":
        return f"lognormal(mean {ms[0]:g} ms, sigma {float(args[1]):g})"
    if kind == "fixed":
        return f"fixed({ms[0]:g} ms)"
    return f"{kind}(mean {ms[0]:g} ms)"


def _settings(machines: int, gpus: int, jobs: int, rate: float | None, seed: int) -> dict[str, Any]:
    """The run settings the summary and the report repeat."""
    weight = sum(JOB_TYPES.values())
    mean = sum(_mean_run_time(RUN_TIMES[t]) * w / weight for t, w in JOB_TYPES.items())
    return {
        "machines": machines,
        "gpus_per_machine": gpus,
        "gpus": machines * gpus,
        "jobs": jobs,
        "rate_per_s": rate,
        "submit": (
            f"all at once, up to {CONCURRENCY} submissions in flight"
            if rate is None
            else f"Poisson arrivals at {rate:g} jobs/s"
        ),
        "job_types": dict(JOB_TYPES),
        "priorities": {str(p): w for p, w in PRIORITIES.items()},
        "run_times": {t: _describe_run_time(RUN_TIMES[t]) for t in JOB_TYPES},
        "mean_run_time_s": mean,
        "gpu_capacity_per_s": machines * gpus / mean,
        "seed": seed,
    }


def _stored_jobs(stack: LocalStack, job_ids: list[str]) -> list[JobModel]:
    """The jobs ``job_ids`` as the engine stored them (times by the Redis server's
    clock; :func:`~redisq_lab.frames.jobs_frame` makes them a frame)."""
    with stack.service() as svc:
        return svc.get_jobs(job_ids)


def wait_by_priority(jobs: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per priority (highest first, as strings): p50/p95/p99 of the wait for a GPU
    in ms (the frame's ``wait_s``: queued -> assigned by the server's clock) and
    ``n``, the jobs with a wait."""
    out: dict[str, dict[str, Any]] = {}
    for prio in sorted(jobs["priority"].unique(), reverse=True):
        waits = jobs.loc[jobs["priority"] == prio, "wait_s"].dropna() * 1000
        out[str(int(prio))] = {**percentiles(waits.tolist()), "n": len(waits)}
    return out


def run_demo(
    machines: int = 2,
    gpus: int = 4,
    jobs: int = 1200,
    rate: float | None = None,
    report: Path | None = Path("reports/redisq-demo.html"),
    seed: int = 7,
    out: TextIO | None = None,
    *,
    on_finish: Callable[[LocalStack, pd.DataFrame], None] | None = None,
) -> dict[str, Any]:
    """Run the demo, print its progress and summary to ``out`` (default stdout; the
    progress bar goes to stderr) and return the summary.

    Summary keys: ``jobs``, ``completed``, ``failed``, ``elapsed_s``,
    ``throughput_per_s``, ``wait_ms_by_priority`` (server clock), ``submit_to_accept_ms``
    and ``total_ms`` (client clock), ``settings`` and ``report`` (the path, or None).
    ``on_finish(stack, jobs)`` is called with the stack and the demo's job frame
    after the run, before the stack closes.
    """
    out = sys.stdout if out is None else out
    settings = _settings(machines, gpus, jobs, rate, seed)
    print(f"starting a local stack with {machines} machines x {gpus} mock GPUs ...", file=out)
    with LocalStack(namespace="demo") as stack:
        print(f"  hub   {stack.hub_url}\n  redis {stack.redis_url}", file=out)
        stack.add_workers(
            machines=machines, gpus=gpus, run_time=RUN_TIMES, progress_steps=1, seed=seed
        )
        gen = LoadGenerator(
            stack,
            n_jobs=jobs,
            rate=rate,
            job_types=JOB_TYPES,
            priorities=PRIORITIES,
            seed=seed,
            concurrency=CONCURRENCY,
            on_progress=progress_bar(),
        )
        print(
            f"submitting {jobs} jobs ({settings['submit']}; types {list(JOB_TYPES)}, "
            f"priorities {list(PRIORITIES)}) ...",
            file=out,
        )
        t0 = time.monotonic()
        rows = asyncio.run(gen.run_rows())
        elapsed = time.monotonic() - t0
        stored = _stored_jobs(stack, [trace.job_id for _, _, trace in gen.traces])
        frame = jobs_frame(stored)
        if on_finish is not None:
            on_finish(stack, frame)
    ok = [r for r in rows if r["status"] == "completed"]
    summary: dict[str, Any] = {
        "jobs": len(rows),
        "completed": len(ok),
        "failed": sum(r["status"] == "failed" for r in rows),
        "elapsed_s": elapsed,
        "throughput_per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
        "wait_ms_by_priority": wait_by_priority(frame),
        "submit_to_accept_ms": percentiles(_ms_of(rows, "accept_s"), (50, 99)),
        "total_ms": percentiles(_ms_of(ok, "total_s")),
        "settings": settings,
        "report": None,
    }
    print_summary(summary, out)
    if report is not None:
        write_report(rows, frame, summary, report, stream=stored)
        summary["report"] = str(report)
        print(f"report: {report}", file=out)
    return summary


def _ms_of(rows: list[dict[str, Any]], key: str) -> list[float]:
    """``key`` (seconds) of every row that has it, in ms."""
    return [r[key] * 1000 for r in rows if r.get(key) is not None]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _settings_lines(s: Mapping[str, Any]) -> list[str]:
    capacity = s.get("gpu_capacity_per_s")
    cap = f", GPU capacity about {capacity:.0f} jobs/s" if capacity else ""
    return [
        f"{s['machines']} machines x {s['gpus_per_machine']} GPUs, {s['jobs']} jobs "
        f"({s['submit']}), seed {s['seed']}{cap}",
        "run times: " + ", ".join(f"{t} {d}" for t, d in s["run_times"].items()),
    ]


def print_summary(s: Mapping[str, Any], out: TextIO) -> None:
    """The summary as text (see :func:`run_demo` for its keys)."""
    print(
        f"\n{s['completed']}/{s['jobs']} jobs completed in {s['elapsed_s']:.2f} s "
        f"({s['throughput_per_s']:.0f} jobs/s)",
        file=out,
    )
    for line in _settings_lines(s["settings"]):
        print(f"  {line}", file=out)
    print("wait for a GPU by priority (ms, server clock: queued -> assigned):", file=out)
    for prio, w in s["wait_ms_by_priority"].items():
        print(
            f"  priority {prio:>3}: {w['n']:>5} jobs   p50 {_ms(w['p50']):>8}   "
            f"p95 {_ms(w['p95']):>8}   p99 {_ms(w['p99']):>8}",
            file=out,
        )
    acc, tot = s["submit_to_accept_ms"], s["total_ms"]
    print(
        f"submit -> accepted by the hub (ms, client clock; the client's submit backlog): "
        f"p50 {_ms(acc['p50'])}, p99 {_ms(acc['p99'])}",
        file=out,
    )
    print(
        f"submit -> result (ms, client clock): p50 {_ms(tot['p50'])}, "
        f"p95 {_ms(tot['p95'])}, p99 {_ms(tot['p99'])}",
        file=out,
    )


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _waiting_over_time(jobs: pd.DataFrame, t0: pd.Timestamp) -> pd.DataFrame:
    """Jobs queued and not yet assigned, per priority, at every queue change."""
    import pandas as pd

    parts = []
    for prio in sorted(jobs["priority"].unique(), reverse=True):
        j = jobs[jobs["priority"] == prio]
        steps = pd.concat(
            [
                pd.Series(1, index=(j["queued"] - t0).dt.total_seconds()),
                pd.Series(-1, index=(j["assigned"].dropna() - t0).dt.total_seconds()),
            ]
        ).sort_index()
        parts.append(
            pd.DataFrame(
                {"t": [0.0, *steps.index], "waiting": [0, *steps.cumsum()], "priority": str(prio)}
            )
        )
    return pd.concat(parts, ignore_index=True)


def _stream_window(jobs: Sequence[JobModel], limit: int) -> tuple[list[JobModel], str]:
    """The jobs the task stream draws (all of them, or the first ``limit`` to start
    by the server clock) and a chart title that says which."""
    ran = [j for j in jobs if j.worker_id is not None]
    shown = f"all {len(ran):,}"
    if len(ran) > limit:
        shown = f"the first {limit:,} to start of {len(ran):,}"
        ran = sorted(ran, key=lambda j: j.started or j.assigned or math.inf)[:limit]
    title = (
        f"Task stream: {shown} jobs by GPU (server clock)<br><sup>thin hatched: waiting"
        " in the queue (queued → assigned), solid: running; colour: priority</sup>"
    )
    return ran, title


def write_report(
    rows: list[dict[str, Any]],
    jobs: pd.DataFrame,
    summary: Mapping[str, Any],
    path: Path,
    *,
    stream: Sequence[JobModel] = (),
) -> Path:
    """Write a self-contained HTML report (plotly.js inlined once: it opens offline).

    ``rows`` are the load generator's per-job rows (client clock), ``jobs`` the
    engine's job frame (server clock), ``summary`` what :func:`run_demo` returns.
    ``stream``, the same jobs as the engine stored them, adds the task stream (a row
    per GPU, a bar per job; at most :data:`STREAM_JOBS` jobs, the first to start)."""
    import pandas as pd
    import plotly.express as px

    from .dashboard import task_stream_figure

    order = {"priority": list(summary["wait_ms_by_priority"])}
    t0 = jobs["created"].min()
    srv = pd.DataFrame(
        {
            "priority": jobs["priority"].astype(str),
            "wait_ms": jobs["wait_s"] * 1000,
            "finished_s": (jobs["finished"] - t0).dt.total_seconds(),
        }
    )
    last = srv["finished_s"].max()
    span = 0.0 if pd.isna(last) else float(last)
    bin_s = max(0.1, round(span / 60, 1))
    done = (
        (srv["finished_s"] // bin_s * bin_s)
        .value_counts()
        .sort_index()
        .rename_axis("t")
        .reset_index(name="n")
    )
    done["per_s"] = done["n"] / bin_s
    client = pd.DataFrame(rows)
    client["total_ms"] = client["total_s"] * 1000
    height = 400
    figs = [
        px.line(
            _waiting_over_time(jobs, t0),
            x="t",
            y="waiting",
            color="priority",
            line_shape="hv",
            category_orders=order,
            title="Jobs waiting for a GPU, by priority (the backlog the GPUs work through)",
            labels={"t": _TIME_AXIS, "waiting": "jobs waiting (queued, not yet assigned)"},
            height=height,
        ),
        px.bar(
            done,
            x="t",
            y="per_s",
            title=f"Jobs finished per second ({bin_s:g} s bins, server clock)",
            labels={"t": _TIME_AXIS, "per_s": "jobs finished per second"},
            height=height,
        ),
        px.box(
            srv,
            x="priority",
            y="wait_ms",
            color="priority",
            points=False,
            log_y=True,
            category_orders=order,
            title="Wait for a GPU by priority (server clock, log scale)",
            labels={"priority": "priority (higher goes first)", "wait_ms": _WAIT_AXIS},
            height=height,
        ).update_layout(showlegend=False),
        px.histogram(
            client,
            x="total_ms",
            color="job_type",
            nbins=60,
            title="Submit → result, by job type (client clock)",
            labels={"total_ms": _TOTAL_AXIS, "job_type": "job type"},
            height=height,
        ).update_layout(yaxis_title="jobs"),
    ]
    if stream:
        shown, title = _stream_window(stream, STREAM_JOBS)
        figs.append(task_stream_figure(shown, title=title, t0=t0.timestamp()))
    waits = _table(
        ["priority", "jobs", "p50 ms", "p95 ms", "p99 ms"],
        [
            [p, w["n"], _ms(w["p50"]), _ms(w["p95"]), _ms(w["p99"])]
            for p, w in summary["wait_ms_by_priority"].items()
        ],
    )
    acc, tot = summary["submit_to_accept_ms"], summary["total_ms"]
    client_table = _table(
        ["measure (client clock)", "p50 ms", "p95 ms", "p99 ms"],
        [
            ["submit → accepted by the hub (client submit backlog)", _ms(acc["p50"]), "-", _ms(acc["p99"])],
            ["submit → result", _ms(tot["p50"]), _ms(tot["p95"]), _ms(tot["p99"])],
        ],
    )  # fmt: skip
    settings = "".join(
        f"<li>{html.escape(line)}</li>" for line in _settings_lines(summary["settings"])
    )
    head = (
        f"<h1>redisq demo</h1><p>{summary['completed']}/{summary['jobs']} jobs completed in "
        f"{summary['elapsed_s']:.2f} s: {summary['throughput_per_s']:.0f} jobs/s.</p>"
        f"<h2>Settings</h2><ul>{settings}</ul>"
        "<h2>Wait for a GPU by priority</h2>"
        "<p>Queued → assigned, by the Redis server's clock (the queue's own timestamps).</p>"
        f"{waits}<h2>Client-side latencies</h2>{client_table}"
    )
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}"
        "th,td{border:1px solid #ccc;padding:.25em .75em;text-align:right}"
        "th:first-child,td:first-child{text-align:left}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>redisq demo</title>"
        f"<style>{style}</style></head><body>{head}{''.join(parts)}</body></html>"
    )
    return path
