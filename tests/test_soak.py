"""Soak: about a minute of steady load with churn, and memory that levels off.

A hub process on a private Redis runs a steady stream of jobs while clients,
mock GPU machines (some dropping jobs) and monitors come and go. Finished jobs
expire after 5 s (``REDISQ_RESULT_TTL_S``) and the event stream is capped at about
2,000 entries (``REDISQ_EVENTS_MAXLEN``), so Redis's ``used_memory`` and the hub's
resident memory (``VmRSS``) must level off: the second half's peak stays within
30 % of the first half's. Afterwards the hub holds exactly the live sockets, and
none once they are closed. A shorter in-process run checks the hub's registry
itself for leftovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis

from redisq_lab.client import QueueClient
from redisq_lab.mock_worker import MockWorker
from redisq_lab.redis_process import RedisProcess
from redisq_server import AsyncRedisService, EngineLimits, Settings
from redisq_server.main import Hub

from .helpers import invariant_violations, wait_for
from .peers import Peer
from .test_faults import LiveHub, ahealth

SOAK_S = 64.0
RATE = 150  # jobs per second
TTL_S = 5
EVENTS_MAXLEN = 2000
GROWTH = 1.30  # the second half's peak may exceed the first half's by at most 30 %


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def every(period: float, end: float, step: Callable[[], Awaitable[Any]]) -> int:
    """Run ``step`` every ``period`` seconds until ``end`` (monotonic): bounded in time
    and, through that, in count. Returns how many times it ran."""
    n = 0
    while time.monotonic() < end:
        started = time.monotonic()
        await step()
        n += 1
        await asyncio.sleep(max(0.0, min(period - (time.monotonic() - started), end - started)))
    return n


class Load:
    """The soak's moving parts, each a bounded loop."""

    def __init__(self, url: str, end: float) -> None:
        self.url = url
        self.end = end
        self.ids = itertools.count()
        self.submitted = 0
        self.clients = 0
        self.machines = 0
        self.monitors = 0
        self.stable: list[MockWorker] = []
        self.churning: list[MockWorker] = []
        self.monitor: Peer | None = None
        self._drains: set[asyncio.Task[None]] = set()

    async def clients_loop(self) -> None:
        """A new client id every 2 s; each submits at RATE jobs/s, then leaves."""
        while time.monotonic() < self.end:
            self.clients += 1
            async with QueueClient(self.url, f"soak-c{self.clients}") as qc:
                until = min(self.end, time.monotonic() + 2.0)

                async def batch(qc: QueueClient = qc) -> None:
                    jobs = [{"job_type": "t", "priority": next(self.ids) % 3} for _ in range(15)]
                    await qc.submit_many(jobs)
                    self.submitted += len(jobs)
                    qc.traces.clear()  # a long-lived client would not keep them either

                await every(15 / RATE, until, batch)

    async def workers_loop(self) -> None:
        """Every 3 s a machine (2 GPUs, 2 % of jobs dropped mid-run) leaves and a new
        one, with a new machine id, joins."""

        async def turn() -> None:
            if len(self.churning) >= 2:
                await self.churning.pop(0).stop()
            self.machines += 1
            w = MockWorker(
                f"soak-m{self.machines}",
                2,
                hub=self.url,
                job_types=["t"],
                run_time=("uniform", 0.002, 0.02),
                progress_steps=1,
                disconnect_rate=0.02,
                seed=self.machines,
            )
            await w.start()
            self.churning.append(w)

        await every(3.0, self.end, turn)

    async def monitors_loop(self) -> None:
        """Every 4 s a monitor connects, follows stats and events, and the previous
        one leaves (its frames are read in the background, as a dashboard would)."""

        async def turn() -> None:
            old = self.monitor
            self.monitors += 1
            m = await Peer.open(f"{self.url}/ws/monitor/soak-mon{self.monitors}")
            await m.request({"type": "subscribe_stats", "interval_ms": 200})
            await m.request({"type": "subscribe_events"})
            task = asyncio.create_task(_drain(m))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
            self.monitor = m
            if old is not None:
                await old.close()

        await every(4.0, self.end, turn)

    async def close(self) -> None:
        for w in [*self.stable, *self.churning]:
            await w.stop()
        if self.monitor is not None:
            await self.monitor.close()
        for t in list(self._drains):
            t.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)


async def _drain(peer: Peer) -> None:
    with contextlib.suppress(Exception):
        while True:
            await peer.ws.recv()


