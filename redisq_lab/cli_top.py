"""``redisq top``: a live view of the queue, the GPUs per machine, throughput and
latency, refreshed in place. Importing this module registers it.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .cli_base import Monitors, cell, command, open_monitors, positive_float, positive_int
from .cli_read import machine_table
from .frames import policy_text

__all__ = ["TopView"]


def _top_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=positive_float, default=1.0, help="seconds between refreshes")
    p.add_argument(
        "--iterations",
        type=positive_int,
        help="stop after this many refreshes (default: until Ctrl-C)",
    )
    p.add_argument(
        "--window", type=positive_float, default=60.0, help="throughput window in seconds"
    )


class TopView:
    """What ``redisq top`` shows, read afresh by each :meth:`render` (one stats call
    with the latency sample, one read of the workers)."""

    def __init__(self, monitors: Monitors, window_s: float) -> None:
        self.m = monitors
        self.window_s = window_s
        self._last: tuple[float, int] | None = None  # (monotonic time, completed total)

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        stats = self.m.redis.get_queue_stats(window_s=self.window_s, sample=200)
        workers = self.m.workers.get_all_workers()
        now, done = time.monotonic(), int(stats["totals"]["completed"])
        rate_now = stats["throughput_per_s"]
        if self._last is not None and now > self._last[0]:
            rate_now = (done - self._last[1]) / (now - self._last[0])
        self._last = (now, done)

        head = Table.grid(padding=(0, 2))
        head.add_column(style="bold")
        head.add_column()
        head.add_row("redisq top", f"{stats['namespace']}  {cell(stats['time'])}  (Ctrl-C to quit)")
        head.add_row(
            "jobs",
            f"{stats['queued']} queued  {stats['running']} running  {stats['retrying']} retrying"
            f"  {stats['scheduled']} scheduled",
        )
        head.add_row("policy", policy_text(stats["policy"]))
        head.add_row(
            "workers",
            f"{stats['workers']} GPUs: {stats['workers_busy']} busy, {stats['workers_idle']} idle",
        )
        head.add_row(
            "throughput",
            f"{rate_now:.1f} jobs/s now, {stats['throughput_per_s']:.1f} jobs/s over "
            f"{stats['window_s']:.0f} s",
        )
        totals = [f"{k} {v}" for k, v in stats["totals"].items()]
        head.add_row("totals", "  ".join(totals[:3]))
        head.add_row("", "  ".join(totals[3:]))

        lat = stats["latency"]
        latency = Table(title=f"latency, s (last {lat['sample']} completed)", title_justify="left")
        latency.add_column("")
        for q in ("p50", "p95", "p99"):
            latency.add_column(q, justify="right")
        for key, label in (("wait_s", "wait for a GPU"), ("run_s", "run")):
            latency.add_row(label, *(cell(lat[key][q]) for q in ("p50", "p95", "p99")))

        queue = Table(title="queue", title_justify="left")
        queue.add_column("job type")
        queue.add_column("priority", justify="right")
        queue.add_column("queued", justify="right")
        for jt, t in sorted(stats["job_types"].items()):
            for priority, n in t["by_priority"].items():
                queue.add_row(jt, str(priority), str(n))
        if not queue.row_count:
            queue.add_row("-", "-", "0")

        machines = Table(title="workers by machine", title_justify="left")
        for col in ("machine", "GPUs", "busy", "idle", "done", "failed", "uptime s"):
            machines.add_column(col, justify="left" if col == "machine" else "right")
        if not workers.empty:
            per = machine_table(workers, self.m.workers.get_worker_stats("machine"))
            for r in per.reset_index().to_dict(orient="records"):
                counts = ("workers", "busy", "idle", "jobs_done", "jobs_failed")
                machines.add_row(
                    str(r["machine_id"]),
                    *(str(int(r[k])) for k in counts),
                    f"{r['uptime_s']:.0f}",
                )
        else:
            machines.add_row("-", "0", "0", "0", "-", "-", "-")
        return Group(head, "", queue, latency, machines)


@command(
    "top",
    "a live view of the queue, workers and throughput, refreshed in place",
    configure=_top_args,
    formats=False,
)
def _top(args: argparse.Namespace) -> int:
    """On a terminal the view refreshes in place (rich's Live); into a pipe or file
    each refresh is printed after the last, like ``top -b``. Ctrl-C quits (exit 0)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    n = 0
    try:
        with open_monitors(args) as m:
            view = TopView(m, args.window)
            if not console.is_terminal:
                while True:
                    console.print(view.render())
                    n += 1
                    if args.iterations and n >= args.iterations:
                        return 0
                    console.print()
                    time.sleep(args.interval)
            with Live(view.render(), console=console, auto_refresh=False) as live:
                n = 1
                while not args.iterations or n < args.iterations:
                    time.sleep(args.interval)
                    live.update(view.render(), refresh=True)
                    n += 1
    except KeyboardInterrupt:
        pass
    return 0
