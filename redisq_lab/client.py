"""An asyncio client for the hub: submit jobs, await results, follow updates.

    async with QueueClient(stack) as client:            # or QueueClient("ws://127.0.0.1:8000")
        job_id = await client.submit("render", priority=5, params={"prompt": "a sunset"})
        result = await client.result(job_id)            # raises JobFailed on failure
        async for update in client.follow(other_id):    # job_update ... until finished
            print(update["status"], update.get("progress"))

One socket, one reader task. Requests carry an ``id``; replies are matched by
``ref``. Every job this socket submits or subscribes to has a :class:`JobTrace`
recording when each step was seen *at the client* (monotonic seconds), which is
what the load generator and the latency notebooks measure.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from redisq_server import JobStatus, protocol
from redisq_server.protocol import MessageType

from ._source import hub_url_of

__all__ = ["JobFailed", "JobTrace", "QueueClient", "RequestError", "progress_bar"]

_FOLLOWED = frozenset({*protocol.FINAL_MESSAGES, MessageType.JOB_UPDATE})


def progress_bar(total: int, label: bool | str = True, default: str = "jobs") -> Any:
    """A ``tqdm.auto`` bar of ``total`` jobs: an ipywidgets bar in a notebook, a text
    line on stderr elsewhere, labelled ``label`` when it is a string, else
    ``default``. Call ``update(n)`` as jobs advance and ``close()`` at the end.
    Needs ``tqdm`` (the ``lab`` extra)."""
    from tqdm.auto import tqdm

    desc = label if isinstance(label, str) else default
    return tqdm(total=total, desc=desc, unit="job", leave=True, dynamic_ncols=True)


class RequestError(Exception):
    """The hub answered a request with an ``error`` frame."""

    def __init__(self, reply: Mapping[str, Any]) -> None:
        super().__init__(f"{reply.get('code')}: {reply.get('message')}")
        self.code = str(reply.get("code"))
        self.message = str(reply.get("message"))
        self.reply = dict(reply)


class JobFailed(Exception):
    """The job failed for good (or was cancelled); ``error`` says why."""

    def __init__(self, job_id: str, error: str | None, status: str = "failed") -> None:
        super().__init__(f"job {job_id} {status}: {error}")
        self.job_id = job_id
        self.error = error
        self.status = status


@dataclass
class JobTrace:
    """What one client saw of one job; times are ``time.monotonic()`` seconds."""

    job_id: str
    submitted: float | None = None
    accepted: float | None = None
    assigned: float | None = None
    running: float | None = None
    finished: float | None = None
    status: str | None = None
    result: Any = None
    error: str | None = None
    updates: int = 0
    done: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def as_row(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status,
            "submitted": self.submitted,
            "accepted": self.accepted,
            "assigned": self.assigned,
            "running": self.running,
            "finished": self.finished,
            "updates": self.updates,
            "error": self.error,
        }


class QueueClient:
    """One client socket to a hub. ``source`` is a hub URL (``ws://host:port``) or
    anything with a ``hub_url`` (a local stack). Use ``async with`` or call
    :meth:`connect` and :meth:`close`.
    """

    def __init__(
        self,
        source: Any = None,
        client_id: str | None = None,
        *,
        token: str | None = None,
        request_timeout: float = 30.0,
    ) -> None:
        self.hub_url = hub_url_of(source)
        self.client_id = client_id or f"client-{secrets.token_hex(4)}"
        self.token = token
        self.request_timeout = request_timeout
        self.ws: ClientConnection | None = None
        self.welcome: dict[str, Any] = {}
        self.traces: dict[str, JobTrace] = {}
        self._ids = itertools.count(1)
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._followers: dict[str, list[asyncio.Queue[dict[str, Any]]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> QueueClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self.ws = await connect(
            f"{self.hub_url}/ws/client/{self.client_id}",
            additional_headers=headers,
            max_size=None,
            compression=None,
        )
        self.welcome = protocol.loads(await self.ws.recv())
        self._reader = asyncio.create_task(self._read(), name=f"client {self.client_id}")
        return self

    async def close(self) -> None:
        """Close the socket. Idempotent."""
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None

    async def __aenter__(self) -> QueueClient:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------ requests

    async def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send ``message`` with a fresh ``id``; return its reply or raise RequestError."""
        if self.ws is None:
            raise RuntimeError("call connect() first")
        rid = str(next(self._ids))
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        try:
            await self.ws.send(protocol.encode({**message, "id": rid}))
            reply = await asyncio.wait_for(fut, self.request_timeout)
        finally:
            self._replies.pop(rid, None)
        if reply.get("type") == MessageType.ERROR:
            raise RequestError(reply)
        return reply

    async def submit(
        self,
        job_type: str,
        priority: int = 0,
        params: Mapping[str, Any] | None = None,
        *,
        job_id: str | None = None,
        max_attempts: int | None = None,
        delay_s: float | None = None,
        run_at: float | None = None,
    ) -> str:
        """Submit a job and return its id once the hub accepted it.

        ``delay_s`` (seconds) or ``run_at`` (Unix seconds by the Redis server's
        clock), not both: the job is ``scheduled`` until then, then queued.
        Await :meth:`result` (or iterate :meth:`follow`) to learn how it ends.
        """
        job_id = job_id or secrets.token_hex(16)
        trace = self.traces[job_id] = JobTrace(job_id, submitted=time.monotonic())
        msg = protocol.submit_job(
            job_type,
            priority,
            params,
            job_id=job_id,
            max_attempts=max_attempts,
            delay_s=delay_s,
            run_at=run_at,
        )
        try:
            reply = await self.request(msg)
        except BaseException:
            self.traces.pop(job_id, None)
            raise
        trace.status = trace.status or reply["status"]
        return job_id

    async def submit_many(
        self,
        jobs: Iterable[Mapping[str, Any]],
        *,
        concurrency: int = 64,
        progress: bool | str = False,
    ) -> list[str]:
        """Submit many jobs (dicts of :meth:`submit`'s arguments) with up to
        ``concurrency`` requests in flight; returns their ids in order, once the hub
        accepted them all. ``progress=True`` (or a label) shows a bar of accepted
        jobs (see :func:`progress_bar`). Then await :meth:`results` for their outcomes."""
        specs = list(jobs)
        sem = asyncio.Semaphore(concurrency)
        bar = progress_bar(len(specs), progress, "submitted") if progress else None

        async def one(spec: Mapping[str, Any]) -> str:
            async with sem:
                job_id = await self.submit(**spec)
            if bar is not None:
                bar.update(1)
            return job_id

        try:
            return list(await asyncio.gather(*(one(j) for j in specs)))
        finally:
            if bar is not None:
                bar.close()

    async def results(
        self,
        job_ids: Iterable[str],
        *,
        timeout: float | None = None,
        progress: bool | str = False,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Wait for every job of ``job_ids`` to finish; returns their results in order.

        ``timeout`` bounds the whole wait (``TimeoutError``). A failed or cancelled
        job raises its :class:`JobFailed` at once, unless ``return_exceptions=True``
        (then the exception stands in the job's place and the wait goes on).
        ``progress=True`` (or a label) shows a bar of finished jobs (see
        :func:`progress_bar`)."""
        tasks = [asyncio.ensure_future(self.result(j)) for j in job_ids]
        bar = progress_bar(len(tasks), progress, "finished") if progress else None
        if bar is not None:
            for task in tasks:
                task.add_done_callback(lambda t: t.cancelled() or bar.update(1))
        waiting = asyncio.gather(*tasks, return_exceptions=return_exceptions)
        try:
            return list(await asyncio.wait_for(waiting, timeout))
        finally:
            for task in tasks:  # still waiting after a failure or the timeout
                task.cancel()
            if bar is not None:
                bar.close()

    async def result(self, job_id: str, timeout: float | None = None) -> Any:
        """Wait for the job's result. Raises :class:`JobFailed` if it failed or was
        cancelled. Subscribes first when this socket did not submit the job."""
        trace = self.traces.get(job_id)
        if trace is None:
            await self.subscribe(job_id)
            trace = self.traces[job_id]
        return await asyncio.wait_for(asyncio.shield(trace.done), timeout)

    async def subscribe(self, job_id: str) -> dict[str, Any]:
        """Follow a job this client owns (submitted from any socket)."""
        self.traces.setdefault(job_id, JobTrace(job_id))
        return await self.request(protocol.subscribe_job(job_id))

    async def follow(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Yield every update of ``job_id`` from now on, ending with its final one."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._followers.setdefault(job_id, []).append(queue)
        try:
            if job_id not in self.traces:
                await self.subscribe(job_id)
            trace = self.traces[job_id]
            if trace.done.done():
                return
            while True:
                update = await queue.get()
                yield update
                if (
                    update["type"] in protocol.FINAL_MESSAGES
                    or update.get("status") == JobStatus.CANCELLED
                ):
                    return
        finally:
            self._followers[job_id].remove(queue)
            if not self._followers[job_id]:
                del self._followers[job_id]

    async def status(self, job_id: str) -> dict[str, Any]:
        return await self.request(protocol.get_job_status(job_id))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self.request(protocol.cancel_job(job_id))

    async def stats(self) -> dict[str, Any]:
        return await self.request(protocol.get_stats())

    async def events_since(self, since: str = "0", limit: int = 1000) -> dict[str, Any]:
        """This client's events after ``since`` (for catching up after a reconnect)."""
        return await self.request(protocol.get_events(since, limit))

    # -------------------------------------------------------------- reader

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for raw in self.ws:
                self._dispatch(protocol.loads(raw))
        except ConnectionClosed:
            pass
        finally:
            err = ConnectionError("connection to the hub closed")
            for fut in self._replies.values():
                if not fut.done():
                    fut.set_exception(err)
            for trace in self.traces.values():
                if not trace.done.done():
                    trace.done.set_exception(err)
                    trace.done.exception()  # retrieved: no "never retrieved" warning

    def _dispatch(self, msg: dict[str, Any]) -> None:
        ref = msg.get("ref")
        kind = msg.get("type")
        if kind == MessageType.JOB_ACCEPTED:
            # stamped on arrival: updates that follow may be read before the
            # submitting coroutine resumes
            trace = self.traces.get(msg.get("job_id", ""))
            if trace is not None:
                trace.accepted = time.monotonic()
                if msg.get("status") == JobStatus.ASSIGNED and trace.assigned is None:
                    trace.assigned = trace.accepted
        if ref is not None and ref in self._replies:
            fut = self._replies[ref]
            if not fut.done():
                fut.set_result(msg)
            if kind != MessageType.SUBSCRIBED:
                return
        job_id = msg.get("job_id")
        if not isinstance(job_id, str) or kind not in _FOLLOWED:
            return
        trace = self.traces.get(job_id)
        if trace is not None:
            self._record(trace, msg)
        for queue in self._followers.get(job_id, ()):
            queue.put_nowait(msg)

    @staticmethod
    def _record(trace: JobTrace, msg: dict[str, Any]) -> None:
        now = time.monotonic()
        trace.updates += 1
        kind = msg["type"]
        if kind == MessageType.JOB_UPDATE:
            status = msg.get("status")
            trace.status = status
            if status == JobStatus.ASSIGNED and trace.assigned is None:
                trace.assigned = now
            elif status == JobStatus.RUNNING and trace.running is None:
                trace.running = now
            elif status == JobStatus.CANCELLED and not trace.done.done():
                trace.finished = now
                trace.done.set_exception(JobFailed(trace.job_id, "cancelled", "cancelled"))
                trace.done.exception()
            return
        trace.finished = now
        if trace.done.done():
            return
        if kind == MessageType.JOB_COMPLETED:
            trace.status = "completed"
            trace.result = msg.get("result")
            trace.done.set_result(trace.result)
        else:
            trace.status = "failed"
            trace.error = msg.get("error")
            trace.done.set_exception(JobFailed(trace.job_id, trace.error))
            trace.done.exception()