@pytest.mark.slow
async def test_soak_memory_levels_off(namespace: str) -> None:
    env = {
        "REDISQ_RESULT_TTL_S": str(TTL_S),
        "REDISQ_EVENTS_MAXLEN": str(EVENTS_MAXLEN),
        "REDISQ_MAX_LOST": "50",
        "REDISQ_LEASE_S": "5",
    }
    with RedisProcess() as rp:  # private: its used_memory is this test's alone
        hub = LiveHub(rp.url, namespace, env=env)
        r = aredis.Redis.from_url(rp.url, decode_responses=True)
        engine = AsyncRedisService(rp.url, limits=EngineLimits(namespace=namespace))
        start = time.monotonic()
        load = Load(hub.url, start + SOAK_S)
        samples: list[tuple[float, int, int, int, int]] = []

        async def sample() -> None:
            info = await r.info("memory")
            samples.append(
                (
                    time.monotonic() - start,
                    int(info["used_memory"]),
                    vm_rss_kb(hub.pid),
                    int(await r.dbsize()),
                    int(await r.xlen(engine.keys.events)),
                )
            )

        try:
            for i in range(2):
                w = MockWorker(
                    f"soak-stable{i}",
                    2,
                    hub=hub.url,
                    job_types=["t"],
                    run_time=("uniform", 0.002, 0.02),
                    progress_steps=1,
                    seed=100 + i,
                )
                load.stable.append(await w.start())
            await asyncio.wait_for(
                asyncio.gather(
                    load.clients_loop(),
                    load.workers_loop(),
                    load.monitors_loop(),
                    every(0.5, start + SOAK_S, sample),
                ),
                SOAK_S + 60,
            )
            assert load.submitted >= RATE * SOAK_S * 0.7, load.submitted
            assert load.clients >= 25 and load.machines >= 15 and load.monitors >= 12

            async def drained() -> bool:
                t = (await engine.get_stats())["totals"]
                return bool(t["completed"] == load.submitted)

            await wait_for(drained, 60, "every job to complete")
            stats = await engine.get_stats()
            assert stats["totals"]["failed"] == 0 and stats["queued"] == 0
            assert stats["totals"]["submitted"] == load.submitted

            half = SOAK_S / 2
            first = [s for s in samples if s[0] < half]
            second = [s for s in samples if s[0] >= half]
            assert len(first) > 40 and len(second) > 40
            for col, what in ((1, "Redis used_memory"), (2, "hub VmRSS"), (3, "Redis keys")):
                peak1 = max(s[col] for s in first)
                peak2 = max(s[col] for s in second)
                assert peak2 <= GROWTH * peak1, f"{what} grew: {peak1} -> {peak2}"
            # the stream stays near its cap (MAXLEN ~ trims whole nodes of 100 entries)
            assert max(s[4] for s in samples) <= EVENTS_MAXLEN + 200

            # the hub holds exactly the live sockets: 4 + 4 GPUs, 1 monitor, 0 clients
            live = {"clients": 0, "workers": 2 * (len(load.stable) + len(load.churning))}
            live["monitors"] = 1

            async def matches() -> bool:
                status, body = await ahealth(hub.port)
                return status == 200 and body["connections"] == live

            await wait_for(matches, 10, f"health to count exactly {live}")
            await load.close()

            async def none_left() -> bool:
                _, body = await ahealth(hub.port)
                return bool(body["connections"] == {"clients": 0, "workers": 0, "monitors": 0})

            await wait_for(none_left, 10, "no connections left")
            assert await invariant_violations(engine.redis, engine.keys) == []
            assert int(await r.zcard(engine.keys.workers)) == 0
            assert int(await r.zcard(engine.keys.leases)) == 0
            assert hub.alive
        finally:
            await load.close()
            assert hub.stop() == 0
            await r.aclose()
            await engine.aclose()
        assert "Traceback" not in hub.output()


async def test_churn_leaves_nothing_behind_in_the_hub(redis_url: str, namespace: str) -> None:
    """Clients, GPUs and monitors come and go (cleanly, abruptly, mid-job, with jobs
    still followed); afterwards the hub's registry is empty: no sockets, no job
    subscriptions, no handler tasks, and Redis holds no live worker or lease."""
    limits = EngineLimits(namespace=namespace, max_lost=50, backoff_base_s=0.01)
    async with Hub(Settings(redis_url=redis_url, hub_port=0, limits=limits)) as hub:
        for round_ in range(4):
            workers = [
                MockWorker(
                    f"churn{round_}-{i}",
                    2,
                    hub=hub,
                    job_types=["t"],
                    run_time=0.01,
                    disconnect_rate=0.1,
                    seed=i,
                )
                for i in range(3)
            ]
            for w in workers:
                await w.start()
            monitor = await Peer.open(f"{hub.url}/ws/monitor/mon{round_}")
            await monitor.request({"type": "subscribe_stats", "interval_ms": 50})
            await monitor.request({"type": "subscribe_events"})
            drain = asyncio.create_task(_drain(monitor))
            clients = [await QueueClient(hub, f"c{round_}-{i}").connect() for i in range(6)]
            for qc in clients:
                await qc.submit_many([{"job_type": "t"} for _ in range(20)])
            # a second socket of the first client follows some of its jobs
            follower = await QueueClient(hub, f"c{round_}-0").connect()
            for job_id in list(clients[0].traces)[:5]:
                await follower.subscribe(job_id)
            for i, qc in enumerate(clients):
                if i % 2 and qc.ws is not None:
                    qc.ws.transport.abort()  # gone without a close frame
                await qc.close()
            await follower.close()
            await monitor.close()
            drain.cancel()
            for w in workers:
                await w.stop()  # some mid-job: requeued, the next round runs them

        async def empty() -> bool:
            r = hub.registry
            return (
                r.count == 0
                and not r.clients
                and not r.workers
                and not r.monitors
                and not r.job_subs
                and not hub._handlers
            )

        await wait_for(empty, 10, "an empty registry")
        assert int(await hub.svc.redis.zcard(hub.svc.keys.workers)) == 0
        assert int(await hub.svc.redis.zcard(hub.svc.keys.leases)) == 0
        assert await invariant_violations(hub.svc.redis, hub.svc.keys) == []
