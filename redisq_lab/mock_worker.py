"""MockWorker: a simulated machine with N GPUs, one hub socket per GPU.

    worker = MockWorker(machine_id="test-machine", gpu_count=2, ws_host="localhost", ws_port=8000)
    await worker.start()     # returns once every GPU is registered; runs in the background
    ...
    await worker.stop()      # or worker.close() from sync code

Each GPU registers as ``<machine_id>:gpu<i>``, takes the jobs the hub pushes, reports
progress, and completes, fails or drops its connection as configured. Run times come
from ``run_time`` (seconds, a distribution, or a function), or from a job's own
``params["duration_s"]``. ``burst=True`` makes each GPU stop the first time it has
nothing to do (the hub says so in its acknowledgement), which makes tests and
benchmarks deterministic. ``prefetch=1`` registers each GPU with a prefetch window:
while it runs a job the hub may send it the next one, which it holds and runs next
(no dispatch gap between jobs). A GPU whose hub goes away reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from redisq_server import protocol
from redisq_server.protocol import CloseCode, MessageType

from ._source import hub_url_of

__all__ = ["DEFAULT_JOB_TYPES", "JobRecord", "MockWorker", "RunTime", "sample_run_time"]

DEFAULT_JOB_TYPES = ("default", "image_generation", "inference", "training")

#: seconds; ("fixed", s); ("exponential", mean); ("lognormal", mean, sigma);
#: ("uniform", low, high); or a function (rng, job message) -> seconds.
RunTime = float | tuple[Any, ...] | Callable[[random.Random, Mapping[str, Any]], float]


def sample_run_time(spec: RunTime, rng: random.Random, job: Mapping[str, Any]) -> float:
    """Seconds the job should take: ``params["duration_s"]`` if the job names it,
    else a draw from ``spec``."""
    params = job.get("params") or {}
    if isinstance(params, Mapping) and isinstance(params.get("duration_s"), int | float):
        return max(0.0, float(params["duration_s"]))
    if callable(spec):
        return max(0.0, float(spec(rng, job)))
    if isinstance(spec, int | float):
        return max(0.0, float(spec))
    kind, *args = spec
    if kind == "fixed":
        return float(args[0])
    if kind == "exponential":
        return rng.expovariate(1.0 / float(args[0]))
    if kind == "lognormal":
        mean, sigma = float(args[0]), float(args[1])
        return rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)
    if kind == "uniform":
        return rng.uniform(float(args[0]), float(args[1]))
    raise ValueError(f"unknown run time distribution {kind!r}")


@dataclass
class JobRecord:
    """One attempt as the mock GPU saw it (``time.time()`` seconds)."""

    job_id: str
    job_type: str
    priority: int
    attempt: int
    worker_id: str
    received: float
    started: float | None = None
    finished: float | None = None
    outcome: str = "running"  # completed, failed, cancelled, disconnected

    @classmethod
    def received_now(cls, job: Mapping[str, Any], worker_id: str) -> JobRecord:
        """The record of a ``job_assigned`` frame ``job``, received now."""
        return cls(
            job["job_id"],
            job["job_type"],
            job.get("priority", 0),
            job["attempt"],
            worker_id,
            time.time(),
        )


@dataclass
class _Gpu:
    """One GPU socket's jobs: the one running (``holding``, ``task``) and those sent
    to run after it (``pending``; with a prefetch window, the one held ahead)."""

    pending: deque[Mapping[str, Any]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    holding: tuple[str, int] | None = None
    task: asyncio.Task[None] | None = None


class MockWorker:
    """A simulated GPU machine. See the module docstring for the lifecycle.

    ``hub`` may be a hub URL or a local stack; otherwise ``ws_host``/``ws_port``
    name the hub. ``job_types`` are the types every GPU accepts. ``failure_rate``
    and ``disconnect_rate`` are per-job probabilities (a failure is retryable; a
    disconnect closes the GPU's socket mid-job and reconnects). ``seed`` makes the
    random choices repeatable. ``prefetch`` (0 or 1) is each GPU's prefetch window.
    """

    def __init__(
        self,
        machine_id: str = "test-machine",
        gpu_count: int = 2,
        ws_host: str = "localhost",
        ws_port: int = 8000,
        *,
        hub: Any = None,
        job_types: Iterable[str] = DEFAULT_JOB_TYPES,
        run_time: RunTime | Mapping[str, RunTime] = 0.1,
        progress_steps: int = 2,
        failure_rate: float = 0.0,
        disconnect_rate: float = 0.0,
        burst: bool = False,
        reconnect: bool = True,
        token: str | None = None,
        capabilities: Mapping[str, Any] | None = None,
        seed: int | None = None,
        prefetch: int = 0,
    ) -> None:
        if gpu_count < 1:
            raise ValueError("gpu_count must be at least 1")
        self.prefetch = protocol.validate_prefetch(prefetch)
        self.machine_id = machine_id
        self.gpu_count = gpu_count
        self.hub_url = hub_url_of(hub) if hub is not None else f"ws://{ws_host}:{ws_port}"
        self.job_types = list(job_types)
        self.run_time = run_time
        self.progress_steps = progress_steps
        self.failure_rate = failure_rate
        self.disconnect_rate = disconnect_rate
        self.burst = burst
        self.reconnect = reconnect
        self.token = token
        self.capabilities = dict(
            capabilities or {"gpu_model": "MockGPU A100", "gpu_memory_gb": 80, "mock": True}
        )
        self.rng = random.Random(seed)
        self.history: list[JobRecord] = []
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        #: jobs that arrived while the GPU ran another (held ahead: prefetch)
        self.held_ahead = 0
        self.disconnects = 0
        self.connects = 0
        self.errors: list[dict[str, Any]] = []
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._sockets: dict[str, ClientConnection] = {}
        self._registered: dict[str, asyncio.Event] = {}
        self._sessions: dict[str, str | None] = {}  # each GPU socket's, from its hub
        # a GPU whose socket its hub closed for an outage (1011): that socket's session
        self._closed_for_outage: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing: asyncio.Future[None] | None = None

    @property
    def worker_ids(self) -> list[str]:
        return [f"{self.machine_id}:gpu{i}" for i in range(self.gpu_count)]

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<MockWorker {self.machine_id} gpus={self.gpu_count} {state} "
            f"completed={self.completed} failed={self.failed} hub={self.hub_url}>"
        )

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    # ---------------------------------------------------------- lifecycle

    async def start(self, timeout: float = 10.0) -> MockWorker:
        """Open one socket per GPU and return once each has registered (it keeps
        running in the background on this event loop). Raises if they cannot."""
        if self.running:
            return self
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._registered = {w: asyncio.Event() for w in self.worker_ids}
        self._tasks = [asyncio.create_task(self._gpu(w), name=f"mock {w}") for w in self.worker_ids]
        ready = await self._wait_registered(timeout)
        if not ready:
            failures = [t.exception() for t in self._tasks if t.done() and t.exception()]
            await self.stop()
            raise ConnectionError(
                f"MockWorker {self.machine_id}: GPUs did not register with {self.hub_url}"
                + (f" ({failures[0]})" if failures else "")
            )
        return self

    async def _wait_registered(self, timeout: float) -> bool:
        """Wait until every GPU registered once; False if one gave up first or time ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        events = dict(zip(self.worker_ids, self._registered.values(), strict=True))
        tasks = dict(zip(self.worker_ids, self._tasks, strict=True))
        while not all(e.is_set() for e in events.values()):
            gave_up = [w for w, t in tasks.items() if t.done() and not events[w].is_set()]
            remaining = deadline - loop.time()
            if gave_up or remaining <= 0:
                return False
            waits = {asyncio.ensure_future(e.wait()) for e in events.values() if not e.is_set()}
            running = {t for t in tasks.values() if not t.done()}
            await asyncio.wait(
                waits | running, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            for w in waits:
                w.cancel()
        return True

    async def stop(self) -> None:
        """Close every GPU socket and stop. A job in progress is abandoned; the hub
        requeues it. Idempotent."""
        self._stopping = True
        for ws in list(self._sockets.values()):
            await ws.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def join(self, timeout: float | None = None) -> None:
        """Wait until every GPU has stopped (in burst mode: until the queue is empty)."""
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), timeout)

    async def __aenter__(self) -> MockWorker:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- sync forms, for scripts (a private event loop in a thread)

    def start_in_thread(self, timeout: float = 10.0) -> MockWorker:
        """Start on a private event loop in a daemon thread; stop with :meth:`close`."""
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"mock {self.machine_id}", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start(timeout), loop).result(timeout + 5)
        return self

    def close(self) -> None:
        """Stop from sync code: blocks until stopped when started in a thread;
        on the caller's running loop, schedules :meth:`stop` and returns."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if self._thread is not None:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)
            self._thread = None
            loop.close()
            return
        self._closing = asyncio.ensure_future(self.stop(), loop=loop)

    # ------------------------------------------------------------ results

    def records(self) -> list[dict[str, Any]]:
        """One dict per job attempt seen, oldest first."""
        return [asdict(r) for r in self.history]

    def dataframe(self) -> Any:
        """:meth:`records` as a pandas DataFrame (with ``run_s``)."""
        import pandas as pd

        df = pd.DataFrame(self.records(), columns=list(JobRecord.__dataclass_fields__))
        df["run_s"] = df["finished"] - df["started"]
        return df

    # -------------------------------------------------------------- a GPU

    async def _gpu(self, worker_id: str) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
                async with connect(
                    f"{self.hub_url}/ws/worker/{worker_id}",
                    additional_headers=headers,
                    max_size=None,
                    compression=None,
                ) as ws:
                    self._sockets[worker_id] = ws
                    self.connects += 1
                    backoff = 0.05
                    if await self._serve(ws, worker_id):
                        return  # burst finished
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
                if not self.reconnect and not self._registered[worker_id].is_set():
                    raise
            finally:
                self._sockets.pop(worker_id, None)
            if self._stopping or not self.reconnect:
                return
            await asyncio.sleep(backoff * (1 + self.rng.random()))
            backoff = min(backoff * 2, 2.0)

    async def _serve(self, ws: ClientConnection, worker_id: str) -> bool:
        """Speak the protocol on one GPU socket. True when a burst has finished."""
        caps = {**self.capabilities, "gpu_index": worker_id.rsplit("gpu", 1)[-1]}
        register = protocol.register_worker(
            self.job_types,
            caps,
            prefetch=self.prefetch,
            # the previous socket closed for an outage: its job's loss is not counted
            closed_session=self._closed_for_outage.get(worker_id),
            id="register",
        )
        await ws.send(protocol.encode(register))
        gpu = _Gpu()
        runner = asyncio.create_task(self._runner(ws, worker_id, gpu))
        try:
            async for raw in ws:
                m = protocol.loads(raw)
                kind = m.get("type")
                if kind == MessageType.JOB_ASSIGNED:
                    if gpu.holding is not None:
                        self.held_ahead += 1
                    gpu.pending.append(m)  # run in the order sent: the job held ahead last
                    gpu.wake.set()
                elif kind == MessageType.CANCEL_JOB:
                    await self._cancel(ws, worker_id, gpu, m["job_id"], m["attempt"])
                elif kind == MessageType.WORKER_REGISTERED:
                    self._sessions[worker_id] = m.get("session")
                    self._closed_for_outage.pop(worker_id, None)  # told: kept until then
                    self._registered[worker_id].set()
                    if self.burst and not m.get("has_next"):
                        return True
                elif kind == MessageType.ACK and "outcome" in m:
                    if gpu.holding is not None and m.get("job_id") == gpu.holding[0]:
                        gpu.holding = None
                    idle = gpu.holding is None and not gpu.pending
                    if self.burst and idle and not m.get("has_next"):
                        return True
                elif kind == MessageType.ERROR:
                    self.errors.append(m)
        finally:
            session = self._sessions.pop(worker_id, None)
            if ws.close_code == CloseCode.UNAVAILABLE and session:  # 1011: an outage
                self._closed_for_outage[worker_id] = session
            runner.cancel()
            if gpu.task is not None and not gpu.task.done():
                gpu.task.cancel()
        return False

    async def _runner(self, ws: ClientConnection, worker_id: str, gpu: _Gpu) -> None:
        """Run this GPU's jobs one at a time, in the order they were sent."""
        while True:
            while not gpu.pending:
                gpu.wake.clear()
                await gpu.wake.wait()
            job = gpu.pending.popleft()
            gpu.holding = (job["job_id"], job["attempt"])
            gpu.task = asyncio.create_task(self._run(ws, worker_id, job))
            await asyncio.wait({gpu.task})  # a cancelled job ends its task, not the runner

    async def _cancel(
        self, ws: ClientConnection, worker_id: str, gpu: _Gpu, job_id: str, attempt: int
    ) -> None:
        """Stop the job if it runs, drop it if it is held ahead; acknowledge either."""
        if gpu.holding == (job_id, attempt) and gpu.task is not None:
            gpu.task.cancel()
        else:
            ahead = [j for j in gpu.pending if (j["job_id"], j["attempt"]) == (job_id, attempt)]
            if not ahead:
                return
            gpu.pending.remove(ahead[0])
            self.history.append(JobRecord.received_now(ahead[0], worker_id))
        self.cancelled += 1
        self._mark(job_id, attempt, "cancelled")
        await self._send(ws, protocol.fail_job(job_id, attempt, "cancelled", False))

    async def _send(self, ws: ClientConnection, report: dict[str, Any]) -> None:
        """Send a report on a job, with an ``id`` so that the hub acknowledges it."""
        report["id"] = f"{report['type']}:{report['job_id']}:{report['attempt']}"
        await ws.send(protocol.encode(report))

    def _mark(self, job_id: str, attempt: int, outcome: str) -> None:
        for rec in reversed(self.history):
            if rec.job_id == job_id and rec.attempt == attempt:
                rec.outcome = outcome
                rec.finished = rec.finished or time.time()
                return

    async def _run(self, ws: ClientConnection, worker_id: str, job: Mapping[str, Any]) -> None:
        job_id, attempt = job["job_id"], job["attempt"]
        rec = JobRecord.received_now(job, worker_id)
        self.history.append(rec)
        spec = self.run_time
        if isinstance(spec, Mapping):
            spec = spec.get(job["job_type"], spec.get("*", 0.1))
        duration = sample_run_time(spec, self.rng, job)
        roll = self.rng.random()
        try:
            rec.started = time.time()
            await ws.send(protocol.encode(protocol.update_job_progress(job_id, attempt, 0)))
            steps = max(1, self.progress_steps)
            for step in range(1, steps + 1):
                await asyncio.sleep(duration / steps)
                if step < steps and self.progress_steps:
                    done = round(100 * step / steps, 2)
                    update = protocol.update_job_progress(
                        job_id, attempt, done, f"step {step}/{steps}"
                    )
                    await ws.send(protocol.encode(update))
            if roll < self.disconnect_rate:
                self.disconnects += 1
                rec.outcome, rec.finished = "disconnected", time.time()
                await ws.close()
                return
            rec.finished = time.time()
            if roll < self.disconnect_rate + self.failure_rate:
                self.failed += 1
                rec.outcome = "failed"
                await self._send(ws, protocol.fail_job(job_id, attempt, "mock failure", True))
            else:
                self.completed += 1
                rec.outcome = "completed"
                result = {"worker_id": worker_id, "run_s": round(rec.finished - rec.started, 6)}
                await self._send(ws, protocol.complete_job(job_id, attempt, result))
        except ConnectionClosed:
            if rec.outcome == "running":
                rec.outcome, rec.finished = "disconnected", time.time()
        except asyncio.CancelledError:
            if rec.outcome == "running":
                rec.outcome, rec.finished = "cancelled", time.time()
            raise
