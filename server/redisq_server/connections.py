"""The hub's live sockets: one :class:`Connection` per socket, indexed by a
:class:`Registry`.

An outbound frame is written to the socket at once while the socket keeps up (its
transport is not paused and nothing waits before it); while its peer has several
requests being answered, the frames of one event-loop turn are joined into one write
at the turn's end. Otherwise a frame waits in the connection's send queue, drained by
one writer task per socket. The queue is bounded twice: in frames and in bytes. When
a reader stops reading and either bound is reached, the socket is closed (code 1008,
"send queue full"): a slow peer can neither grow the hub's memory nor stall the
senders that fan events out to everyone else. A worker closed this way has its job
requeued like any other dropped worker.

What one socket can make the hub hold is therefore bounded: the queue's bytes, plus
one frame in the transport's buffer (a write pauses the transport once its buffer is
over the WebSocket library's high-water mark, 32 KiB, and nothing more is written to
it until it drains), plus the kernel's socket buffer, plus the requests it has in
flight (at most 64 and 1 MiB of frames, each answered with a small frame; see
``Routes.handle``). One frame is always accepted into an empty queue, so a single
frame larger than the byte bound (a large result) is delivered, not refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
from collections.abc import Iterator
from typing import Any, Final

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from .protocol import CloseCode, Role, encode_bytes

__all__ = ["Connection", "Registry"]

log = logging.getLogger("redisq.hub")

CLOSE_TIMEOUT_S = 5.0

_STOP = object()


class Connection:
    """One socket: its role and id, its send queue (at most ``queue_size`` frames and
    ``queue_bytes`` bytes beyond a first frame), and what it is subscribed to.

    Call :meth:`start` once the socket is open and :meth:`finish` when its handler
    ends; in between, :meth:`send` never blocks.
    """

    def __init__(
        self,
        ws: ServerConnection,
        role: Role,
        ident: str,
        queue_size: int,
        queue_bytes: int,
    ) -> None:
        self.ws = ws
        self.role = role
        self.id = ident
        self.session = secrets.token_hex(8)
        self._queue: asyncio.Queue[Any] = asyncio.Queue(queue_size)
        self._queue_bytes = queue_bytes  # the most bytes queued (beyond a first frame)
        self._queued = 0  # bytes of the frames now in the queue
        self._writer: asyncio.Task[None] | None = None
        self._batch = False  # inside batch(): frames wait for one write at its end
        self._batcher = _Batch(self)
        # no extension negotiated (the hub offers none) and no frame logging: a text
        # frame is its header and the payload, built here (see _text_frame)
        self._plain = not ws.protocol.extensions and not ws.protocol.debug
        self._unsent = False  # frames wait in the protocol for a write
        self._deferred = False  # a write is due at the end of this loop turn
        self._writing = False  # the writer holds a frame it has not finished writing
        self._closer: asyncio.Task[None] | None = None
        self.closing = False
        #: requests of this socket being answered while it reads on, by the number
        #: of the request among the socket's (see Routes.handle)
        self.in_flight: dict[int, asyncio.Task[None]] = {}
        self.in_flight_bytes = 0  # the size of their frames
        self.requests = 0  # requests read on this socket
        #: error replies waiting to be sent right after the reply to request number k
        #: (Routes._reply_in_place), so they keep their place among the replies
        self.after: dict[int, list[dict[str, Any]]] = {}
        # clients: jobs whose updates this socket gets; events that arrive while a
        # submit is still being answered wait in `pending` so the reply comes first
        self.jobs: set[str] = set()
        self.pending: dict[str, list[dict[str, Any]]] = {}
        # workers
        self.registered = False
        self.job_types: list[str] = []
        #: (job, attempt) of the jobs pushed to it and not yet reported on: the one it
        #: runs and, with a prefetch window, the one it holds ahead
        self.delivered: list[tuple[str, int]] = []
        self.delivered_n = 0  # the highest assignment number pushed
        self.early: list[dict[str, Any]] = []  # pushes held until worker_registered is sent
        # monitors
        self.events = False
        self.stats_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<{self.role} {self.id}>"

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write(), name=f"writer {self.role} {self.id}")

    def send(self, message: dict[str, Any]) -> bool:
        """Send ``message`` on this socket without blocking. Returns False if it was
        dropped because the socket is closing or its queue is full (which closes it)."""
        return self.send_raw(encode_bytes(message))

    def send_raw(self, frame: str | bytes) -> bool:
        """Like :meth:`send` for an already encoded frame (UTF-8 bytes, or a str)."""
        if self.closing:
            return False
        data = frame.encode() if isinstance(frame, str) else frame
        ws = self.ws
        if (
            not self._writing
            and self._queue.empty()
            and not ws.paused
            and ws.protocol.state is State.OPEN
            and ws.send_in_progress is None
        ):
            # The fast path: what `await ws.send(frame)` does when it need not wait,
            # without a hop through the writer task (order is kept: nothing is queued)
            if self._plain:
                ws.protocol.writes.append(_text_frame(data))
            else:
                ws.protocol.send_text(data)
            self._unsent = True
            if not self._batch:
                self._write_soon()
            return True
        if self._queue.full() or (self._queued and self._queued + len(data) > self._queue_bytes):
            log.warning(
                "%r: send queue full (%d frames, %d bytes); closing",
                self,
                self._queue.qsize(),
                self._queued,
            )
            self.close(CloseCode.SLOW_READER, "send queue full: reader too slow")
            return False
        self._queue.put_nowait(data)
        self._queued += len(data)
        return True

    def batch(self) -> _Batch:
        """``with conn.batch():`` frames sent inside the block leave in one socket
        write, at its end (or with the turn's, see :meth:`_write_soon`)."""
        return self._batcher

    def _write_soon(self) -> None:
        """Write what waits: at once, unless the peer has more requests being
        answered (it sends without waiting for replies, so more frames for it are
        coming in this loop turn): then with the turn's other frames, in one write
        when the turn ends. Under load that is one write per socket per turn
        instead of one per frame; a lone reply still leaves without delay."""
        if len(self.in_flight) <= 1:
            self._unsent = False
            _write_joined(self.ws)
        elif not self._deferred:
            self._deferred = True
            asyncio.get_running_loop().call_soon(self._end_turn)

    def _end_turn(self) -> None:
        self._deferred = False
        if self._unsent:
            self._unsent = False
            # a close, or the writer, may have sent them; a lost socket takes nothing
            if self.ws.protocol.writes and not self.ws.transport.is_closing():
                _write_joined(self.ws)

    def close(self, code: int, reason: str) -> None:
        """Close the socket soon, without waiting (safe to call from any task).

        The writer is stopped first: it may be stuck waiting for a peer that does not
        read, and the close frame must not wait behind it. A peer that does not answer
        the close within a few seconds has its transport aborted.
        """
        if self.closing:
            return
        self.closing = True
        if self._writer is not None:
            self._writer.cancel()
        self._closer = asyncio.create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code, reason), CLOSE_TIMEOUT_S)
        except (TimeoutError, ConnectionClosed):
            self.ws.transport.abort()

    async def _write(self) -> None:
        try:
            while True:
                frame = await self._queue.get()
                if frame is _STOP:
                    return
                self._queued -= len(frame)
                self._writing = True
                await self.ws.send(frame, text=True)
                self._writing = False
        except ConnectionClosed:
            pass

    async def finish(self) -> None:
        """Flush what is queued (bounded by the close timeout) and stop the writer."""
        self.closing = True
        if self.stats_task is not None:
            self.stats_task.cancel()
        if self._writer is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(_STOP)
            if self._queue.full():
                self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._writer, timeout=5)

    # -- client subscriptions
    def subscribe(self, job_id: str, pending: bool = False) -> None:
        self.jobs.add(job_id)
        if pending:
            self.pending[job_id] = []

    def release_pending(self, job_id: str, keep: bool) -> None:
        """A submit was answered: deliver what waited (``keep``) or forget the job."""
        waiting = self.pending.pop(job_id, [])
        if keep:
            for m in waiting:
                self.send(m)
        else:
            self.jobs.discard(job_id)

    def deliver(self, job_id: str, message: dict[str, Any]) -> None:
        if job_id in self.pending:
            self.pending[job_id].append(message)
        else:
            self.send(message)


