"""LocalStack: a private redis-server and a hub, started and stopped in one call.

    stack = LocalStack()                      # temp dir, free ports, nothing persisted
    workers = stack.add_workers(machines=2, gpus=4, run_time=0.05)
    job_id = stack.submit("image_generation", priority=5)
    stack.close()                             # or: with LocalStack() as stack: ...

The hub runs on a private event loop in a daemon thread, so the same calls work in a
script and in a notebook cell (where the kernel's own loop keeps running; use
``await stack.client()`` or ``MockWorker(hub=stack)`` there for async work). Every
stack is closed at interpreter exit; ``close()`` is idempotent. In a notebook the
stack shows a card with its URLs, workers, queue depth and throughput.
"""

from __future__ import annotations

import asyncio
import atexit
import html
import threading
import weakref
from collections.abc import Coroutine
from dataclasses import replace
from types import TracebackType
from typing import Any, TypeVar

from redisq_server import EngineLimits, RedisService, Settings
from redisq_server.main import Hub

from .client import QueueClient
from .mock_worker import MockWorker
from .redis_process import RedisNotInstalled, RedisProcess

__all__ = ["LocalStack", "RedisNotInstalled"]

T = TypeVar("T")

#: seconds the card's "throughput now" averages over
RATE_NOW_S = 5.0


def _since_start(s: dict[str, Any]) -> str:
    """Jobs completed per second since the stack's hub started (server clock)."""
    if s.get("since") is None:
        return "-"
    elapsed = max(1e-3, s["time"] - s["since"])
    done = s["totals"]["completed"]
    return f"{done / elapsed:.1f} jobs/s ({done} in {elapsed:.1f} s)"


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
        self._closed = False
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
    def closed(self) -> bool:
        return self._closed

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the stack's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def service(self) -> RedisService:
        """A new sync :class:`RedisService` on this stack (close it when done)."""
        return RedisService(url=self.redis_url, limits=self.settings.limits)

    def submit(
        self,
        job_type: str = "default",
        priority: int = 0,
        params: dict[str, Any] | None = None,
        **kw: Any,
    ) -> str:
        """Submit one job straight into the queue (no socket); returns its id."""
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
        start = len(self.workers)
        new = [
            MockWorker(f"{prefix}{start + i + 1}", gpus, hub=self, **mock) for i in range(machines)
        ]
        for w in new:
            self._call(w.start())
            self.workers.append(w)
        return new

    def stop_workers(self) -> None:
        """Stop every MockWorker started with :meth:`add_workers`."""
        for w in self.workers:
            self._call(w.stop())
        self.workers.clear()

    def close(self) -> None:
        """Stop the workers, the hub and redis-server; remove the temp dir. Idempotent."""
        if self._closed:
            return
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

    def _summary(self) -> dict[str, Any]:
        if self._closed:
            return {}
        try:
            return self.stats(RATE_NOW_S)
        except Exception:  # a card must render even if Redis is gone
            return {}

    def _repr_html_(self) -> str:
        s = self._summary()
        rows = [
            ("Hub", f"<code>{html.escape(self.hub_url)}</code>"),
            ("Redis", f"<code>{html.escape(self.redis_url)}</code>"),
            ("Namespace", html.escape(self.namespace)),
            ("State", "closed" if self._closed else "running"),
        ]
        if s:
            rows += [
                ("Workers", f"{s['workers']} ({s['workers_busy']} busy, {s['workers_idle']} idle)"),
                ("Queued", str(s["queued"])),
                ("Running", str(s["running"])),
                ("Completed", str(s["totals"]["completed"])),
                (
                    "Throughput now",
                    f"{s['throughput_per_s']:.1f} jobs/s (last {s['window_s']:.3g} s)",
                ),
                ("Since start", _since_start(s)),
            ]
        body = "".join(
            f"<tr><th style='text-align:left;padding-right:1em'>{k}</th><td style='text-align:left'>{v}</td></tr>"
            for k, v in rows
        )
        return (
            "<div style='border:1px solid #ccc;border-radius:6px;padding:8px;display:inline-block'>"
            f"<strong>redisq LocalStack</strong><table>{body}</table></div>"
        )

    def card(self, interval: float = 0.5) -> Any:
        """A live version of the card (an ipywidgets HTML) refreshed every
        ``interval`` seconds from a task on the caller's running loop; call
        ``.stop()`` on the returned widget to end the refresh."""
        from .widgets import LiveHTML

        return LiveHTML(self._repr_html_, interval)
