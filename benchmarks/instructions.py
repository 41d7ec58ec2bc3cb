"""Redis' instructions per job, counted under callgrind: a measure the machine's noise
does not move.

Redis' CPU time per job moves by 30 % and more between runs on a shared 2-core VM,
far more than a change to the Lua is worth. ``valgrind --tool=callgrind`` counts the
instructions a process runs instead, which do not depend on how fast the machine is
at the moment. For each checkout measured (this one, and ``--base`` if given) a
redis-server runs under callgrind, counting only inside ``processInputBuffer``
(parsing the calls and running them: not the timers, which run more often the longer
the slow run takes), while one process drives N whole job lifecycles through that
checkout's engine (each job submitted, then completed by one of 8 workers, which
claims the next: the engine part's lifecycle) and then 2N in a fresh server. The
difference over N is the cost of a job; the fixed costs (loading the library,
registering) cancel out. Repeated counts differ by 1-2 % (how the calls fall into
pipelines, the hash seeds). Each is counted twice: workers without a prefetch
window, and with one (``prefetch=1``, as the drains run: each completion also takes
a job to hold ahead, and the job held becomes the worker's current one).

The driver is this module run with the checkout's ``server/`` first on the path, so
a base checkout runs its own engine and library through the same public calls. Part
of the one runner::

    python -m benchmarks --only instructions --peers none [--base /tmp/base]
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

JOB_TYPE = "cg"
WORKERS = 8
HERE = Path(__file__).resolve().parent


#: the prefetch windows counted: none, and one job held ahead
WINDOWS = (0, 1)


async def drive(url: str, jobs: int, prefetch: int = 0) -> None:
    """``jobs`` lifecycles through the engine at ``url``: the submits from ``WORKERS``
    coroutines, then ``WORKERS`` workers (with a ``prefetch`` window) completing
    them, each claiming the next and running the jobs it is given in order."""
    from redisq_server import AsyncRedisService, EngineLimits

    svc = AsyncRedisService(url, limits=EngineLimits(namespace="cg"))
    try:
        await svc.get_stats()  # the library is loaded before the counted calls

        async def submit(n: int) -> None:
            for _ in range(n):
                await svc.submit_job(JOB_TYPE, 0, {"n": 1})

        await asyncio.gather(
            *(submit(jobs // WORKERS + (i < jobs % WORKERS)) for i in range(WORKERS))
        )
        first = [
            await svc.register_worker(f"cg:gpu{i}", [JOB_TYPE], session=f"s{i}", prefetch=prefetch)
            for i in range(WORKERS)
        ]

        async def complete(a: Any) -> None:
            given = collections.deque([a] if a is not None else [])
            while given:
                a = given.popleft()
                done = await svc.complete_job(a.job_id, a.attempt, a.worker_id, {"ok": 1})
                given.extend(x for x in (done.next, done.ahead) if x is not None)

        await asyncio.gather(*(complete(a) for a in first))
        stats = await svc.get_stats()
        if stats["totals"]["completed"] != jobs:
            raise RuntimeError(f"expected {jobs} completions: {stats['totals']}")
    finally:
        await svc.aclose()


def _count(server: Path, jobs: int, redis_server: str, prefetch: int) -> int:
    """Instructions inside processInputBuffer while ``jobs`` lifecycles run through
    the engine in ``server`` (a checkout's ``server/`` directory), its workers with a
    ``prefetch`` window."""
    # imported here: the driver (this module run in a checkout's engine) needs no lab
    from redisq_lab.redis_process import RedisProcess

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        wrapper = (
            "valgrind",
            "--tool=callgrind",
            "--toggle-collect=processInputBuffer",
            f"--callgrind-out-file={out}",
        )
        rp = RedisProcess(executable=redis_server, wrapper=wrapper).start(timeout=120)
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(server), str(HERE.parent)))}
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.instructions",
                    str(server),
                    rp.url,
                    str(jobs),
                    str(prefetch),
                ],
                env=env,
                check=True,
            )
        finally:
            rp.stop()  # SIGTERM: the server exits and callgrind writes its counts
        return instructions_in(out)


def instructions_in(dump: Path) -> int:
    """The instruction count of one callgrind output file (its ``summary:`` line)."""
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"callgrind wrote no total in {dump}")


def per_job(server: Path, jobs: int, redis_server: str, prefetch: int = 0) -> float:
    """Instructions per job lifecycle: the count for 2 x ``jobs`` less that for
    ``jobs``, over ``jobs``."""
    one = _count(server, jobs, redis_server, prefetch)
    two = _count(server, 2 * jobs, redis_server, prefetch)
    return (two - one) / jobs


def measure(
    jobs: int, base: Path | None, repeats: int, windows: tuple[int, ...] = WINDOWS
) -> dict[str, Any]:
    """Per prefetch window in ``windows`` and per checkout (``this``, and ``base`` if
    given), ``repeats`` counts of Redis' instructions per job lifecycle, alternating
    the checkouts; or why it is skipped. ``per_job[window][side]``: the counts."""
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind is not installed (apt-get install valgrind)"}
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        return {"skipped": "no redis-server on the PATH"}
    sides = {"this": HERE.parent / "server"}
    if base is not None:
        sides["base"] = Path(base).resolve() / "server"
    counts: dict[int, dict[str, list[float]]] = {w: {side: [] for side in sides} for w in windows}
    for window in windows:
        for _ in range(repeats):
            for side, server in sides.items():
                counts[window][side].append(per_job(server, jobs, redis_server, window))
    return {"jobs": jobs, "workers": WORKERS, "per_job": counts}


def lines(result: dict[str, Any]) -> list[str]:
    """The part's table: per prefetch window, each checkout's counts and, with a
    base, the ratio."""
    if "skipped" in result:
        return [f"Redis instructions per job: skipped: {result['skipped']}"]
    rows = [
        "Redis instructions per job lifecycle, under callgrind (submit + complete+claim,"
        f" {result['workers']} workers; 2 x {result['jobs']:,} jobs less {result['jobs']:,})",
    ]
    for window, per_side in result["per_job"].items():
        rows.append(f"  prefetch window {window}" + (" (a job held ahead)" if int(window) else ""))
        rows += side_rows(per_side)
    return rows


def side_rows(per_side: dict[str, list[float]]) -> list[str]:
    """A table's rows for one measure: each checkout's mean and counts and, with a
    base, this checkout's mean over the base's."""
    rows, means = [], {}
    for side, counts in per_side.items():
        means[side] = sum(counts) / len(counts)
        shown = ", ".join(f"{c:,.0f}" for c in counts)
        rows.append(f"    {side:5s} {means[side]:9,.0f}  ({shown})")
    if "base" in means:
        rows.append(f"    this / base: {means['this'] / means['base']:.3f}")
    return rows


def _main(argv: list[str]) -> None:
    """The driver: ``python -m benchmarks.instructions SERVER_DIR REDIS_URL JOBS PREFETCH``."""
    server, url, jobs, prefetch = Path(argv[0]).resolve(), argv[1], int(argv[2]), int(argv[3])
    import redisq_server

    if not Path(redisq_server.__file__).resolve().is_relative_to(server):
        raise SystemExit(f"imported {redisq_server.__file__}, not the engine in {server}")
    asyncio.run(drive(url, jobs, prefetch))


if __name__ == "__main__":
    _main(sys.argv[1:])
