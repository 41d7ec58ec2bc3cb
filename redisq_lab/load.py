"""A load generator: a mixed workload submitted through real client sockets.

    gen = LoadGenerator(stack, n_jobs=500, rate=200.0,
                        job_types={"image_generation": 3, "inference": 1},
                        priorities={0: 8, 5: 2})
    df = await gen.run()          # one row per job, client-side timings in seconds

``rate=None`` submits as fast as the hub accepts (a closed loop with ``concurrency``
requests in flight); a number gives open-loop Poisson arrivals at that many jobs
per second. Each row has the job's type and priority, its outcome, and the
latencies seen by the submitting client: ``accept_s`` (submit -> job_accepted),
``assign_s`` (submit -> assigned), ``start_s`` (submit -> running) and
``total_s`` (submit -> final result).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from .client import JobFailed, JobTrace, QueueClient, progress_bar
from .frames import percentiles

__all__ = ["LoadGenerator", "summarize"]


def _weighted(spec: Mapping[Any, float] | None, default: Any) -> tuple[list[Any], list[float]]:
    if not spec:
        return [default], [1.0]
    return list(spec), [float(w) for w in spec.values()]


class LoadGenerator:
    """Submit ``n_jobs`` jobs drawn from ``job_types`` and ``priorities`` (value ->
    weight), wait for every outcome, and return per-job timings.

    ``params`` is a dict for every job or a function ``(rng, i) -> dict``.
    ``on_progress(done, total)`` is called as jobs finish; ``progress=True`` (or a
    label) shows a bar of finished jobs (``tqdm.auto``: a widget in a notebook, text
    on stderr elsewhere).
    """

    def __init__(
        self,
        source: Any,
        n_jobs: int = 100,
        *,
        rate: float | None = None,
        job_types: Mapping[str, float] | None = None,
        priorities: Mapping[int, float] | None = None,
        params: Mapping[str, Any] | Callable[[random.Random, int], Mapping[str, Any]] | None = None,
        max_attempts: int | None = None,
        concurrency: int = 64,
        clients: int = 1,
        seed: int | None = None,
        timeout: float = 600.0,
        on_progress: Callable[[int, int], None] | None = None,
        progress: bool | str = False,
    ) -> None:
        self.source = source
        self.n_jobs = n_jobs
        self.rate = rate
        self.types, self.type_weights = _weighted(job_types, "default")
        self.prios, self.prio_weights = _weighted(priorities, 0)
        self.params = params
        self.max_attempts = max_attempts
        self.concurrency = concurrency
        self.n_clients = clients
        self.rng = random.Random(seed)
        self.timeout = timeout
        self.on_progress = on_progress
        self.progress = progress
        self.traces: list[tuple[str, int, JobTrace]] = []
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def _spec(self, i: int) -> dict[str, Any]:
        p = self.params(self.rng, i) if callable(self.params) else (self.params or {})
        spec: dict[str, Any] = {
            "job_type": self.rng.choices(self.types, self.type_weights)[0],
            "priority": int(self.rng.choices(self.prios, self.prio_weights)[0]),
            "params": dict(p),
        }
        if self.max_attempts is not None:
            spec["max_attempts"] = self.max_attempts
        return spec

    async def run(self) -> Any:
        """Run the workload; returns a pandas DataFrame (see :meth:`rows`)."""
        import pandas as pd

        return pd.DataFrame(await self.run_rows())

    async def run_rows(self) -> list[dict[str, Any]]:
        """Run the workload; returns one dict per job."""
        specs = [self._spec(i) for i in range(self.n_jobs)]
        clients = [QueueClient(self.source, f"load-{i}") for i in range(self.n_clients)]
        for c in clients:
            await c.connect()
        done = 0
        sem = asyncio.Semaphore(self.concurrency)
        bar = progress_bar(self.n_jobs, self.progress, "finished") if self.progress else None

        async def one(i: int, spec: dict[str, Any]) -> None:
            nonlocal done
            client = clients[i % len(clients)]
            async with sem:
                job_id = await client.submit(**spec)
            self.traces.append((spec["job_type"], spec["priority"], client.traces[job_id]))
            with contextlib.suppress(JobFailed):  # recorded in the trace
                await client.result(job_id, timeout=self.timeout)
            done += 1
            if bar is not None:
                bar.update(1)
            if self.on_progress is not None:
                self.on_progress(done, self.n_jobs)

        self.started_at = time.monotonic()
        try:
            tasks = []
            for i, spec in enumerate(specs):
                if self.rate is not None and i:
                    await asyncio.sleep(self.rng.expovariate(self.rate))
                tasks.append(asyncio.create_task(one(i, spec)))
            await asyncio.gather(*tasks)
        finally:
            self.finished_at = time.monotonic()
            if bar is not None:
                bar.close()
            for c in clients:
                await c.close()
        return self.rows()

    def rows(self) -> list[dict[str, Any]]:
        """Per-job rows: type, priority, status and client-side latencies (s)."""
        out = []
        for job_type, priority, t in self.traces:
            row = t.as_row()
            sub = t.submitted or 0.0

            def since(x: float | None, sub: float = sub) -> float | None:
                return None if x is None else x - sub

            row.update(
                job_type=job_type,
                priority=priority,
                accept_s=since(t.accepted),
                assign_s=since(t.assigned),
                start_s=since(t.running),
                total_s=since(t.finished),
            )
            out.append(row)
        return out


def summarize(rows: list[dict[str, Any]], elapsed_s: float) -> dict[str, Any]:
    """Throughput, latency percentiles (ms) and per-priority wait for a run's rows.

    Pass the rows of :meth:`LoadGenerator.rows` and the run's wall time in seconds.
    ``latency_ms`` (``p50``/``p95``/``p99`` of ``total_s`` over completed jobs) is
    empty when no job completed."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if df.empty:
        return {"jobs": 0, "elapsed_s": elapsed_s, "throughput_per_s": 0.0}
    ok = df[df["status"] == "completed"]
    latency_ms = {
        p: math.nan if v is None else v * 1000 for p, v in percentiles(ok["total_s"]).items()
    }
    by_prio = (
        df.groupby("priority")["assign_s"]
        .agg(["count", "median", "max"])
        .sort_index(ascending=False)
    )
    return {
        "jobs": len(df),
        "completed": int((df["status"] == "completed").sum()),
        "failed": int((df["status"] == "failed").sum()),
        "elapsed_s": elapsed_s,
        "throughput_per_s": len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
        "latency_ms": latency_ms if len(ok) else {},
        "wait_by_priority_s": {
            int(str(p)): {
                "jobs": int(r["count"]),
                "median": float(r["median"]),
                "max": float(r["max"]),
            }
            for p, r in by_prio.iterrows()
        },
    }
