"""Two versions of the engine's function library, interleaved on one Redis.

A change to the Lua moves Redis' time per job by a few per cent, and this
machine's speed drifts by more than that from one run to the next. So both
versions run in one process against one redis-server, in alternating segments
of ``segment`` calls (base, this, this, base, ...): what the machine does to one,
it does to the other.

``base`` is another checkout of this project (say ``git worktree add /tmp/base
HEAD~3``); its library is built from its own ``lua/`` files and loaded beside this
one's. Both must take the same arguments (the same ``operations.py``): the calls
are built by this checkout. Measured per segment, from Redis' own counters
(``INFO commandstats`` and ``INFO cpu``):

* ``submit``: ``jobs`` submits with no worker registered (each one is queued);
* ``complete+claim``: 4 workers with a prefetch window of one per library, each
  registered by that library, complete the queued jobs, each completion taking the
  next job ahead (what a drain does);

and for each: microseconds inside ``FCALL`` per call, the commands a call runs
and Redis' process CPU (user + sys) per call. The medians over the segments are
compared. Two runs of one library against itself have read 0.96 to 1.03 here: a
ratio inside that says nothing. A part of the one runner, run only when given a
base::

    python -m benchmarks --only functions --peers none --base /tmp/base
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

from redisq_server import AsyncRedisService, EngineLimits
from redisq_server.operations import Op

JOB_TYPE = "fn"
WORKERS = 4


def base_library(checkout: Path) -> str:
    """The function library of the checkout at ``checkout``, built by its own code."""
    server = (checkout / "server").resolve()
    if not (server / "redisq_server" / "scripts.py").is_file():
        raise ValueError(f"{checkout}: no function library found under server/")
    code = "import redisq_server.scripts as s; print(s.__file__); print(s.library_source(), end='')"
    env = {**os.environ, "PYTHONPATH": str(server)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout
    where, source = out.split("\n", 1)
    if not Path(where).resolve().is_relative_to(server):  # e.g. an installed copy won
        raise ValueError(f"{checkout}: its library was not the one imported ({where})")
    return source


class _TwoLibraries(AsyncRedisService):
    """The engine, calling either its own library or the one named ``base``."""

    base = ""
    use_base = False

    def _call(self, op: Op[Any]) -> list[Any]:
        call = super()._call(op)
        if self.use_base:
            call[0] = f"{self.base}_{op.script}"
        return call

    def switch(self, use_base: bool) -> None:
        self.use_base = use_base
        self._prefixes.clear()  # the packed start of each FCALL names its function


def _side(turn: int) -> str:
    """Which library runs segment ``turn``: base, this, this, base, base, this...
    (each one first in every other pair, so neither always follows the other)."""
    return "base" if turn % 4 in (0, 3) else "this"


async def _counters(svc: AsyncRedisService) -> tuple[float, float, int, int]:
    """(process CPU s, us inside FCALL, FCALL calls, other commands so far)."""
    cpu = await svc.redis.info("cpu")
    stats = await svc.redis.info("commandstats")
    fcall = stats.get("cmdstat_fcall", {"usec": 0, "calls": 0})
    other = sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_fcall", "cmdstat_info"))
    return (
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        float(fcall["usec"]),
        int(fcall["calls"]),
        int(other),
    )


async def _report(svc: AsyncRedisService, queue: list[Any], budget: list[int]) -> None:
    """Complete a worker's jobs in ``queue``, in order (each report brings the jobs
    it is given next), while ``budget[0]``, shared by the workers, lasts."""
    while queue and budget[0] > 0:
        budget[0] -= 1
        a = queue.pop(0)
        r = await svc.complete_job(a.job_id, a.attempt, a.worker_id, {"ok": True})
        queue.extend(x for x in (r.next, r.ahead) if x is not None)


def _segment(before: tuple[float, float, int, int], after: tuple[float, float, int, int]) -> Any:
    calls = after[2] - before[2]
    if not calls:
        return None
    return {
        "fcall_us": (after[1] - before[1]) / calls,
        "commands": (after[3] - before[3]) / calls,
        "cpu_us": 1e6 * (after[0] - before[0]) / calls,
    }


async def compare(
    redis_url: str, base_source: str, jobs: int, segment: int
) -> dict[str, dict[str, Any]]:
    """Both libraries, ``segment`` calls at a time, alternating: per operation and
    library (``base``, ``this``), the segments and their medians."""
    svc = _TwoLibraries(redis_url, limits=EngineLimits(namespace=f"fn{time.time_ns()}"))
    segments: dict[str, dict[str, list[Any]]] = {
        op: {"base": [], "this": []} for op in ("submit", "complete+claim")
    }
    try:
        svc.base = base_source.split(maxsplit=2)[1].removeprefix("name=")
        await svc.redis.function_load(base_source, replace=True)
        await svc.submit_job(JOB_TYPE, 0, {})  # this library loaded too
        turn = 0
        submitted = 1
        while submitted < jobs:
            side = _side(turn)
            svc.switch(side == "base")
            n = min(segment, jobs - submitted)
            before = await _counters(svc)
            for _ in range(n):
                await svc.submit_job(JOB_TYPE, 0, {})
            segments["submit"][side].append(_segment(before, await _counters(svc)))
            submitted += n
            turn += 1
        # each library registers workers of its own: a change to what registration
        # writes (the worker's hash) is then measured too
        held: dict[str, list[list[Any]]] = {}
        for side in ("base", "this"):
            svc.switch(side == "base")
            first = [
                await svc.register_worker(
                    f"fn-{side}:gpu{i}", [JOB_TYPE], session=f"s{i}", prefetch=1
                )
                for i in range(WORKERS)
            ]
            held[side] = [[a] for a in first if a is not None]  # each worker's jobs, in order
        completed = 0
        while any(held["base"] + held["this"]):
            side = _side(turn)
            svc.switch(side == "base")
            budget = [segment]
            before = await _counters(svc)
            await asyncio.gather(*(_report(svc, q, budget) for q in held[side]))
            seg = _segment(before, await _counters(svc))
            completed += segment - budget[0]
            if seg is not None and segment - budget[0] >= segment // 2:  # not the tail
                segments["complete+claim"][side].append(seg)
            turn += 1
        if completed != jobs:
            raise RuntimeError(f"{completed} of {jobs} jobs completed")
    finally:
        await svc.aclose()
    out: dict[str, dict[str, Any]] = {}
    for op, sides in segments.items():
        out[op] = {}
        for side, segs in sides.items():
            segs = [s for s in segs if s is not None]
            medians = {k: median(s[k] for s in segs) for k in ("fcall_us", "commands", "cpu_us")}
            out[op][side] = {"segments": len(segs), **medians}
    return out


def lines(result: dict[str, Any]) -> list[str]:
    """The part's table: per operation, each library's medians and their ratio."""
    if "skipped" in result:
        return [f"Function libraries: skipped: {result['skipped']}"]
    rows = [
        "Function libraries, interleaved on one Redis (per call, medians of the segments;"
        " Redis' own counters)",
        "operation        library  segments  us in FCALL  commands  Redis CPU us",
    ]
    for op, sides in result.items():
        for side in ("base", "this"):
            r = sides[side]
            rows.append(
                f"{op:16s} {side:8s} {r['segments']:8d}  {r['fcall_us']:11.1f}"
                f"  {r['commands']:8.2f}  {r['cpu_us']:12.1f}"
            )
        ratio = sides["this"]["fcall_us"] / sides["base"]["fcall_us"]
        rows.append(f"{'':16s} this / base in FCALL: {ratio:.3f}")
    return rows
