"""LocalStack: a private redis-server and a hub, started and stopped in one call.

    stack = LocalStack()                      # temp dir, free ports, nothing persisted
    workers = stack.add_workers(machines=2, gpus=4, run_time=0.05)
    job_id = stack.submit("image_generation", priority=5)
    stack.close()                             # or: with LocalStack() as stack: ...

The hub runs on a private event loop in a daemon thread, so the same calls work in a
script and in a notebook cell (where the kernel's own loop keeps running; use
``await stack.client()`` or ``MockWorker(hub=stack)`` there for async work). Every
stack is closed at interpreter exit; ``close()`` is idempotent. ``scale()`` adds or
stops mock machines from a cell.

In a notebook the stack shows a live card (refreshed twice a second until the stack
closes): its URLs, a link to the hub's own dashboard page, workers, queue depth, the
throughput now and since start, and a per-machine and per-GPU breakdown that folds
open. Elsewhere (a saved page, nbconvert) the same card is static HTML.
"""

from __future__ import annotations

import asyncio
import atexit
import html
import itertools
import sys
import threading
import weakref
from collections.abc import Coroutine
from dataclasses import replace
from types import TracebackType
from typing import Any, TypeVar

from redisq_server import EngineLimits, RedisService, Settings, WorkerModel
from redisq_server.main import Hub

from .client import QueueClient
from .frames import policy_text
from .mock_worker import MockWorker
from .redis_process import RedisNotInstalled, RedisProcess

__all__ = ["LocalStack", "RedisNotInstalled"]

T = TypeVar("T")

#: seconds the card's "throughput now" averages over
RATE_NOW_S = 5.0
#: seconds between refreshes of the live card
CARD_INTERVAL_S = 0.5
#: GPU rows the card's breakdown lists before it says how many more there are
CARD_GPU_ROWS = 64
_TH = "<th style='text-align:left;padding-right:1em'>"
_TD = "<td style='text-align:left;padding-right:1em'>"
_LINK = "color:#1565c0;text-decoration:underline"


def _since_start(s: dict[str, Any]) -> str:
    """Jobs completed per second since the stack's hub started (server clock)."""
    if s.get("since") is None:
        return "-"
    elapsed = max(1e-3, s["time"] - s["since"])
    done = s["totals"]["completed"]
    return f"{done / elapsed:.1f} jobs/s ({done} in {elapsed:.1f} s)"


def _rows(rows: list[tuple[str, str]]) -> str:
    return "".join(f"<tr>{_TH}{k}</th>{_TD}{v}</td></tr>" for k, v in rows)