class _Batch:
    """What :meth:`Connection.batch` returns: a plain context manager (a block per
    job on the hot path; ``contextlib.contextmanager`` costs about 1.4 us more)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn._batch = True

    def __exit__(self, *_: object) -> None:
        conn = self._conn
        conn._batch = False
        if conn._unsent:
            conn._write_soon()


def _text_frame(data: bytes) -> bytes:
    """A server's unfragmented, unmasked text frame of ``data`` (RFC 6455 5.2): what
    websockets' ``send_text`` puts in its protocol's ``writes`` when no extension
    is in use, without its frame object and checks (3 % of the hub's instructions
    per drained job, 5 % one at a time: benchmarks/hub_instructions.py)."""
    n = len(data)
    if n < 126:
        return _HEAD_SHORT[n] + data
    if n < 65_536:
        return _HEAD_16.pack(0x81, 126, n) + data
    return _HEAD_64.pack(0x81, 127, n) + data


_HEAD_SHORT: Final = [bytes((0x81, n)) for n in range(126)]
_HEAD_16: Final = struct.Struct("!BBH")
_HEAD_64: Final = struct.Struct("!BBQ")


def _write_joined(ws: ServerConnection) -> None:
    """``ws.send_data()``, with the frames waiting in the protocol joined into one
    transport write (``send_data`` writes each frame with a syscall of its own)."""
    chunks = ws.protocol.data_to_send()
    pending: list[bytes] = []
    for data in chunks:
        if data:
            pending.append(data)
            continue
        # an empty chunk asks for a half-close after what came before: as send_data
        if pending:
            ws.transport.write(b"".join(pending))
            pending = []
        if ws.transport.can_write_eof():
            with contextlib.suppress(Exception):
                ws.transport.write_eof()
        else:
            ws.transport.close()
    if pending:
        ws.transport.write(b"".join(pending))


class Registry:
    """Every live socket of this hub, indexed for routing events."""

    def __init__(self) -> None:
        self.clients: dict[str, set[Connection]] = {}
        self.workers: dict[str, Connection] = {}
        self.monitors: set[Connection] = set()
        self.job_subs: dict[str, set[Connection]] = {}
        self.count = 0

    def __iter__(self) -> Iterator[Connection]:
        for conns in self.clients.values():
            yield from conns
        yield from self.workers.values()
        yield from self.monitors

    def add(self, conn: Connection) -> None:
        """Index a new socket (workers are indexed when they register)."""
        self.count += 1
        if conn.role is Role.CLIENT:
            self.clients.setdefault(conn.id, set()).add(conn)
        elif conn.role is Role.MONITOR:
            self.monitors.add(conn)

    def add_worker(self, conn: Connection) -> Connection | None:
        """Index a registered worker; returns a replaced older socket, if any."""
        old = self.workers.get(conn.id)
        self.workers[conn.id] = conn
        return old if old is not conn else None

    def remove_worker(self, conn: Connection) -> None:
        if self.workers.get(conn.id) is conn:
            del self.workers[conn.id]

    def remove(self, conn: Connection) -> None:
        self.count -= 1
        if conn.role is Role.CLIENT:
            peers = self.clients.get(conn.id)
            if peers is not None:
                peers.discard(conn)
                if not peers:
                    del self.clients[conn.id]
            for job_id in conn.jobs:
                subs = self.job_subs.get(job_id)
                if subs is not None:
                    subs.discard(conn)
                    if not subs:
                        del self.job_subs[job_id]
            conn.jobs.clear()
        elif conn.role is Role.WORKER:
            self.remove_worker(conn)
        else:
            self.monitors.discard(conn)

    def subscribe(self, conn: Connection, job_id: str, pending: bool = False) -> None:
        conn.subscribe(job_id, pending)
        self.job_subs.setdefault(job_id, set()).add(conn)

    def unsubscribe(self, conn: Connection, job_id: str) -> None:
        conn.jobs.discard(job_id)
        conn.pending.pop(job_id, None)
        subs = self.job_subs.get(job_id)
        if subs is not None:
            subs.discard(conn)
            if not subs:
                del self.job_subs[job_id]

    def drop_job(self, job_id: str) -> None:
        """A job finished: forget every subscription to it."""
        for conn in self.job_subs.pop(job_id, ()):
            conn.jobs.discard(job_id)
