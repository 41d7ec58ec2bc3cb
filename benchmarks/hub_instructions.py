"""The hub's instructions per job, counted under callgrind: its Python cost, which the
machine's phase does not move.

The hub's CPU time per drained job has read from 0.068 to 0.245 ms on this 2-core VM
on different days, with the code unchanged; a change worth 5 % cannot be seen in it.
Here the hub (``python -m redisq_server`` from the checkout measured, on the event
loop it picks itself) runs under ``valgrind --tool=callgrind``, against a private
redis-server, while this process drives jobs through it over WebSockets.
``callgrind_control`` zeroes the counts once the sockets are set up and dumps them
after each part of the run, so each count covers whole jobs only (no start-up, no
imports, no shutdown):

- **one at a time**: a client socket submits a job and waits for its
  ``job_completed`` (and the worker for its ``ack``) before the next; one GPU socket
  completes each job as it is pushed. The idle path: two function calls, a push,
  ``job_accepted``, ``job_completed`` and an ``ack`` per job, each on its own.
- **a drain**: jobs queued through the client first, then four GPU sockets with a
  prefetch window of 1 complete them. Under callgrind the hub is by far the slowest
  process, so it always has work waiting: this is the hub saturated, as in the
  drain (it is busy all of the time there), with its batches as large as the four
  sockets allow.

Repeated parts differ by about 1 % (the loop's timers, which run by the wall clock:
the liveness sweep once a second, the stats). Part of the one runner::

    python -m benchmarks --only hub-instructions --peers none [--base /tmp/base]
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection

from benchmarks.common import (
    TIMEOUT_S,
    complete_frame,
    open_client,
    open_worker,
    submit_frame,
)
from benchmarks.instructions import instructions_in, side_rows
from redisq_lab.redis_process import RedisProcess
from redisq_server.protocol import MessageType

HERE = Path(__file__).resolve().parent
#: GPU sockets (each with a prefetch window of 1) of the drain
DRAIN_GPUS = 4
#: jobs run one at a time before the counts are zeroed (imports, caches, first calls)
WARMUP = 30


class _Hub:
    """The hub under callgrind: its url, and zeroing and dumping its counts."""

    def __init__(self, server: Path, redis_url: str, out: Path) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(server),
            "PYTHONHASHSEED": "0",
            "REDIS_URL": redis_url,
            "REDISQ_NAMESPACE": "hubcg",
            "LOG_LEVEL": "WARNING",
        }
        self.out = out
        self.log = out.with_suffix(".log").open("w")
        self.proc = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "redisq_server",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.url = ""
        self.dumps = 0

    async def started(self) -> str:
        """Wait for the hub's ``listening on`` line; its ws:// url."""
        assert self.proc.stdout is not None
        while not self.url:
            line = await asyncio.to_thread(self.proc.stdout.readline)
            if not line:
                raise RuntimeError("the hub under callgrind exited:\n" + self.log_tail())
            if "listening on ws://" in line:
                self.url = line.split("listening on ")[1].split()[0]
        return self.url

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` of the hub's stderr (valgrind's and the hub's)."""
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text().splitlines()[-lines:])

    async def _control(self, flag: str) -> None:
        await asyncio.to_thread(
            subprocess.run,
            ["callgrind_control", flag, str(self.proc.pid)],
            check=True,
            capture_output=True,
            timeout=TIMEOUT_S,
        )

    async def zero(self) -> None:
        await self._control("--zero")

    async def dump(self) -> Path:
        """Dump the counts since the last zero or dump; the file written."""
        await self._control("--dump")
        self.dumps += 1
        return self.out.with_name(f"{self.out.name}.{self.dumps}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class _Gpu:
    """One GPU socket completing its pushed jobs in order, as far as ``quota`` allows
    (the others wait here, in order); counts its acks into ``quota``. It reads on
    while its jobs wait: a frame never waits behind one."""

    def __init__(self, ws: ClientConnection, quota: _Quota) -> None:
        self.ws = ws
        self.quota = quota
        self.waiting: list[dict[str, Any]] = []
        quota.gpus.append(self)
        self.task = asyncio.create_task(self._serve())

    async def send_allowed(self) -> None:
        """Complete the jobs waiting here, in order, while the quota allows."""
        q = self.quota
        while self.waiting and q.sent < q.allowed:
            q.sent += 1
            await self.ws.send(complete_frame(self.waiting.pop(0), ack=True))

    async def _serve(self) -> None:
        q = self.quota
        async for raw in self.ws:
            m = json.loads(raw)
            if m["type"] == MessageType.JOB_ASSIGNED:
                self.waiting.append(m)
                await self.send_allowed()
            elif m["type"] == MessageType.ACK:
                q.acked += 1
                if q.acked >= q.allowed:
                    q.caught_up.set()
            elif m["type"] == MessageType.ERROR:
                raise RuntimeError(f"hub error: {m}")


@dataclass
class _Quota:
    """How many completions the GPU sockets may send, and have sent and had acked:
    what makes a part end with the hub idle, every job of it answered."""

    allowed: int = 0
    sent: int = 0
    acked: int = 0
    gpus: list[_Gpu] = field(default_factory=list)
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)

    async def grant(self, jobs: int) -> None:
        """Let ``jobs`` more completions go (those waiting leave now)."""
        self.allowed += jobs
        self.caught_up.clear()
        for gpu in self.gpus:
            await gpu.send_allowed()

    async def all_acked(self) -> None:
        """Return once every completion allowed is acked (raise if a socket stops)."""
        if self.acked >= self.allowed:
            return
        waiter = asyncio.create_task(self.caught_up.wait())
        done, _ = await asyncio.wait(
            [waiter, *(g.task for g in self.gpus)],
            timeout=TIMEOUT_S,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if waiter not in done:
            waiter.cancel()
            failed = [g.task for g in self.gpus if g.task.done()]
            raise RuntimeError(
                f"a GPU socket stopped: {failed[0].exception() if failed else 'timeout'}"
            )


async def _one_at_a_time(hub: _Hub, jobs: int, parts: int) -> list[int]:
    client = await open_client(hub.url, "hubcg")
    quota = _Quota()
    gpus = [_Gpu(await open_worker(hub.url, "hubcg:gpu0"), quota)]
    counts = []
    try:
        n = 0

        async def run(k: int) -> None:
            nonlocal n
            for _ in range(k):
                n += 1
                job_id = f"one-{n}"
                await quota.grant(1)
                await client.send(submit_frame(n, job_id))
                while True:
                    m = json.loads(await asyncio.wait_for(client.recv(), TIMEOUT_S))
                    if m["type"] == MessageType.JOB_COMPLETED and m["job_id"] == job_id:
                        break
                    if m["type"] == MessageType.ERROR:
                        raise RuntimeError(f"hub error: {m}")
                await quota.all_acked()

        await run(WARMUP)
        await hub.zero()
        for _ in range(parts):
            await run(jobs)
            counts.append(instructions_in(await hub.dump()))
    finally:
        for g in gpus:
            g.task.cancel()
            await g.ws.close()
        await client.close()
    return counts


async def _drain(hub: _Hub, jobs: int, parts: int) -> list[int]:
    client = await open_client(hub.url, "hubcg-drain")
    total = jobs * parts
    try:
        for i in range(total):
            await client.send(submit_frame(i, f"drain-{i}"))
        accepted = 0
        while accepted < total:
            m = json.loads(await asyncio.wait_for(client.recv(), TIMEOUT_S))
            if m["type"] == MessageType.JOB_ACCEPTED:
                accepted += 1
            elif m["type"] == MessageType.ERROR:
                raise RuntimeError(f"hub error: {m}")
    finally:
        await client.close()
    quota = _Quota()
    sockets = [await open_worker(hub.url, f"hubcg:gpu{i}", prefetch=1) for i in range(DRAIN_GPUS)]
    gpus = [_Gpu(ws, quota) for ws in sockets]
    counts = []
    try:
        await hub.zero()
        for _ in range(parts):
            await quota.grant(jobs)
            await quota.all_acked()
            counts.append(instructions_in(await hub.dump()))
    finally:
        for g in gpus:
            g.task.cancel()
            await g.ws.close()
    return counts


def count(server: Path, one_jobs: int, drain_jobs: int, parts: int) -> dict[str, list[float]]:
    """The hub of ``server`` (a checkout's ``server/`` directory) under callgrind:
    instructions per job in each of ``parts`` parts of ``one_jobs`` jobs one at a
    time, then of ``drain_jobs`` drained jobs."""
    with tempfile.TemporaryDirectory() as tmp, RedisProcess() as rp:
        hub = _Hub(server, rp.url, Path(tmp) / "hub.callgrind")

        async def drive() -> dict[str, list[float]]:
            await asyncio.wait_for(hub.started(), TIMEOUT_S)
            one = await _one_at_a_time(hub, one_jobs, parts)
            drain = await _drain(hub, drain_jobs, parts)
            return {
                "one_at_a_time": [c / one_jobs for c in one],
                "drain": [c / drain_jobs for c in drain],
            }

        try:
            return asyncio.run(drive())
        finally:
            hub.stop()


def measure(
    one_jobs: int, drain_jobs: int, parts: int, base: Path | None, repeats: int
) -> dict[str, Any]:
    """Per checkout (``this``, and ``base`` if given, alternating ``repeats`` times):
    the hub's instructions per job, one at a time and drained, a count per part; or
    why it is skipped."""
    missing = [t for t in ("valgrind", "callgrind_control") if shutil.which(t) is None]
    if missing:
        return {"skipped": f"{missing[0]} is not installed (apt-get install valgrind)"}
    sides = {"this": HERE.parent / "server"}
    if base is not None:
        sides["base"] = Path(base).resolve() / "server"
    per_side: dict[str, dict[str, list[float]]] = {
        side: {"one_at_a_time": [], "drain": []} for side in sides
    }
    for _ in range(repeats):
        for side, server in sides.items():
            for kind, counts in count(server, one_jobs, drain_jobs, parts).items():
                per_side[side][kind] += counts
    return {
        "one_jobs": one_jobs,
        "drain_jobs": drain_jobs,
        "gpus": DRAIN_GPUS,
        "per_job": per_side,
    }


def lines(result: dict[str, Any]) -> list[str]:
    """The part's table: per way of running jobs, each checkout's counts per part
    and, with a base, the ratio."""
    if "skipped" in result:
        return [f"Hub instructions per job: skipped: {result['skipped']}"]
    rows = [
        "Hub instructions per job, under callgrind (parts of "
        f"{result['one_jobs']:,} jobs one at a time, one GPU socket; of "
        f"{result['drain_jobs']:,} drained jobs, {result['gpus']} GPU sockets, window 1)",
    ]
    per_side = result["per_job"]
    for kind, title in (("one_at_a_time", "one at a time"), ("drain", "a drain")):
        rows.append(f"  {title}")
        rows += side_rows({side: kinds[kind] for side, kinds in per_side.items()})
    return rows