def _table(head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    th = "".join(f"{_TH}{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"{_TD}{v}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _breakdown(workers: list[WorkerModel]) -> tuple[str, str]:
    """The fold's title and body: workers per machine, then per GPU."""
    if not workers:
        return "Workers: none connected", "<p>No GPU worker is connected.</p>"
    machines: dict[str, list[WorkerModel]] = {}
    for w in workers:
        machines.setdefault(w.machine_id, []).append(w)
    title = f"Workers: {_count(len(machines), 'machine')}, {_count(len(workers), 'GPU')}"
    per_machine = [
        (
            html.escape(m),
            len(ws),
            sum(w.status == "busy" for w in ws),
            sum(w.status == "idle" for w in ws),
            sum(w.jobs_done for w in ws),
            sum(w.jobs_failed for w in ws),
        )
        for m, ws in sorted(machines.items())
    ]
    per_gpu = [
        (
            html.escape(w.worker_id),
            w.status.value,
            f"<code>{html.escape(w.current_job[:8])}</code>" if w.current_job else "-",
            w.jobs_done,
            w.jobs_failed,
        )
        for w in sorted(workers, key=lambda w: w.worker_id)[:CARD_GPU_ROWS]
    ]
    more = len(workers) - len(per_gpu)
    return title, (
        "<strong>By machine</strong>"
        + _table(("machine", "GPUs", "busy", "idle", "jobs done", "jobs failed"), per_machine)
        + "<strong>By GPU</strong>"
        + _table(("GPU", "status", "job", "jobs done", "jobs failed"), per_gpu)
        + (f"<p>... and {more} more GPUs</p>" if more > 0 else "")
    )


def _in_kernel() -> bool:
    """True in a Jupyter kernel that is running a cell (it can show live widgets)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if getattr(shell, "kernel", None) is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


_live: weakref.WeakSet[LocalStack] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for stack in list(_live):
        stack.close()


class LocalStack:
    """A redis-server child process and an in-process hub, private to this object.

    ``namespace`` and any :class:`~redisq_server.EngineLimits` field (``lease_s``,
    ``result_ttl_s``, ``max_lost``, ...) configure the queue; ``hub_port=0`` picks a
    free port. Raises :class:`RedisNotInstalled` (with install instructions) when
    ``redis-server`` is missing.
    """

    def __init__(
        self,
        *,
        namespace: str = "redisq",
        hub_host: str = "127.0.0.1",
        hub_port: int = 0,
        redis_port: int | None = None,
        appendonly: bool = False,
        debug: bool = False,
        **limits: Any,
    ) -> None:
        self.redis = RedisProcess(redis_port, appendonly=appendonly)
        self.namespace = namespace
        self.workers: list[MockWorker] = []
        # prefix, GPUs and MockWorker options for machines that scale() adds
        self._new_machines: tuple[str, int, dict[str, Any]] = ("machine", 2, {})
        self._closed = False
        self._at_close: tuple[dict[str, Any], list[WorkerModel]] = ({}, [])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="redisq-local-stack", daemon=True
        )
        self.redis.start()
        try:
            self.settings = Settings(
                redis_url=self.redis.url,
                hub_host=hub_host,
                hub_port=hub_port,
                limits=replace(EngineLimits(namespace=namespace), **limits),
                debug=debug,
            )
            self.hub = Hub(self.settings)
            self._thread.start()
            self._call(self.hub.start())
        except BaseException:
            self.close()
            raise
        _live.add(self)

    # ------------------------------------------------------------- basics

    @property
    def hub_url(self) -> str:
        return self.hub.url

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def dashboard_url(self) -> str:
        """``http://host:port/dashboard``: the page the hub itself serves (it outlives
        kernel restarts and page reloads)."""
        host = self.settings.hub_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.hub.port}/dashboard"

    @property
    def closed(self) -> bool:
        return self._closed

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the stack's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def service(self) -> RedisService:
        """A new sync :class:`RedisService` on this stack (close it when done); a
        :class:`~redisq_server.sharding.ShardedRedisService` for a sharded namespace."""
        if self.settings.limits.shards == 1:
            return RedisService(url=self.redis_url, limits=self.settings.limits)
        from redisq_server.sharding import open_service

        return open_service(self.redis_url, limits=self.settings.limits)

    def submit(
        self,
        job_type: str = "default",
        priority: int = 0,
        params: dict[str, Any] | None = None,
        **kw: Any,
    ) -> str:
        """Submit one job straight into the queue (no socket); returns its id.
        ``kw``: ``RedisService.add_job``'s (``client_id``, ``max_attempts``,
        ``delay_s``, ``run_at``, ...); a delayed job submitted here reaches the hub's
        promoter within a second of its time (a client's submit wakes it at once)."""
        with self.service() as svc:
            return svc.add_job(job_type=job_type, priority=priority, params=params, **kw).job_id

    def stats(self, window_s: float = 60.0) -> dict[str, Any]:
        """The engine's stats (``RedisService.get_stats``); ``throughput_per_s`` is
        over the last ``window_s`` seconds or since the stack started, whichever is
        shorter (``window_s`` in the result says which)."""
        with self.service() as svc:
            return svc.get_stats(window_s)

    def client(self, client_id: str | None = None) -> QueueClient:
        """A :class:`QueueClient` for this stack: ``async with stack.client() as c``."""
        return QueueClient(self, client_id)

    def add_workers(
        self, machines: int = 1, gpus: int = 2, *, prefix: str = "machine", **mock: Any
    ) -> list[MockWorker]:
        """Start ``machines`` MockWorkers with ``gpus`` GPUs each on the stack's loop
        (``mock`` goes to :class:`MockWorker`); they stop with the stack."""
        self._new_machines = (prefix, gpus, dict(mock))
        taken = {w.machine_id for w in self.workers}
        names = (f"{prefix}{n}" for n in itertools.count(len(self.workers) + 1))
        new = [
            MockWorker(name, gpus, hub=self, **mock)
            for name in itertools.islice((n for n in names if n not in taken), machines)
        ]
        for w in new:
            self._call(w.start())
            self.workers.append(w)
        return new

    def scale(
        self, machines: int | None = None, gpus: int | None = None, **mock: Any
    ) -> list[MockWorker]:
        """Add or stop mock machines until ``machines`` of them run with ``gpus`` GPUs
        each; returns the running machines (also in :attr:`workers`).

        ``machines`` defaults to the number running now, ``gpus`` and ``mock`` (the
        :class:`MockWorker` options) to those of the last :meth:`add_workers` or
        ``scale`` call. Machines with another GPU count are replaced, the newest
        stopped first. Stopping a machine closes its GPU sockets: the hub requeues
        their jobs at their old positions. Returns once every new GPU registered and
        every stopped one closed its socket; the hub drops a stopped GPU from its
        worker list as it sees the socket close (wait on ``WorkerMonitor`` to see it).
        Only machines started by this stack count."""
        prefix, last_gpus, last_mock = self._new_machines
        gpus = last_gpus if gpus is None else gpus
        machines = len(self.workers) if machines is None else machines
        if machines < 0 or gpus < 1:
            raise ValueError("machines must be >= 0 and gpus >= 1")
        keep = [w for w in self.workers if w.gpu_count == gpus][:machines]
        for w in reversed(self.workers):
            if w not in keep:
                self._call(w.stop(), 30)
        self.workers = keep
        self.add_workers(machines - len(keep), gpus, prefix=prefix, **(mock or last_mock))
        return list(self.workers)

    def stop_workers(self) -> None:
        """Stop every MockWorker started with :meth:`add_workers`."""
        for w in self.workers:
            self._call(w.stop())
        self.workers.clear()

    def close(self) -> None:
        """Stop the workers, the hub and redis-server; remove the temp dir. Idempotent."""
        if self._closed:
            return
        self._at_close = self._read_card()  # the card keeps showing the final figures
        self._closed = True
        try:
            if self._thread.is_alive():
                for w in self.workers:
                    self._call(w.stop(), 30)
                if self.hub.server is not None:
                    self._call(self.hub.stop(), 30)
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
            if not self._loop.is_running():
                self._loop.close()
        finally:
            self.redis.stop()
            _live.discard(self)

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> LocalStack:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    # ------------------------------------------------------------ display

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        return f"<LocalStack {state} hub={self.hub_url} redis={self.redis_url} namespace={self.namespace}>"

    def _read_card(self) -> tuple[dict[str, Any], list[WorkerModel]]:
        """The stats and live workers the card shows; once closed, those read as the
        stack closed (({}, []) when Redis cannot be read)."""
        if self._closed:
            return self._at_close
        try:
            with self.service() as svc:
                return svc.get_stats(RATE_NOW_S), svc.get_workers()
        except Exception:  # a card must render even if Redis is gone
            return {}, []

    def _card_parts(self) -> tuple[str, str, str]:
        """The card as (summary table, breakdown title, breakdown body)."""
        s, workers = self._read_card()
        link = html.escape(self.dashboard_url)
        rows = [
            ("Hub", f"<code>{html.escape(self.hub_url)}</code>"),
            ("Redis", f"<code>{html.escape(self.redis_url)}</code>"),
            ("Namespace", html.escape(self.namespace)),
            ("State", "closed" if self._closed else "running"),
            ("Dashboard", f"<a href='{link}' target='_blank' style='{_LINK}'>{link}</a>"),
            ("Policy", html.escape(policy_text(self.settings.limits.policy))),
        ]
        if s:
            rows += [
                ("Workers", f"{s['workers']} ({s['workers_busy']} busy, {s['workers_idle']} idle)"),
                ("Queued", str(s["queued"])),
                ("Running", str(s["running"])),
                ("Scheduled", str(s["scheduled"])),
                ("Completed", str(s["totals"]["completed"])),
                (
                    "Throughput now",
                    f"{s['throughput_per_s']:.1f} jobs/s (last {s['window_s']:.3g} s)",
                ),
                ("Since start", _since_start(s)),
            ]
        summary = f"<strong>redisq LocalStack</strong><table>{_rows(rows)}</table>"
        title, body = _breakdown(workers)
        if self._closed and workers:
            title += " (as the stack closed)"
        return summary, title, body

    def _repr_html_(self) -> str:
        """The static card: the breakdown folds open as an HTML ``<details>``."""
        summary, title, body = self._card_parts()
        return (
            "<div style='border:1px solid #ccc;border-radius:6px;padding:8px;display:inline-block'>"
            f"{summary}<details><summary>{html.escape(title)}</summary>{body}</details></div>"
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """In a Jupyter kernel: the live card (:meth:`card`) with the static card as
        its ``text/html`` fallback; elsewhere the static card only."""
        static = {"text/plain": repr(self), "text/html": self._repr_html_()}
        if self._closed or not _in_kernel():
            return static
        bundle: dict[str, Any] = self.card()._repr_mimebundle_(**kwargs)
        return {**bundle, **static}

    def card(self, interval: float = CARD_INTERVAL_S) -> Any:
        """The live card (an ipywidgets box) refreshed every ``interval`` seconds from
        a task on the caller's running loop, until the stack closes; its worker
        breakdown folds open and stays open across refreshes. Call ``.stop()`` on it
        to end the refresh sooner. Displaying the stack in a notebook shows one."""
        from .widgets import LiveCard

        return LiveCard(
            self._card_parts,
            interval,
            done=lambda: self._closed,
            layout={"border": "1px solid #ccc", "padding": "4px 8px", "width": "fit-content"},
        )
