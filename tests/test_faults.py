"""Faults under load, with real processes and real signals: nothing accepted is lost.

- a hub killed with SIGKILL in the middle of a 5,000-job load, restarted on the same
  port (mock GPUs and clients reconnect by themselves);
- a hub killed with SIGKILL whose workers never come back: another hub's reaper
  reclaims what the dead hub held once the lease runs out;
- workers dropping their sockets at random mid-job;
- Redis restarted (clean SIGTERM, and SIGKILL) with the append-only file on, under the
  same running hub;
- Redis stalled (SIGSTOP) past the hub's call timeout: a completion it runs late
  still reaches the client, and a submit answered ``unavailable`` can be sent again;
- a client that loses its socket (and its hub) catches up with ``get_events``;
- where a retried or requeued job goes back in its queue;
- and the limit: a Redis without persistence restarts empty (the hub recovers).

"Accepted" means the client received ``job_accepted`` (a resend of the same ``job_id``
is answered with the stored job's state). Every check counts ``completed``
entries per job in the event stream, so the stream is sized to hold them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from redisq_lab.client import JobFailed, QueueClient, RequestError
from redisq_lab.mock_worker import MockWorker
from redisq_lab.redis_process import RedisProcess, free_port
from redisq_server import AsyncRedisService, EngineLimits, Event, JobStatus
from redisq_server.main import Hub
from redisq_server.protocol import MessageType

from .helpers import hub_settings, invariant_violations, wait_for, wait_running, wait_sync
from .peers import Peer, open_worker
from .test_hub_process import HubProcess

BIG_STREAM = "1000000"  # REDISQ_EVENTS_MAXLEN: every event of these tests stays readable

# --------------------------------------------------------------------------- helpers


class LiveHub(HubProcess):
    """:class:`HubProcess` (its output is read in the background, so a chatty hub
    never blocks on a full pipe) started with extra environment variables."""

    def __init__(
        self,
        redis_url: str,
        namespace: str,
        *args: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in (env or {}).items():
                mp.setenv(key, value)
            super().__init__(redis_url, namespace, *args)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return "".join(self.lines)


def health(port: int, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """``GET /health`` of a hub on loopback: (HTTP status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


async def ahealth(port: int) -> tuple[int, dict[str, Any]]:
    return await asyncio.get_running_loop().run_in_executor(None, health, port)


CONNECTION_ERRORS = (OSError, ConnectionError, ConnectionClosed, InvalidHandshake, TimeoutError)


class Submitter:
    """Submits a fixed list of job ids through one client socket, reconnecting when
    the socket or the hub goes away and resending what was not acknowledged (the
    same ``job_id``, so a resend of a submit that went through is answered with the
    stored job, ``duplicate`` on a socket that already follows it).

    ``accepted`` maps each acknowledged job to the monotonic time of its
    acknowledgement. Bounded: stops at ``deadline`` whatever happens.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        job_ids: Iterable[str],
        *,
        job_type: str = "t",
        concurrency: int = 32,
        rate: float | None = None,
    ) -> None:
        self.url = url
        self.client_id = client_id
        self.pending = list(job_ids)
        self.total = len(self.pending)
        self.job_type = job_type
        self.concurrency = concurrency
        self.rate = rate
        self.accepted: dict[str, float] = {}
        self.unavailable = 0
        self.duplicates = 0
        self.reconnects = 0

    async def run(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            try:
                async with QueueClient(self.url, self.client_id, request_timeout=10) as qc:
                    while self.pending and time.monotonic() < deadline:
                        await self._round(qc)
            except CONNECTION_ERRORS:
                self.reconnects += 1
                await asyncio.sleep(0.05)
        assert not self.pending, f"{len(self.pending)} jobs never acknowledged"

    async def _round(self, qc: QueueClient) -> None:
        """One pass over what is pending, ``concurrency`` requests in flight."""
        started = time.monotonic()
        for i in range(0, len(self.pending), self.concurrency):
            chunk = self.pending[i : i + self.concurrency]
            results = await asyncio.gather(
                *(self._one(qc, jid) for jid in chunk), return_exceptions=True
            )
            for r in results:
                if isinstance(r, BaseException):
                    self.pending = [j for j in self.pending if j not in self.accepted]
                    raise r
            if self.rate:
                ahead = started + (i + len(chunk)) / self.rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        before = len(self.pending)
        self.pending = [j for j in self.pending if j not in self.accepted]
        if self.pending and len(self.pending) == before:
            await asyncio.sleep(0.05)  # all refused (Redis away): try again shortly

    async def _one(self, qc: QueueClient, job_id: str) -> None:
        try:
            await qc.submit(self.job_type, job_id=job_id)
        except RequestError as err:
            if err.code == "duplicate":
                self.duplicates += 1
            elif err.code == "unavailable":
                self.unavailable += 1
                return
            else:
                raise
        self.accepted[job_id] = time.monotonic()


def stream_id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


async def read_events(svc: AsyncRedisService) -> list[Event]:
    """The whole event stream of a namespace, oldest first."""
    out: list[Event] = []
    since = "0"
    while True:
        page = await svc.events_since(since, 10_000)
        out.extend(page)
        if len(page) < 10_000:
            return out
        since = page[-1].id


def per_job(events: Iterable[Event], name: str) -> Counter[str]:
    return Counter(e.fields["job"] for e in events if e.name == name)


async def totals(svc: AsyncRedisService) -> dict[str, int]:
    stats = await svc.get_stats()
    return dict(stats["totals"])


async def completed_at_least(svc: AsyncRedisService, n: int) -> bool:
    return (await totals(svc))["completed"] >= n


async def start_workers(url: str, machines: int, gpus: int, **kw: Any) -> list[MockWorker]:
    workers = [
        MockWorker(f"m{i}", gpus, hub=url, job_types=["t"], seed=i, **kw) for i in range(machines)
    ]
    await asyncio.gather(*(w.start() for w in workers))
    return workers


async def stop_all(workers: Iterable[MockWorker]) -> None:
    await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)


async def assert_exactly_once(
    svc: AsyncRedisService, job_ids: Iterable[str], *, submitted: int | None = None
) -> list[Event]:
    """Every job in ``job_ids`` completed exactly once, and nothing else did."""
    expected = set(job_ids)
    events = await read_events(svc)
    completed = per_job(events, "completed")
    twice = {j: n for j, n in completed.items() if n != 1}
    assert not twice, f"completed more than once: {dict(list(twice.items())[:5])}"
    missing = expected - set(completed)
    assert not missing, f"{len(missing)} accepted jobs never completed, e.g. {sorted(missing)[:5]}"
    assert set(completed) == expected
    t = await totals(svc)
    assert t["completed"] == len(expected)
    assert t["failed"] == 0 and t["cancelled"] == 0
    assert t["submitted"] == (len(expected) if submitted is None else submitted)
    assert len(per_job(events, "submitted")) == t["submitted"]
    assert t["requeued"] == sum(per_job(events, "requeued").values())
    assert t["retried"] == sum(per_job(events, "retrying").values())
    for job_id in list(expected)[:: max(1, len(expected) // 200)]:  # a sample, read back
        job = await svc.get_job(job_id)
        assert job is not None and job.status is JobStatus.COMPLETED
    return events


@pytest.fixture
async def engine(redis_url: str, namespace: str) -> AsyncIterator[AsyncRedisService]:
    """A reader on the test's namespace (for stats, events and invariants)."""
    svc = AsyncRedisService(redis_url, limits=EngineLimits(namespace=namespace))
    yield svc
    await svc.aclose()


# ------------------------------------------------------------------- hub crashes


async def test_hub_sigkill_mid_load_restart_same_port(
    redis_url: str, namespace: str, engine: AsyncRedisService
) -> None:
    """5,000 jobs; the hub is SIGKILLed once 1,500 have completed and restarted on
    the same port. Mock GPUs and the submitting client reconnect by themselves.
    Every job completes exactly once; the jobs the dead hub's GPUs held are requeued
    (by the reaper once their 1 s lease ran out, or by the GPU's re-registration)."""
    n = 5000
    env = {"REDISQ_LEASE_S": "1", "REDISQ_EVENTS_MAXLEN": BIG_STREAM, "REDISQ_MAX_LOST": "50"}
    hub = LiveHub(redis_url, namespace, env=env)
    workers: list[MockWorker] = []
    try:
        workers = await start_workers(hub.url, 3, 4, run_time=0.002, progress_steps=0)
        ids = [f"kill-{i}" for i in range(n)]
        sub = Submitter(hub.url, "c-kill", ids, concurrency=48, rate=900)
        submitting = asyncio.create_task(sub.run(timeout=120))

        await wait_for(lambda: completed_at_least(engine, 1500), 60, "1,500 completions")
        hub.kill()
        crash_id = await engine.last_event_id()  # nothing writes until the restart
        held = set(await engine.redis.zrange(engine.keys.leases, 0, -1))
        assert held, "the dead hub's GPUs held no jobs"
        before = await totals(engine)
        assert before["completed"] < n

        hub2 = LiveHub(redis_url, namespace, "--port", str(hub.port), env=env)
        try:
            await asyncio.wait_for(submitting, 120)
            assert len(sub.accepted) == n
            assert sub.reconnects >= 1
            await wait_for(lambda: completed_at_least(engine, n), 120, f"{n} completions")
            # every GPU came back by itself (a machine counts one connect per GPU)
            assert all(w.connects >= 2 * w.gpu_count for w in workers)
            events = await assert_exactly_once(engine, ids)
            later = {
                e.fields["job"]
                for e in events
                if e.name == "requeued" and stream_id(e.id) > stream_id(crash_id)
            }
            assert held <= later, f"held by the dead hub, never requeued: {held - later}"
            await stop_all(workers)
            assert await invariant_violations(engine.redis, engine.keys) == []
            assert hub2.alive
        finally:
            hub2.stop()
    finally:
        await stop_all(workers)
        if hub.alive:
            hub.kill()


async def test_sigkilled_hub_is_reaped_by_another_hub(
    redis_url: str, namespace: str, engine: AsyncRedisService
) -> None:
    """The GPUs of a SIGKILLed hub never come back: a second hub's reaper requeues
    their jobs once the 1 s lease has run out, and fresh GPUs on it finish them."""
    env = {"REDISQ_LEASE_S": "1", "REDISQ_EVENTS_MAXLEN": BIG_STREAM}
    hub_a = LiveHub(redis_url, namespace, env=env)
    hub_b = LiveHub(redis_url, namespace, env=env)
    gone: list[MockWorker] = []
    fresh: list[MockWorker] = []
    try:
        # slow GPUs, so that each one holds a job when the hub dies
        gone = [MockWorker("old", 4, hub=hub_a.url, job_types=["t"], run_time=30, reconnect=False)]
        await gone[0].start()
        ids = [f"reap-{i}" for i in range(20)]
        sub = Submitter(hub_b.url, "c-reap", ids)
        await sub.run(timeout=30)
        await wait_for(
            lambda: _leases(engine, 4), 10, "the old GPUs to hold four jobs"
        )  # assigned on hub B, pushed to hub A's sockets through the event stream
        held = set(await engine.redis.zrange(engine.keys.leases, 0, -1))
        hub_a.kill()
        killed = time.monotonic()
        await wait_for(lambda: _leases(engine, 0), 10, "the reaper to reclaim the leases")
        assert time.monotonic() - killed < 5
        events = await read_events(engine)
        requeued = per_job(events, "requeued")
        assert held <= set(requeued)
        assert sum(1 for e in events if e.name == "worker_down") == 4
        assert "reaped" in hub_b.output() or await _reaped_soon(hub_b)

        fresh = await start_workers(hub_b.url, 1, 4, run_time=0.001, progress_steps=0)
        await wait_for(lambda: completed_at_least(engine, len(ids)), 30, "every job")
        await assert_exactly_once(engine, ids)
        for job_id in held:
            job = await engine.get_job(job_id)
            assert job is not None and job.lost == 1 and job.attempt == 2
    finally:
        await stop_all([*gone, *fresh])
        for h in (hub_a, hub_b):
            if h.alive:
                h.stop()


async def _leases(engine: AsyncRedisService, n: int) -> bool:
    return int(await engine.redis.zcard(engine.keys.leases)) == n


async def _reaped_soon(hub: LiveHub) -> bool:
    async def seen() -> bool:
        return "reaped" in hub.output()

    return bool(await wait_for(seen, 5, "the reaper's log line"))


# ------------------------------------------------------------- workers dropping


async def test_workers_dropping_at_random_lose_nothing(
    redis_url: str, namespace: str, engine: AsyncRedisService
) -> None:
    """GPUs close their socket mid-job (10 %) or fail it (5 %, retryable), and
    reconnect. Every job completes exactly once; every drop is one requeue and
    every failure one retry, in the stats totals and in the event stream."""
    n = 1500
    env = {
        "REDISQ_EVENTS_MAXLEN": BIG_STREAM,
        "REDISQ_MAX_LOST": "1000",
        "REDISQ_MAX_ATTEMPTS": "100",
        "REDISQ_BACKOFF_BASE_S": "0.01",
        "REDISQ_BACKOFF_MAX_S": "0.05",
    }
    hub = LiveHub(redis_url, namespace, env=env)
    workers: list[MockWorker] = []
    try:
        workers = await start_workers(
            hub.url,
            3,
            3,
            run_time=0.002,
            progress_steps=1,
            disconnect_rate=0.10,
            failure_rate=0.05,
        )
        ids = [f"drop-{i}" for i in range(n)]
        await Submitter(hub.url, "c-drop", ids, concurrency=64).run(timeout=60)
        await wait_for(lambda: completed_at_least(engine, n), 90, f"{n} completions")
        await stop_all(workers)  # a worker's socket closing while idle requeues nothing
        events = await assert_exactly_once(engine, ids)

        drops = sum(w.disconnects for w in workers)
        failures = sum(w.failed for w in workers)
        t = await totals(engine)
        assert drops > 50 and failures > 20  # the faults did happen
        assert t["requeued"] == drops
        assert t["retried"] == failures
        # every dropped or failed attempt was followed by a later, completing attempt
        done_attempt = {
            e.fields["job"]: int(e.fields["attempt"]) for e in events if e.name == "completed"
        }
        for w in workers:
            for rec in w.history:
                if rec.outcome in ("disconnected", "failed"):
                    assert done_attempt[rec.job_id] > rec.attempt
        assert await invariant_violations(engine.redis, engine.keys) == []
    finally:
        await stop_all(workers)
        hub.stop()


# ----------------------------------------------------------------- Redis restart


async def _report_into_an_outage(
    rp: RedisProcess, sig: signal.Signals, worker: Peer, report: dict[str, Any]
) -> float:
    """Stop Redis with ``sig``, then send ``worker``'s ``report``: the hub, which
    cannot record it, closes the worker's socket (1011). Returns the monotonic time
    of the stop."""
    assert rp.proc is not None
    rp.proc.send_signal(sig)
    await asyncio.get_running_loop().run_in_executor(None, rp.proc.wait, 10)
    stopped = time.monotonic()
    await worker.send(report)
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await worker.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert closed.value.rcvd.reason == "the queue is unavailable; reconnect"
    return stopped


async def _redis_outage(
    rp: RedisProcess, hub: LiveHub, sig: signal.Signals, worker: Peer, held: dict[str, Any]
) -> tuple[float, dict[str, Any]]:
    """Stop Redis with ``sig``; while it is down, check that ``worker``, reporting
    the job it ``held``, is disconnected (1011) and that the hub answers clients
    ``unavailable`` and reports itself degraded; then restart Redis on the same port
    and directory. Returns (monotonic time of the stop, the error frame)."""
    stopped = await _report_into_an_outage(
        rp, sig, worker, {**_report(held), "id": "during-outage"}
    )
    async with QueueClient(hub.url, "probe", request_timeout=10) as qc:
        with pytest.raises(RequestError) as err:
            await qc.stats()
        assert err.value.code == "unavailable"
        with pytest.raises(RequestError) as err2:
            await qc.submit("t", job_id="during-outage")
        assert err2.value.code == "unavailable"
        status, body = await ahealth(hub.port)
        assert status == 503 and body["status"] == "degraded" and body["redis"] is False
        rp.restart()  # on this thread: the child must not be tied to an executor thread
        status, body = await ahealth(hub.port)
        assert status == 200 and body["redis"] is True
        reply = err.value.reply
    assert hub.alive
    return stopped, reply


async def _after_restart_the_hub_still_works(hub: LiveHub, engine: AsyncRedisService) -> None:
    async with QueueClient(hub.url, "after-restart") as qc:
        job_id = await qc.submit("t")
        result = await qc.result(job_id, timeout=30)
        assert result["worker_id"].startswith("m")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_redis_restart_with_aof_loses_no_accepted_job(
    namespace: str, sig: signal.Signals
) -> None:
    """Redis (``appendonly yes``, ``appendfsync everysec``) is stopped mid-load and
    started again on the same port and directory, under the same hub process.

    SIGTERM: Redis writes and fsyncs the AOF before it exits, so every job whose
    ``job_accepted`` the client received still exists afterwards and completes
    exactly once. SIGKILL: what Redis had written to the AOF file survives (the
    page cache outlives the process; ``everysec`` only limits what an operating
    system crash can take); the promise tested is the documented one, every job
    accepted more than 2 s before the kill, and the rest is reported.
    """
    n = 2000
    env = {"REDISQ_EVENTS_MAXLEN": BIG_STREAM, "REDISQ_LEASE_S": "5", "REDISQ_MAX_LOST": "50"}
    with RedisProcess(appendonly=True) as rp:
        engine = AsyncRedisService(rp.url, limits=EngineLimits(namespace=namespace))
        hub = LiveHub(rp.url, namespace, env=env)
        workers: list[MockWorker] = []
        try:
            # a GPU of its own job type, holding a job across the outage
            probe = await open_worker(hub.url, "probe-m:gpu0", ["outage-probe"])
            async with QueueClient(hub.url, "c-probe") as pc:
                probe_job = await pc.submit("outage-probe")
            held = await probe.expect("job_assigned")
            assert held["job_id"] == probe_job
            workers = await start_workers(hub.url, 2, 4, run_time=0.003, progress_steps=1)
            ids = [f"aof-{i}" for i in range(n)]
            sub = Submitter(hub.url, "c-aof", ids, concurrency=32, rate=500)
            submitting = asyncio.create_task(sub.run(timeout=120))
            await wait_for(lambda: completed_at_least(engine, 400), 60, "400 completions")

            async def old_enough() -> bool:  # jobs acknowledged more than 2.5 s ago
                now = time.monotonic()
                return sum(1 for t in sub.accepted.values() if now - t > 2.5) >= 300

            await wait_for(old_enough, 60, "300 jobs acknowledged 2.5 s ago")
            assert not submitting.done()  # still mid-load
            stopped, err = await _redis_outage(rp, hub, sig, probe, held)
            assert err["type"] == "error" and err["ref"] is not None
            # every job acknowledged before the stop (SIGKILL: more than 2 s before
            # it) exists after the restart
            accepted_before = dict(sub.accepted)
            must_exist = sorted(
                j for j, t in accepted_before.items() if sig == signal.SIGTERM or t < stopped - 2
            )
            assert len(must_exist) > 300
            exists = await _existing(engine, must_exist)
            lost = [j for j in must_exist if j not in exists]
            assert lost == [], f"{len(lost)} acknowledged jobs lost, e.g. {lost[:5]}"
            assert await invariant_violations(engine.redis, engine.keys) == []

            await asyncio.wait_for(submitting, 120)
            assert len(sub.accepted) == n
            # SIGKILL: a job acknowledged in the last moments may be gone (the
            # submitter does not resend what was acknowledged); everything that
            # exists completes exactly once
            survivors = await _existing(engine, ids)
            if sig == signal.SIGTERM:
                assert survivors == set(ids)
            await wait_for(
                lambda: completed_at_least(engine, len(survivors)), 120, "every surviving job"
            )
            await _after_restart_the_hub_still_works(hub, engine)
            # the report that met the outage was dropped: the GPU registers again, and
            # its job (requeued by that) runs again as attempt 2
            probe = await open_worker(hub.url, "probe-m:gpu0", ["outage-probe"])
            again = await probe.expect("job_assigned")
            assert again["job_id"] == probe_job and again["attempt"] == 2
            ack = await probe.request({**_report(again), "result": "second run"})
            assert ack["outcome"] == "completed"
            await probe.close()
            await stop_all(workers)
            # "during-outage" was refused with `unavailable` and never written
            assert await engine.get_job("during-outage") is None
            later = _after_restart_ids(await read_events(engine))
            await assert_exactly_once(engine, [*survivors, *later, probe_job])
            assert (await engine.get_job(probe_job)).result == "second run"  # type: ignore[union-attr]
            assert await invariant_violations(engine.redis, engine.keys) == []
            assert hub.alive
            out = hub.output()
            assert "Traceback" not in out
        finally:
            await stop_all(workers)
            hub.stop()
            await engine.aclose()


@pytest.mark.parametrize("told_by", ["registration", "sweep"])
async def test_an_outage_close_counts_no_loss_even_when_redis_could_not_hear_it(
    namespace: str, told_by: str
) -> None:
    """With ``REDISQ_MAX_LOST=0`` one counted loss fails a job for good. A GPU holding
    a job reports it while Redis is down: the hub closes it (1011), a loss that is not
    the job's, and cannot tell Redis so. Once Redis is back the job must run again,
    not fail as a poison job: the hub tells Redis of the uncounted loss before the
    worker registers again (``registration``: a long lease, so no sweep comes first),
    or at its next sweep (``sweep``: a 2 s lease, so the reaper would count the
    loss soon after)."""
    lease = "30" if told_by == "registration" else "2"
    env = {"REDISQ_LEASE_S": lease, "REDISQ_MAX_LOST": "0"}
    with RedisProcess(appendonly=True) as rp:
        engine = AsyncRedisService(rp.url, limits=EngineLimits(namespace=namespace))
        hub = LiveHub(rp.url, namespace, env=env)
        try:
            probe = await open_worker(hub.url, "probe-m:gpu0", ["outage-probe"])
            async with QueueClient(hub.url, "c-probe") as pc:
                job_id = await pc.submit("outage-probe")
            held = await probe.expect("job_assigned")
            await _report_into_an_outage(rp, signal.SIGTERM, probe, _report(held))

            async def tried() -> bool:  # the hub tried to tell Redis of the close, and could not
                return "could not requeue probe-m:gpu0's job now" in hub.output()

            await wait_for(tried, 30, "the hub's try")
            rp.restart()
            if told_by == "registration":
                probe = await open_worker(hub.url, "probe-m:gpu0", ["outage-probe"])
                again = await probe.expect("job_assigned")
                assert again["job_id"] == job_id and again["attempt"] == 2
                job = await engine.get_job(job_id)
                assert job is not None and job.status is JobStatus.ASSIGNED
                ack = await probe.request({**_report(again), "result": "ran"})
                assert ack["outcome"] == "completed"
                await probe.close()
            else:

                async def requeued() -> bool:
                    j = await engine.get_job(job_id)
                    return j is not None and j.status not in (JobStatus.ASSIGNED, JobStatus.RUNNING)

                await wait_for(requeued, 30, "the job out of the closed worker's hands")
                job = await engine.get_job(job_id)
                assert job is not None and job.status is JobStatus.QUEUED, job
            assert job.lost == 0
            assert await invariant_violations(engine.redis, engine.keys) == []
            assert hub.alive and "Traceback" not in hub.output()
        finally:
            hub.stop()
            await engine.aclose()


@pytest.mark.parametrize("names_it", [True, False])
async def test_a_worker_back_on_another_hub_after_an_outage_close_counts_no_loss(
    namespace: str, names_it: bool
) -> None:
    """``max_lost=0``. A GPU on hub A reports while Redis is down and is closed
    (1011); hub A then stops before Redis is back, so its memory of the close goes
    with it. The worker registers on hub B naming the closed socket's session: the
    job runs again (attempt 2) with no loss counted. Without the session (the
    second case) B's registration counts the loss and the job fails as a poison
    job: what a worker that does not say so gets."""
    limits = EngineLimits(namespace=namespace, max_lost=0, lease_s=30)
    with RedisProcess(appendonly=True) as rp:
        engine = AsyncRedisService(rp.url, limits=limits)
        try:
            async with Hub(hub_settings(rp.url, limits)) as b:
                a = Hub(hub_settings(rp.url, limits))
                await a.start()
                try:
                    probe = await open_worker(a.url, "m:gpu0", ["t"])
                    async with QueueClient(a.url, "c") as qc:
                        job_id = await qc.submit("t")
                    held = await probe.expect("job_assigned")
                    await _report_into_an_outage(rp, signal.SIGTERM, probe, _report(held))
                finally:
                    await a.stop()  # Redis is down: hub A cannot tell it of the close
                rp.restart()
                closed = probe.registered["session"] if names_it else None
                back = await open_worker(b.url, "m:gpu0", ["t"], closed_session=closed)
                job = await engine.get_job(job_id)
                assert job is not None
                if names_it:
                    pushed = await back.expect("job_assigned")
                    assert (pushed["job_id"], pushed["attempt"]) == (job_id, 2)
                    assert job.lost == 0 and job.status is JobStatus.ASSIGNED
                    ack = await back.request({**_report(pushed), "result": "ran"})
                    assert ack["outcome"] == "completed"
                else:
                    assert job.lost == 1 and job.status is JobStatus.FAILED
                await back.close()
                assert await invariant_violations(engine.redis, engine.keys) == []
        finally:
            await engine.aclose()


async def test_a_mock_gpu_closed_for_an_outage_names_that_socket_when_it_registers_again(
    namespace: str,
) -> None:
    """The lab's MockWorker: a GPU whose report meets a Redis outage is closed (1011)
    and, once Redis is back, registers again naming the closed socket's session
    (``closed_session``), as docs/protocol.md asks of a worker; its job runs again
    and completes. Its first registration names none."""
    limits = EngineLimits(namespace=namespace, max_lost=0, lease_s=30)
    with RedisProcess(appendonly=True) as rp:
        engine = AsyncRedisService(rp.url, limits=limits)
        try:
            async with Hub(hub_settings(rp.url, limits)) as hub:
                named: list[str | None] = []
                register = hub.routes.handlers[MessageType.REGISTER_WORKER]

                async def noting(conn: Any, msg: Any) -> None:
                    named.append(msg.fields["closed_session"])
                    await register(conn, msg)

                hub.routes.handlers[MessageType.REGISTER_WORKER] = noting
                async with (
                    MockWorker("m", 1, hub=hub, job_types=["t"], run_time=1.0),
                    QueueClient(hub, "c", request_timeout=10) as qc,
                ):
                    job_id = await qc.submit("t")
                    await wait_running(qc, job_id)
                    first = hub.registry.workers["m:gpu0"].session
                    assert rp.proc is not None
                    rp.proc.send_signal(signal.SIGTERM)
                    await asyncio.get_running_loop().run_in_executor(None, rp.proc.wait, 10)

                    async def closed() -> bool:  # its report met the outage: 1011
                        return "m:gpu0" not in hub.registry.workers

                    await wait_for(closed, 30, "the GPU closed for the outage")
                    rp.restart()
                    await qc.result(job_id, timeout=30)  # ran again, not failed
            # tries during the outage name it too, until one is answered
            assert named[0] is None and named[1:] and set(named[1:]) == {first}, named
            job = await engine.get_job(job_id)
            assert job is not None and job.lost == 0 and job.attempt == 2
            assert await invariant_violations(engine.redis, engine.keys) == []
        finally:
            await engine.aclose()


async def test_a_worker_back_before_its_old_socket_is_handled_counts_no_loss(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_lost=0``. A GPU reports while Redis is down and is closed (1011); the
    hub handles the end of that socket only after the worker's other requests have
    settled, which here waits until the test says so. Redis comes back and the
    worker registers again before then: the close, remembered when it was made, is
    told to Redis first, so the job runs again (attempt 2) with no loss counted,
    instead of failing as a poison job when the registration counted it."""
    limits = EngineLimits(namespace=namespace, max_lost=0)
    with RedisProcess(appendonly=True) as rp:
        engine = AsyncRedisService(rp.url, limits=limits)
        async with Hub(hub_settings(rp.url, limits)) as hub:
            probe = await open_worker(hub.url, "m:gpu0", ["t"])
            async with QueueClient(hub.url, "c") as qc:
                job_id = await qc.submit("t")
            held = await probe.expect("job_assigned")
            first = hub.registry.workers["m:gpu0"]
            gate = asyncio.Event()
            settled = hub.routes.settled

            async def held_back(conn: Any) -> None:
                if conn is first:
                    await gate.wait()
                await settled(conn)

            monkeypatch.setattr(hub.routes, "settled", held_back)
            try:
                await _report_into_an_outage(rp, signal.SIGTERM, probe, _report(held))
                rp.restart()
                again_peer = await open_worker(hub.url, "m:gpu0", ["t"])
                job = await engine.get_job(job_id)
                assert job is not None and job.lost == 0, job
                again = await again_peer.expect("job_assigned")
                assert again["job_id"] == job_id and again["attempt"] == 2
                assert (await engine.get_job(job_id)).status is JobStatus.ASSIGNED  # type: ignore[union-attr]
            finally:
                gate.set()  # the old socket's end is handled now: it changes nothing
            ack = await again_peer.request({**_report(again), "result": "ran"})
            assert ack["outcome"] == "completed"
            await again_peer.close()
            assert await invariant_violations(engine.redis, engine.keys) == []
        await engine.aclose()


async def test_a_loss_redis_refused_for_a_moment_is_told_again(namespace: str) -> None:
    """An uncounted loss the hub remembers is told again after Redis refused it for a
    reason that passes (a read-only replica, as during a failover), not dropped: the
    job is requeued uncounted once Redis takes writes again."""
    limits = EngineLimits(namespace=namespace, max_lost=0)
    with RedisProcess() as rp:
        engine = AsyncRedisService(rp.url, limits=limits)
        async with Hub(hub_settings(rp.url, limits)) as hub:
            probe = await open_worker(hub.url, "m:gpu0", ["t"])
            async with QueueClient(hub.url, "c") as qc:
                job_id = await qc.submit("t")
            await probe.expect("job_assigned")
            # what the hub remembers after a close it could not tell Redis of
            hub.routes.uncounted_loss("m:gpu0", hub.registry.workers["m:gpu0"].session)
            # a replica of a master that is not there: it keeps its data, takes no writes
            await engine.redis.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            try:
                await hub.routes.tell_losses()  # READONLY: kept, nothing raised
                # (the engine's functions are refused on a replica: the hash is read)
                assert await engine.redis.hget(engine.keys.job(job_id), "status") == "assigned"
            finally:
                await engine.redis.execute_command("REPLICAOF", "NO", "ONE")
            await hub.routes.tell_losses()
            job = await engine.get_job(job_id)
            assert job is not None and job.status is JobStatus.QUEUED and job.lost == 0
            await probe.close()
        await engine.aclose()


def _report(assigned: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "complete_job", "job_id": assigned["job_id"], "attempt": assigned["attempt"]}


async def _existing(engine: AsyncRedisService, job_ids: Iterable[str]) -> set[str]:
    ids = list(job_ids)
    async with engine.redis.pipeline(transaction=False) as p:
        for j in ids:
            p.exists(engine.keys.job(j))
        found = await p.execute()
    return {j for j, ok in zip(ids, found, strict=True) if ok}


def _after_restart_ids(events: Iterable[Event]) -> list[str]:
    return [
        e.fields["job"]
        for e in events
        if e.name == "submitted" and e.fields.get("client") == "after-restart"
    ]


# ------------------------------------------------------------------ Redis stalls


def _process_state(pid: int) -> str:
    """The state letter of process ``pid`` (``T``: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def stalled(rp: RedisProcess) -> Iterator[None]:
    """Redis stops answering (SIGSTOP: its sockets stay open, what clients send
    waits in them) until the block ends (SIGCONT: it runs what waited)."""
    assert rp.proc is not None
    pid = rp.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_sync(lambda: _process_state(pid) == "T", 5, "redis-server to stop")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_a_completion_run_late_by_a_stalled_redis_reaches_the_client(
    namespace: str,
) -> None:
    """Redis stalls longer than the hub's 5 s call timeout while a worker reports
    its completion. The hub gives up on the call and closes the worker (1011); once
    Redis runs the waiting call, the job is completed, and the submitting socket
    (open throughout) hears ``job_completed``, once. The next job, which that late
    call gave the closed worker, is requeued without counting as a lost worker.

    The worker does not read while Redis is stopped, so its close handshake (and so
    the hub's requeue of its job) waits until after Redis has run the completion:
    the order that lost the final frame before."""
    with RedisProcess(appendonly=False) as rp:
        engine = AsyncRedisService(rp.url, limits=EngineLimits(namespace=namespace))
        hub = LiveHub(rp.url, namespace)
        try:
            client = await Peer.open(f"{hub.url}/ws/client/c-stall")
            worker = await open_worker(hub.url, "m1:gpu0", ["t"])
            warm = await client.request({"type": "submit_job", "job_type": "t"})
            ack = await worker.request({**_report(await worker.expect("job_assigned"))})
            assert ack["outcome"] == "completed"  # Redis has the script: it can run it late
            assert (await client.expect("job_completed"))["job_id"] == warm["job_id"]
            first = await client.request({"type": "submit_job", "job_type": "t"})
            second = await client.request({"type": "submit_job", "job_type": "t"})
            assigned = await worker.expect("job_assigned")
            assert assigned["job_id"] == first["job_id"]
            with stalled(rp):
                await worker.send({**_report(assigned), "result": "late", "id": "c1"})
                worker.ws.transport.pause_reading()

                async def gave_up() -> bool:
                    return "within 5 s (complete)" in hub.output()

                await wait_for(gave_up, 30, "the hub to give up on the completion")
            done = await client.expect("job_completed", timeout=30)
            assert done["job_id"] == first["job_id"]
            assert (done["result"], done["attempt"], done["worker_id"]) == ("late", 1, "m1:gpu0")

            async def requeued() -> bool:
                job = await engine.get_job(second["job_id"])
                return job is not None and job.status is JobStatus.QUEUED

            worker.ws.transport.resume_reading()
            with pytest.raises(ConnectionClosed):
                while True:
                    await worker.recv(timeout=30)
            await wait_for(requeued, 30, "the closed worker's next job to be requeued")
            job = await engine.get_job(second["job_id"])
            assert job is not None and job.lost == 0 and job.attempt == 1
            await client.request({"type": "get_stats"})  # whatever was sent has arrived
            finals = [m for m in client.seen if m["type"] in ("job_completed", "job_failed")]
            assert finals[1:] == [done]
            await client.close()
            assert hub.alive
        finally:
            hub.stop()
            await engine.aclose()


async def test_a_submit_answered_unavailable_can_be_sent_again(namespace: str) -> None:
    """A submit meets a Redis stall: the client gets ``unavailable``, and Redis runs
    the submit later. Sending it again (same ``job_id``, other params) answers
    ``job_accepted`` with the stored job, and the socket follows it to its end. The
    owner's new socket gets the same answer and the final frame; another client's
    id stays ``duplicate``."""
    with RedisProcess(appendonly=False) as rp:
        engine = AsyncRedisService(rp.url, limits=EngineLimits(namespace=namespace))
        hub = LiveHub(rp.url, namespace)
        try:
            client = await Peer.open(f"{hub.url}/ws/client/c-resend")
            warm = await client.request({"type": "submit_job", "job_type": "warm-up"})
            assert warm["type"] == "job_accepted"  # Redis has the script: it can run it late
            submit = {"type": "submit_job", "job_type": "t", "job_id": "resent", "params": {"v": 1}}
            with stalled(rp):
                refused = await client.request(submit, timeout=30)
                assert refused["type"] == "error" and refused["code"] == "unavailable"
            await wait_for(lambda: engine.get_job("resent"), 30, "the late submit to run")

            again = await client.request({**submit, "params": {"v": 2}, "priority": 9})
            assert again["type"] == "job_accepted"
            assert (again["job_id"], again["status"], again["position"]) == ("resent", "queued", 0)
            worker = await open_worker(hub.url, "m1:gpu0", ["t"])
            assigned = await worker.expect("job_assigned")
            assert assigned["params"] == {"v": 1} and assigned["priority"] == 0
            update = await client.expect("job_update")
            assert update["job_id"] == "resent" and update["status"] == "assigned"
            await worker.send({**_report(assigned), "result": 42})
            done = await client.expect("job_completed")
            assert done["job_id"] == "resent" and done["result"] == 42

            later = await Peer.open(f"{hub.url}/ws/client/c-resend")
            answer = await later.request(submit)
            assert (answer["type"], answer["status"], answer["position"]) == (
                "job_accepted",
                "completed",
                None,
            )
            assert await later.expect("job_completed") == done
            stranger = await Peer.open(f"{hub.url}/ws/client/c-other")
            dup = await stranger.request(submit)
            assert dup["type"] == "error" and dup["code"] == "duplicate"
            for peer in (client, later, stranger, worker):
                await peer.close()
        finally:
            hub.stop()
            await engine.aclose()


# --------------------------------------------------------------- client catch-up


async def test_client_reconnects_and_catches_up_with_missed_events(
    redis_url: str, namespace: str, engine: AsyncRedisService
) -> None:
    """A client loses its socket (aborted, no close frame) while its jobs run, and
    then its hub dies too (SIGKILL). It reconnects to the restarted hub and asks
    for its events since the last event id it had: it gets exactly its own events
    after that point, every job's end among them, and none of another client's."""
    env = {"REDISQ_EVENTS_MAXLEN": BIG_STREAM, "REDISQ_LEASE_S": "1"}
    hub = LiveHub(redis_url, namespace, env=env)
    hub2: LiveHub | None = None
    workers: list[MockWorker] = []
    try:
        qc = await QueueClient(hub.url, "alice").connect()
        mine = [await qc.submit("t") for _ in range(20)]
        checkpoint = (await qc.events_since("0", 10_000))["last_id"]
        others = await QueueClient(hub.url, "bob").connect()
        theirs = [await others.submit("t") for _ in range(10)]
        assert qc.ws is not None
        qc.ws.transport.abort()  # the socket drops: no close handshake
        await qc.close()
        await others.close()
        # the GPUs only start now: everything of alice's after `submitted` is missed
        workers = await start_workers(hub.url, 1, 2, run_time=0.05, progress_steps=2)

        await wait_for(lambda: completed_at_least(engine, 3), 30, "a few completions")
        hub.kill()
        hub2 = LiveHub(redis_url, namespace, "--port", str(hub.port), env=env)
        await wait_for(lambda: completed_at_least(engine, 30), 60, "every job")

        async with QueueClient(hub2.url, "alice") as again:
            missed: list[dict[str, Any]] = []
            since = checkpoint
            for _ in range(100):  # bounded paging
                page = await again.events_since(since, 50)
                missed.extend(page["events"])
                since = page["last_id"]
                if not page["more"]:
                    break
            else:
                raise AssertionError("paging did not end")
        truth = [
            e
            for e in await engine.events_since(checkpoint, 100_000)
            if e.fields.get("client") == "alice"
        ]
        assert [m["event_id"] for m in missed] == [e.id for e in truth]
        assert {m["job"] for m in missed} <= set(mine)
        assert not {m["job"] for m in missed} & set(theirs)
        assert all(not {"hub", "session", "n"} & set(m) for m in missed)
        ends = Counter(m["job"] for m in missed if m["e"] == "completed")
        assert ends == Counter(mine)  # each of its jobs' end, exactly once
        for m in missed:
            assert m["client"] == "alice"
            assert stream_id(m["event_id"]) > stream_id(checkpoint)
    finally:
        await stop_all(workers)
        for h in (hub, hub2):
            if h is not None and h.alive:
                h.stop()


# ------------------------------------------------------- order after faults


async def test_retry_and_requeue_keep_their_original_place(svc: AsyncRedisService) -> None:
    """Priority first, then submission order; a job that failed (retryable) goes back
    to its original place once its backoff has passed, and a job whose worker was
    lost goes back to its original place at once: neither goes to the back."""
    ids = [(await svc.submit_job("t", 0)).job_id for _ in range(5)]
    a = await svc.register_worker("m1:gpu0", ["t"], session="s1")
    assert a is not None and a.job_id == ids[0]
    res = await svc.fail_job(ids[0], 1, "m1:gpu0", "flaky", retryable=True)
    assert res.outcome == "retrying" and res.next is not None and res.next.job_id == ids[1]

    async def promoted() -> bool:
        moved, _, _ = await svc.promote()
        return moved > 0

    await wait_for(promoted, 10, "the retry's backoff to pass")  # 0.05 s here
    queue = await svc.redis.zrange(svc.keys.queue("t"), 0, -1)
    assert queue == [ids[0], ids[2], ids[3], ids[4]]  # back in front, not behind ids[4]
    urgent = (await svc.submit_job("t", 5)).job_id  # a higher priority still goes first
    assert await svc.worker_lost("m1:gpu0", "s1")  # ids[1]'s worker is lost: requeued
    queue = await svc.redis.zrange(svc.keys.queue("t"), 0, -1)
    assert queue == [urgent, ids[0], ids[1], ids[2], ids[3], ids[4]]

    order = []
    nxt = await svc.register_worker("m2:gpu0", ["t"], session="s2")
    while nxt is not None:
        order.append(nxt.job_id)
        nxt = (await svc.complete_job(nxt.job_id, nxt.attempt, "m2:gpu0")).next
    assert order == [urgent, ids[0], ids[1], ids[2], ids[3], ids[4]]
    assert await invariant_violations(svc.redis, svc.keys) == []


# ------------------------------------------------- what does not survive


async def test_redis_without_persistence_loses_state_but_the_hub_recovers(
    namespace: str,
) -> None:
    """Not a promise but its limit: a Redis without persistence that restarts comes
    back empty, and every job it held is gone. The hub notices by itself: its
    workers' records are gone, so it closes their sockets (4001) and they register
    again; new jobs then run as usual."""
    with RedisProcess(appendonly=False) as rp:
        engine = AsyncRedisService(rp.url, limits=EngineLimits(namespace=namespace))
        hub = LiveHub(rp.url, namespace, env={"REDISQ_LEASE_S": "1"})
        workers: list[MockWorker] = []
        try:
            workers = await start_workers(hub.url, 1, 2, run_time=0.001, progress_steps=0)
            async with QueueClient(hub.url, "volatile") as qc:
                before = await qc.submit("zz-nobody-runs-this")
                rp.restart()  # SIGTERM, and nothing to reload
                assert await engine.get_job(before) is None

                async def reregistered() -> bool:
                    return all(w.connects >= 4 for w in workers) and bool(
                        await engine.redis.zcard(engine.keys.workers) == 2
                    )

                await wait_for(reregistered, 20, "the GPUs to register again")
                after = await qc.submit("t")
                assert (await qc.result(after, timeout=30))["worker_id"].startswith("m0:")
            assert hub.alive
        finally:
            await stop_all(workers)
            hub.stop()
            await engine.aclose()


def _lose_first_reply_to(svc: AsyncRedisService, wanted: Callable[[Any], bool]) -> dict[str, int]:
    """Make ``svc`` lose the first reply of an engine call that carries events for
    the hub and whose own reply passes ``wanted``: Redis ran the call, then the
    connection breaks as that reply is read. Patch before the service makes any
    connection. Returns the count of replies so lost."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    lost = {"replies": 0}
    pool = svc.redis.connection_pool
    base = pool.connection_class

    class LosesOneReply(base):  # type: ignore[misc, valid-type]
        async def read_response(self, *args: Any, **kwargs: Any) -> Any:
            reply = await super().read_response(*args, **kwargs)
            # a function's reply with events for this hub: {reply, events}
            events = isinstance(reply, list) and len(reply) == 2
            if not lost["replies"] and events and wanted(reply[0]):
                lost["replies"] += 1
                raise RedisConnectionError("connection reset after the call ran")
            return reply

    pool.connection_class = LosesOneReply
    return lost


def _starts_with(status: str) -> Callable[[Any], bool]:
    """A reply that is a list starting with ``status`` (a cancel's, a submit's)."""
    return lambda r: isinstance(r, list) and bool(r) and r[0] in (status, status.encode())


@pytest.mark.parametrize("in_the_stream", [True, False])
async def test_a_cancel_whose_reply_was_lost_still_reaches_followers_and_the_worker(
    redis_url: str, limits: EngineLimits, in_the_stream: bool
) -> None:
    """Redis cancels a running job, and the hub's connection breaks before the reply:
    the call is sent again and finds the job already cancelled, with none of the
    first run's events. Those are read back from the event stream: another socket
    following the job gets its final frame, and the GPU running it gets cancel_job
    (it stops and acknowledges), instead of waiting forever and running the job to
    its end. When the event is not among the stream's newest entries (a burst of
    others came since), the job is read again instead: the follower still hears."""
    svc = AsyncRedisService(redis_url, limits=limits)
    lost = _lose_first_reply_to(svc, _starts_with("cancelled"))
    if not in_the_stream:

        async def nothing_found(*args: Any, **kwargs: Any) -> list[Event]:
            return []

        svc.recent_events = nothing_found  # type: ignore[method-assign]
    try:
        async with (
            Hub(hub_settings(redis_url, limits), service=svc) as hub,
            MockWorker("m", 1, hub=hub, job_types=["t"], run_time=600.0) as worker,
            QueueClient(hub, "owner") as owner,
            QueueClient(hub, "owner") as follower,
        ):
            job = await owner.submit("t")
            await wait_running(owner, job)
            await follower.subscribe(job)
            final = asyncio.ensure_future(follower.result(job, timeout=10))
            reply = await owner.cancel(job)
            assert reply["status"] == "cancelled" and lost["replies"] == 1
            with pytest.raises(JobFailed, match="cancel"):
                await final  # the follower heard it: no wait to the 10 s timeout
            if in_the_stream:  # the recheck tells followers, not the GPU

                async def acknowledged() -> bool:
                    return worker.cancelled == 1

                await wait_for(acknowledged, what="the GPU to stop the job")
            assert await invariant_violations(svc.redis, svc.keys) == []
    finally:
        await svc.aclose()


async def test_a_submit_whose_reply_was_lost_pushes_its_assignment_at_once(
    redis_url: str, limits: EngineLimits
) -> None:
    """Redis assigns a submitted job to an idle GPU, and the reply is lost with the
    connection: the rerun finds the job stored and answers without the assignment.
    The hub reads the assignment back from the event stream and pushes it now; the
    next sweep (every lease/3, 40 s here) would have been the first to."""
    limits = replace(limits, lease_s=120.0)
    svc = AsyncRedisService(redis_url, limits=limits)
    lost = _lose_first_reply_to(svc, _starts_with("assigned"))
    try:
        async with (
            Hub(hub_settings(redis_url, limits), service=svc) as hub,
            MockWorker("m", 1, hub=hub, job_types=["t"], run_time=0.0),
            QueueClient(hub, "owner") as owner,
        ):

            async def idle() -> bool:
                return (await owner.stats())["workers_idle"] == 1

            await wait_for(idle, what="the GPU to wait for work")
            job = await owner.submit("t")
            assert lost["replies"] == 1
            await owner.result(job, timeout=10)
            assert await invariant_violations(svc.redis, svc.keys) == []
    finally:
        await svc.aclose()


async def test_a_worker_loss_whose_reply_was_lost_still_tells_the_job_s_followers(
    redis_url: str, limits: EngineLimits
) -> None:
    """A GPU's socket closes and Redis takes the worker out of service, failing its
    job for good (``max_lost`` 0: one loss is too many); the reply is lost with the
    connection, and the rerun finds the worker already gone, with none of those
    events. They are read back from the stream: the job's follower here gets its
    final frame instead of waiting forever."""
    limits = replace(limits, max_lost=0)
    svc = AsyncRedisService(redis_url, limits=limits)
    lost = _lose_first_reply_to(svc, lambda r: r == 1)  # lost.lua: 1, the worker dropped
    try:
        async with (
            Hub(hub_settings(redis_url, limits), service=svc) as hub,
            QueueClient(hub, "owner") as owner,
        ):
            worker = MockWorker("m", 1, hub=hub, job_types=["t"], run_time=600.0)
            await worker.start()
            try:
                job = await owner.submit("t")
                await wait_running(owner, job)
            finally:
                await worker.stop()  # its socket closes mid-job
            with pytest.raises(JobFailed, match="lost"):
                await owner.result(job, timeout=10)
            assert lost["replies"] == 1
            assert await invariant_violations(svc.redis, svc.keys) == []
    finally:
        await svc.aclose()
