"""The main job, end to end: ``redisq demo`` (the README's first command).

Starts a local stack (private redis-server and hub), mock GPU machines, pushes a
mixed workload through real client sockets with a progress bar, prints a summary
(throughput, latency percentiles, wait by priority) and writes an HTML report with
the charts.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .load import LoadGenerator, summarize
from .stack import LocalStack

__all__ = ["progress_bar", "run_demo", "write_report"]

JOB_TYPES = {"image_generation": 5, "inference": 3, "training": 1}
PRIORITIES = {0: 6, 5: 3, 10: 1}
RUN_TIMES = {
    "image_generation": ("lognormal", 0.03, 0.5),
    "inference": ("exponential", 0.01),
    "training": ("uniform", 0.05, 0.15),
}


def progress_bar(stream: TextIO = sys.stderr, width: int = 40) -> Any:
    """A ``(done, total)`` callback drawing a one-line text progress bar."""
    last = [-1]

    def update(done: int, total: int) -> None:
        filled = width * done // max(total, 1)
        if filled == last[0] and done != total:
            return
        last[0] = filled
        end = "\n" if done == total else ""
        stream.write(f"\r  jobs [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")
        stream.flush()

    return update


def run_demo(
    machines: int = 2,
    gpus: int = 4,
    jobs: int = 2000,
    rate: float | None = None,
    report: Path | None = Path("reports/redisq-demo.html"),
    seed: int = 7,
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Run the demo and return its summary; see the module docstring."""
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
            concurrency=256,
            on_progress=progress_bar(),
        )
        print(
            f"submitting {jobs} jobs (types {list(JOB_TYPES)}, priorities {list(PRIORITIES)}) ...",
            file=out,
        )
        t0 = time.monotonic()
        rows = asyncio.run(gen.run_rows())
        elapsed = time.monotonic() - t0
        summary = summarize(rows, elapsed)
        with stack.service() as svc:
            summary["server"] = svc.get_stats()
    _print_summary(summary, out)
    if report is not None:
        write_report(rows, summary, report)
        summary["report"] = str(report)
        print(f"report: {report}", file=out)
    return summary


def _print_summary(s: dict[str, Any], out: TextIO) -> None:
    lat = s.get("latency_ms", {})
    print(
        f"\n{s['completed']}/{s['jobs']} jobs completed in {s['elapsed_s']:.2f} s "
        f"({s['throughput_per_s']:.0f} jobs/s)",
        file=out,
    )
    if lat:
        print(
            f"submit -> result latency: p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, "
            f"p99 {lat['p99']:.1f} ms",
            file=out,
        )
    print("wait for a GPU (submit -> assigned) by priority:", file=out)
    for prio, w in s["wait_by_priority_s"].items():
        print(
            f"  priority {prio:>3}: {w['jobs']:>5} jobs, median {w['median'] * 1000:8.1f} ms, "
            f"max {w['max'] * 1000:8.1f} ms",
            file=out,
        )


def write_report(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> Path:
    """Write a self-contained HTML report (plotly inlined: it opens offline)."""
    import pandas as pd
    import plotly.express as px

    df = pd.DataFrame(rows)
    df["total_ms"] = df["total_s"] * 1000
    df["wait_ms"] = df["assign_s"] * 1000
    t0 = df["submitted"].min()
    df["done_at_s"] = (df["finished"] - t0).round(1)
    per_s = df.groupby("done_at_s").size().rename("jobs").reset_index()
    figs = [
        px.line(per_s, x="done_at_s", y="jobs", title="Completions per 0.1 s"),
        px.box(
            df, x="priority", y="wait_ms", points=False, title="Wait for a GPU by priority (ms)"
        ),
        px.histogram(
            df, x="total_ms", color="job_type", nbins=60, title="Submit -> result latency (ms)"
        ),
    ]
    lat = summary.get("latency_ms", {})
    head = (
        f"<h1>redisq demo</h1><p>{summary['completed']}/{summary['jobs']} jobs in "
        f"{summary['elapsed_s']:.2f} s: {summary['throughput_per_s']:.0f} jobs/s"
        + (f"; latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms" if lat else "")
        + "</p>"
    )
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>redisq demo</title></head>"
        f"<body>{head}{''.join(parts)}</body></html>"
    )
    return path
