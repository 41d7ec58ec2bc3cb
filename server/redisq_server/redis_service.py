"""RedisService: the only code that talks to Redis.

Every state change is one Lua function of the engine's library (:mod:`.scripts`,
loaded into Redis by the first call that finds it missing), so each transition of
the job state machine is atomic. Each call is built as a plain
:class:`~redisq_server.operations.Op` (validated first: bad input raises
:class:`~redisq_server.protocol.ProtocolError` and writes nothing) and run by one
of two thin shells with the same method names: :class:`AsyncRedisService` (the
hub, async tools) and :class:`RedisService` (the blocking facade used by monitors,
scripts and the seed's example; ``add_job`` is the seed's name for
``submit_job``).
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

import redis
import redis.asyncio as aredis
from redis.exceptions import BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .config import EngineLimits
from .keys import Keys
from .models import TERMINAL_STATUSES, JobModel, WorkerModel
from .operations import (
    Assignment,
    CancelResult,
    Event,
    FinishResult,
    Op,
    Operations,
    Renewal,
    SubmitResult,
    engine_error,
    event_from_entry,
    event_id_key,
)
from .protocol import ErrorCode, ProtocolError, validate_limit, validate_worker_id
from .redis_client import CALL_TIMEOUT_S, connect_async, connect_sync, resolve_url
from .scripts import function_name, library_source

__all__ = [
    "EVENTS_LIMIT",
    "PIPELINE_CALLS",
    "PIPELINE_DEPTH",
    "AsyncRedisService",
    "RedisService",
    "resolve_limits",
]

T = TypeVar("T")

#: events one ``events_since`` call returns unless told otherwise
EVENTS_LIMIT: Final = 10_000


def resolve_limits(limits: EngineLimits | None, namespace: str | None) -> EngineLimits:
    """``limits`` (the environment's when None) with ``namespace`` if given."""
    limits = limits or EngineLimits.from_env()
    return replace(limits, namespace=namespace) if namespace is not None else limits


def _after(since: str) -> tuple[str, str]:
    """XRANGE bounds for the entries strictly after ``since`` (``0``: all)."""
    return ("-" if since in ("0", "") else f"({since}"), "+"


def _bulk(arg: str | bytes | int | float) -> bytes:
    """One argument as a RESP bulk string, encoded as redis-py encodes it."""
    if isinstance(arg, str):
        data = arg.encode()
    elif isinstance(arg, bytes):
        data = arg
    elif isinstance(arg, bool):
        raise TypeError("a bool is not a Redis argument")
    elif isinstance(arg, int | float):
        data = repr(arg).encode()
    else:
        raise TypeError(f"not a Redis argument: {type(arg).__name__}")
    return b"$%d\r\n%b\r\n" % (len(data), data)


async def _checkout(pool: Any) -> Any:
    """A connection from redis-py's asyncio ``pool`` (before 5.3 ``get_connection``
    needs a command name; from 5.3 passing one is deprecated)."""
    param = inspect.signature(pool.get_connection).parameters.get("command_name")
    if param is not None and param.default is inspect.Parameter.empty:
        return await pool.get_connection("FCALL")
    return await pool.get_connection()


_READ_RESPONSE: Final = getattr(aredis.connection.AbstractConnection, "read_response", None)

#: per redis-py parser class: the marker its hiredis reader gives while no whole
#: reply is buffered, or None when replies are read through ``read_response``
_INCOMPLETE: dict[type, Any] = {}


def _incomplete_marker(parser: Any) -> Any:
    kind = type(parser)
    if kind not in _INCOMPLETE:
        module = sys.modules.get(kind.__module__)
        usable = hasattr(parser, "_reader") and hasattr(parser, "read_from_socket")
        _INCOMPLETE[kind] = getattr(module, "NOT_ENOUGH_DATA", None) if usable else None
    return _INCOMPLETE[kind]


async def _next_reply(conn: Any) -> Any:
    """The next reply on redis-py connection ``conn``, raised when it is an error
    (as ``conn.read_response(disconnect_on_error=False)`` does; the caller drops a
    connection whose read failed).

    With hiredis' reader (the ``fast`` extra) the reply is taken from it directly:
    ``read_response``'s layers (a per-read timeout this client does not set, push
    messages, health checks) took about 3 % of a drained job's hub instructions.
    A socket error still becomes redis-py's ConnectionError. A redis-py whose
    parser does not look as expected is read through ``read_response``."""
    parser = conn._parser
    incomplete = _incomplete_marker(parser)
    reader = getattr(parser, "_reader", None)
    if (
        incomplete is None  # redis-py's own parser
        or reader is None
        or not getattr(parser, "_connected", False)  # closed: redis-py words the error
        or getattr(conn.read_response, "__func__", None) is not _READ_RESPONSE
    ):  # (the last: a connection class, or a wrapper, that reads its own way)
        return await conn.read_response(disconnect_on_error=False)
    reply = reader.gets()
    while reply is incomplete:
        try:
            await parser.read_from_socket()
        except OSError as exc:
            raise RedisConnectionError(f"Error while reading from Redis: {exc.args}") from exc
        reply = reader.gets()
    if isinstance(reply, RedisConnectionError | ResponseError):
        raise reply
    if isinstance(reply, list) and reply and isinstance(reply[0], RedisConnectionError):
        raise reply[0]
    return reply


def _missing(reply: Any) -> bool:
    """Is ``reply`` Redis saying it has not got the engine's library (a restart
    without persistence, ``FUNCTION FLUSH``, a new version's first call)?"""
    return isinstance(reply, ResponseError) and str(reply).startswith("Function not found")


def _no_reply(seconds: float, what: str) -> RedisTimeoutError:
    """The error of a call (``what``: its function, or the step) that Redis did not
    answer within ``seconds``."""
    return RedisTimeoutError(f"no reply from Redis within {seconds:g} s ({what})")


def _last_id(newest: Sequence[Any]) -> str:
    return str(newest[0][0]) if newest else "0-0"


class _Guard:
    """The deadline of a call its own task waits for (a lone call, a pipeline, a
    read): when it fires, the task is cancelled where it waits, which drops the
    connection (as ``asyncio.timeout`` does, without a loop timer per call)."""

    __slots__ = ("fired", "over", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False  # the deadline passed and the task was cancelled
        self.over = False  # the call has returned or raised: nothing to cancel

    def done(self) -> bool:
        return self.over

    def fire(self) -> None:
        if not self.over and not self.fired:
            self.fired = True
            self.task.cancel()


@dataclass(frozen=True, slots=True)
class _Sent:
    """A pipeline written before its task ran: the connection it went on, the
    calls' replies so far (errors of the calls that could not be packed) and the
    packed calls, by index."""

    conn: Any
    replies: list[Any]
    packed: dict[int, bytes]


@dataclass(frozen=True, slots=True)
class _Rerun:
    """The reply of a call sent again after its first reply was lost with a broken
    connection and then answered: the first run may have run, and the events it made
    for this hub's sockets went with the lost reply (``AsyncRedisService.on_rerun``)."""

    reply: Any


class _Shell:
    """What both shells share: the operations for one namespace and how to call them."""

    ops: Operations
    keys: Keys
    limits: EngineLimits
    #: the hub this service calls for ('' if none). A hub sets it with ``on_events``.
    hub_id: str = ""
    #: gets the events a call produced for the sockets of hub ``hub_id`` (the engine
    #: writes them to no inbox); called before the call returns
    on_events: Callable[[list[Event]], None] | None = None

    def _setup(
        self, client: Any, limits: EngineLimits | None, namespace: str | None, shard: int = 0
    ) -> None:
        self.ops = Operations(resolve_limits(limits, namespace), shard)
        self.keys = self.ops.keys
        self.limits = self.ops.limits

    def _call(self, op: Op[Any]) -> list[Any]:
        """``FCALL`` arguments for ``op``: the function, one key (the routing key: the
        namespace's hash slot), the header (limits and hub id) and the op's own."""
        return [
            function_name(op.script),
            1,
            self.keys.events,
            self.ops.header(self.hub_id),
            *op.args,
        ]

    def _reply(self, op: Op[T], wrapped: Any) -> T:
        """Hand the events for this hub to ``on_events``; parse the reply proper."""
        reply, local = wrapped[0], wrapped[1] if len(wrapped) > 1 else None
        if local and self.on_events is not None:
            self.on_events([Event(i, dict(zip(f[::2], f[1::2], strict=True))) for i, f in local])
        return op.parse(reply)


#: script calls in flight at once before further calls wait to share one pipeline
PIPELINE_DEPTH: Final = 1

#: the most calls one pipeline carries; more wait for the next. A pipeline of every
#: waiting call made the jobs of a busy hub move in waves (Redis ran 100 calls while
#: the hub waited, then the hub handled 100 replies while Redis waited); pipelines of
#: at most 32 keep both at work: the 64-socket drain ran about 20 % faster, and one
#: client's 256 submits in flight about 40 % (docs/benchmarks.md, section 17)
PIPELINE_CALLS: Final = 32


class AsyncRedisService(_Shell):
    """The queue engine, asyncio flavour: what the hub and async tools call.

    Connect from ``url`` (or ``host``/``port``/``db``/``password``; the environment
    when none is given) or pass a ready ``client``. Call :meth:`aclose` when done.

    Script calls are pipelined automatically: a call made while ``pipeline_depth``
    calls (or pipelines) are already in flight waits, and the calls waiting when
    one of those returns leave together (the first ``pipeline_calls`` of them, in
    the order made; the rest wait for the next), in one pipeline and one round trip,
    written before that call's caller goes on. A
    lone call is sent at once, so an idle hub's latency does not change. Each call
    is still its own script (atomic), with its own reply or error. ``pipeline_depth``
    0 sends every call on its own (always so for a Redis Cluster client).
    """

    #: gets each call that was sent again after its reply was lost and was then
    #: answered without events for hub ``hub_id``, with the service that ran it (a
    #: shard's, in a sharded namespace): its first run may have run and made events
    #: for this hub that went with the lost reply (they are in that service's event
    #: stream). A rerun that did the work itself brings its events along, so only a
    #: call whose events do not concern this hub comes here needlessly. Called
    #: before the call returns; it must not block.
    on_rerun: Callable[[Op[Any], AsyncRedisService], None] | None = None

    def __init__(
        self,
        url: str | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        db: int | None = None,
        password: str | None = None,
        namespace: str | None = None,
        limits: EngineLimits | None = None,
        client: aredis.Redis | None = None,
        call_timeout_s: float = CALL_TIMEOUT_S,
        pipeline_depth: int = PIPELINE_DEPTH,
        pipeline_calls: int = PIPELINE_CALLS,
        shard: int = 0,
    ) -> None:
        if client is None:
            url, extra = resolve_url(url, host, port, db, password)
            client = connect_async(url, **extra)
        self.redis = client
        self.call_timeout_s = call_timeout_s
        self._setup(client, limits, namespace, shard)
        plain = isinstance(client, aredis.Redis)
        self.pipeline_depth = pipeline_depth if plain else 0
        self.pipeline_calls = max(1, pipeline_calls)
        #: calls run in Redis in the order they are made (one connection, one pipeline
        #: at a time): a caller may make its next call before the last one returns
        self.in_order = self.pipeline_depth == 1
        self._in_flight = 0  # lone calls and pipelines sent and not yet answered
        self._waiting: list[tuple[Op[Any], asyncio.Future[Any]]] = []
        # every call's deadline, earliest first: (when, n, what to fail, function,
        # seconds); one timer (``_alarm``) fails those whose time is up, see ``_expire``
        self._deadlines: list[tuple[float, int, asyncio.Future[Any] | _Guard, str, float]] = []
        self._alarm: asyncio.TimerHandle | None = None
        self._numbers = itertools.count()
        self._flushes: set[asyncio.Task[None]] = set()
        self._pipe_conns: list[Any] = []  # pooled connections held for script calls
        # per function: (hub id, argument count, the encoded start of its FCALL)
        self._prefixes: dict[str, tuple[str, int, bytes]] = {}
        #: script calls sent on their own, and in pipelines (with how many pipelines)
        self.calls_alone = self.calls_pipelined = self.pipelines = 0
        #: connections lost with calls unanswered (which may have run; the hub's sweep
        #: pushes any assignment whose reply was lost, see ``renew``)
        self.replies_lost = 0

    def _reply(self, op: Op[T], wrapped: Any) -> T:
        """As the shell's, for a :class:`_Rerun` too: one whose reply carries no
        events for this hub is handed to ``on_rerun`` first."""
        if isinstance(wrapped, _Rerun):
            wrapped = wrapped.reply
            if self.on_rerun is not None and not (len(wrapped) > 1 and wrapped[1]):
                self.on_rerun(op, self)
        return super()._reply(op, wrapped)

    def waiting(self) -> list[str]:
        """The function names of the calls waiting for a place in the next pipeline,
        in the order they will run (what a test or a debugger may look at)."""
        return [op.script for op, _ in self._waiting]

    async def _run(self, op: Op[T]) -> T:
        if self.pipeline_depth <= 0:  # e.g. a cluster client: redis-py routes each call
            self.calls_alone += 1
            reply = await self._reload(op, await self._fcall(op))
            if isinstance(reply, ResponseError):
                raise engine_error(reply) from None
            return self._reply(op, reply)
        if self._in_flight >= self.pipeline_depth or self._waiting:
            return await self._queued(op)
        self._in_flight += 1
        self.calls_alone += 1
        try:
            (reply,) = await self._bounded(self._send([op]), op.script)
            reply = await self._reload(op, reply)
        finally:
            self._in_flight -= 1
            self._flush()
        if isinstance(reply, ResponseError):
            raise engine_error(reply) from None
        if isinstance(reply, Exception):
            raise reply
        return self._reply(op, reply)

    async def _fcall(self, op: Op[Any]) -> Any:
        """``op`` through redis-py's command path (what a Cluster client needs): the
        reply, or Redis' error reply as an exception object."""
        try:
            return await self._bounded(self.redis.fcall(*self._call(op)), op.script)
        except ResponseError as exc:
            return exc

    async def _reload(self, op: Op[Any], reply: Any) -> Any:
        """``reply`` as it is, unless Redis had not got the library: then load it (on
        every master, for a Cluster client) and run ``op`` again."""
        if not _missing(reply):
            return reply
        await self._load()
        return await self._fcall(op)

    async def _load(self) -> None:
        await self._bounded(self.redis.function_load(library_source(), replace=True), "load")

    async def _queued(self, op: Op[T]) -> T:
        """Wait for a place in the next pipeline; its reply, parsed. The call fails
        with a Redis TimeoutError ``call_timeout_s`` after it was made, wherever it
        is by then (waiting, or in a pipeline in flight)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._waiting.append((op, fut))
        self._deadline(loop, fut, op.script, self.call_timeout_s)
        self._flush()
        return await fut

    def _deadline(
        self,
        loop: asyncio.AbstractEventLoop,
        target: asyncio.Future[Any] | _Guard,
        what: str,
        seconds: float,
    ) -> None:
        """Fail ``target`` (a queued call's future, or the guard of a call its task
        waits for) ``seconds`` from now unless it is settled by then.

        One timer serves every call (a timer set and cancelled per call was
        about 5 % of a busy hub's time): the heap keeps the deadlines, earliest
        first, and the settled calls at its top are dropped as new ones come, so
        it holds about the calls in flight."""
        heap = self._deadlines
        while heap and heap[0][2].done():
            heapq.heappop(heap)
        when = loop.time() + seconds
        heapq.heappush(heap, (when, next(self._numbers), target, what, seconds))
        if self._alarm is None or heap[0][0] < self._alarm.when():
            if self._alarm is not None:
                self._alarm.cancel()
            self._alarm = loop.call_at(heap[0][0], self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """The timer of :meth:`_deadline`: fail the calls whose time is up (a call
        not yet sent is then never run; a call in flight has its task cancelled)
        and set the timer for the next one."""
        self._alarm = None
        heap, now = self._deadlines, loop.time()
        while heap and (heap[0][2].done() or heap[0][0] <= now):
            _, _, target, what, seconds = heapq.heappop(heap)
            if isinstance(target, _Guard):
                target.fire()
            elif not target.done():
                target.set_exception(_no_reply(seconds, what))
        if heap:
            self._alarm = loop.call_at(heap[0][0], self._expire, loop)

    def _flush(self) -> None:
        """Send what waits as one pipeline, if a place in flight is free.

        The pipeline is written at once when a connection is at hand (the usual
        case), and a task reads its replies: Redis starts on it while this loop
        turn goes on, instead of a turn later, when such a task would first run."""
        if not self._waiting or self._in_flight >= self.pipeline_depth:
            return
        batch = [(op, fut) for op, fut in self._waiting if not fut.done()]
        batch, self._waiting = batch[: self.pipeline_calls], batch[self.pipeline_calls :]
        if not batch:  # every caller gave up
            return
        self._in_flight += 1
        sent = self._write_now([op for op, _ in batch])
        task = asyncio.get_running_loop().create_task(self._pipeline(batch, sent))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    def _write_now(self, ops: list[Op[Any]]) -> _Sent | None:
        """``ops`` packed and written on a held, connected connection, without
        waiting; None (nothing written) when no such connection is at hand."""
        if not self._pipe_conns:
            return None
        conn = self._pipe_conns[-1]
        writer = getattr(conn, "_writer", None)  # redis-py's asyncio.StreamWriter
        if writer is None or not conn.is_connected:
            return None
        replies, packed = self._pack_all(ops)
        self._pipe_conns.pop()
        if packed:
            writer.write(b"".join(packed.values()))
        return _Sent(conn, replies, packed)

    async def _pipeline(
        self, batch: list[tuple[Op[Any], asyncio.Future[Any]]], sent: _Sent | None = None
    ) -> None:
        """Run ``batch`` in one pipeline (already ``sent``, or sent now) and settle
        each call's future, in order. A call whose caller gave up before it was
        sent is not run.

        The next pipeline (the calls made meanwhile) is started before these
        futures are settled, so Redis runs it while the callers handle their
        replies; it still reaches Redis after this one."""
        released = False
        try:
            if sent is None:
                batch = [(op, fut) for op, fut in batch if not fut.done()]
            if not batch:
                return
            self.pipelines += 1
            self.calls_pipelined += len(batch)
            try:
                ops = [op for op, _ in batch]
                replies = await self._bounded(self._send(ops, sent), "pipeline")
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                return
            missing = [i for i, reply in enumerate(replies) if _missing(reply)]
            if missing:  # load the library once, then run those calls again, in order
                try:
                    await self._load()
                except Exception as exc:
                    replies = [exc if i in missing else r for i, r in enumerate(replies)]
                else:
                    for i in missing:
                        replies[i] = await self._fcall(batch[i][0])
            released = True
            self._in_flight -= 1
            self._flush()  # its task runs before the callers these futures wake
            for (op, fut), reply in zip(batch, replies, strict=True):
                if fut.done():
                    continue
                if isinstance(reply, ResponseError):
                    fut.set_exception(engine_error(reply))
                elif isinstance(reply, Exception):
                    fut.set_exception(reply)
                else:
                    try:
                        fut.set_result(self._reply(op, reply))
                    except Exception as exc:
                        fut.set_exception(exc)
        finally:
            if not released:
                self._in_flight -= 1
                self._flush()

    def _pack(self, op: Op[Any]) -> bytes:
        """``FCALL`` of ``op`` (as :meth:`_call` gives it) in Redis' wire format.
        What precedes the call's own arguments (the function's name, the key, the
        header with the hub id) is the same for every call of a function: it is
        encoded once."""
        cached = self._prefixes.get(op.script)
        if cached is None or cached[0] != self.hub_id:
            call = self._call(op)
            head = ["FCALL", *call[: len(call) - len(op.args)]]
            cached = (self.hub_id, len(head), b"".join(_bulk(a) for a in head))
            self._prefixes[op.script] = cached
        parts = [b"*%d\r\n" % (cached[1] + len(op.args)), cached[2]]
        parts += [_bulk(a) for a in op.args]
        return b"".join(parts)

    def _pack_all(self, ops: list[Op[Any]]) -> tuple[list[Any], dict[int, bytes]]:
        """Each of ``ops`` packed, by index; a call that cannot be packed (e.g. a
        string Redis cannot take) gets its error as its reply instead."""
        replies: list[Any] = [None] * len(ops)
        packed: dict[int, bytes] = {}
        for i, op in enumerate(ops):
            try:
                packed[i] = self._pack(op)
            except (TypeError, ValueError) as exc:
                replies[i] = exc
        return replies, packed

    async def _send(self, ops: list[Op[Any]], sent: _Sent | None = None) -> list[Any]:
        """``ops`` in one write on a pooled connection this service keeps for its
        calls (or already written, as ``sent`` says); each reply, or its error as
        an exception object, in order.

        As redis-py retries a lone call, the calls that got no answer are sent twice
        more at most, after 40 and 80 ms, on a fresh connection: those whose replies
        were lost with a broken connection and those Redis refused while loading its
        data (they did not run). A reply already read is never sent again.

        A call whose reply was lost may have run: its rerun then meets its own work
        (a report on a job it already ended is refused as stale or in a bad state).
        Such a refusal is not the call's answer, so it becomes a connection error:
        the caller takes its outage path (the hub rechecks the job and closes the
        worker's socket), as if the rerun had not been made. A rerun that is
        answered comes back as a :class:`_Rerun` (see ``on_rerun``)."""
        pool = self.redis.connection_pool
        replies, packed = (sent.replies, sent.packed) if sent else self._pack_all(ops)
        todo = list(packed)
        unsure: list[int] = []  # sent again after a lost reply: the first run may have run
        if sent and not todo:  # nothing was written: the connection is free again
            self._pipe_conns.append(sent.conn)
        for attempt in range(3 if todo else 0):
            if attempt:
                await asyncio.sleep(0.02 * 2**attempt)
            again: list[int] = []
            conn = None
            answered = 0
            try:
                if sent and not attempt:
                    conn = sent.conn
                else:
                    conn = self._pipe_conns.pop() if self._pipe_conns else await _checkout(pool)
                    await conn.send_packed_command(b"".join([packed[i] for i in todo]))
                for i in todo:
                    try:
                        replies[i] = await _next_reply(conn)
                    except (ResponseError, BusyLoadingError) as exc:
                        replies[i] = exc
                        if isinstance(exc, BusyLoadingError):
                            again.append(i)
                    answered += 1
            except BaseException as exc:
                if conn is not None:
                    await conn.disconnect()
                    await pool.release(conn)
                if not isinstance(exc, RedisConnectionError):
                    raise
                for i in todo[answered:]:
                    replies[i] = exc
                again += todo[answered:]
                unsure += todo[answered:]
                self.replies_lost += 1
            else:
                self._pipe_conns.append(conn)
            if not again:
                break
            todo = again
        for i in dict.fromkeys(unsure):  # a call lost on two attempts is listed twice
            reply = replies[i]
            if isinstance(reply, ResponseError) and not (
                isinstance(reply, BusyLoadingError) or _missing(reply)
            ):
                replies[i] = RedisConnectionError(
                    f"the connection was lost before this call's reply and its rerun was "
                    f"refused ({reply}): the first run may have done it"
                )
            elif not isinstance(reply, Exception):
                replies[i] = _Rerun(reply)
        return replies

    async def _bounded(self, call: Awaitable[Any], what: str, wait_s: float = 0.0) -> Any:
        """``await call``, failing with a Redis TimeoutError after ``call_timeout_s``
        (plus ``wait_s`` for a blocking read); the connection is dropped then.

        What ``asyncio.timeout`` does, on the engine's one timer (:meth:`_deadline`):
        the deadline cancels this task where it waits (redis-py, and :meth:`_send`,
        drop a connection whose read was cancelled), and that cancel becomes the
        timeout error; a cancel from anyone else stays a cancel."""
        task = asyncio.current_task()
        if task is None:  # not in a task (no loop runs one here): nothing to cancel
            raise RuntimeError("AsyncRedisService calls must run in an asyncio task")
        seconds = self.call_timeout_s + wait_s
        guard = _Guard(task)
        cancelling = task.cancelling()
        self._deadline(asyncio.get_running_loop(), guard, what, seconds)
        try:
            return await call
        except asyncio.CancelledError:
            if guard.fired:
                guard.fired = False
                if task.uncancel() <= cancelling:
                    raise _no_reply(seconds, what) from None
            raise
        finally:
            guard.over = True
            if guard.fired:  # the call returned all the same: take back the cancel
                task.uncancel()

    async def aclose(self) -> None:
        """Let the pipelines in flight finish, then close the client."""
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
        while self._pipe_conns:
            await self.redis.connection_pool.release(self._pipe_conns.pop())
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self._bounded(self.redis.ping(), "ping"))

    # -- jobs
    async def submit_job(
        self,
        job_type: str,
        priority: int = 0,
        params: Mapping[str, Any] | None = None,
        *,
        job_id: str | None = None,
        client_id: str | None = None,
        max_attempts: int | None = None,
        delay_s: float | None = None,
        run_at: float | None = None,
    ) -> SubmitResult:
        """Queue a job, or assign it at once to an idle worker that accepts its type.

        If ``result.assignment`` is set, the caller (a hub) must deliver it to that
        worker; the ``assigned`` event tells the worker's hub as well. With
        ``delay_s`` or ``run_at`` still ahead the job is ``scheduled``: a hub's
        promoter queues it when due (a hub must wake its promoter, see
        ``EventRouter.retry_scheduled``). A ``job_id`` that exists raises
        ``duplicate``, unless ``client_id`` is the job's own client: then nothing
        changes and the result is the stored job's status and position (whatever the
        other arguments say), so a client may safely send a submit again when it got
        no answer.
        """
        return await self._run(
            self.ops.submit(
                job_type,
                priority,
                params,
                job_id=job_id,
                client_id=client_id,
                max_attempts=max_attempts,
                delay_s=delay_s,
                run_at=run_at,
            )
        )

    async def get_job(self, job_id: str) -> JobModel | None:
        """The job with its queue position, or None if unknown or expired."""
        return await self._run(self.ops.status(job_id))

    async def cancel_job(self, job_id: str, client_id: str | None = None) -> CancelResult:
        """Cancel a job (only ``client_id``'s own, when given). If the result names a
        worker, its hub must push ``cancel_job`` to it (the ``cancelled`` event does)."""
        return await self._run(self.ops.cancel(job_id, client_id))

    # -- workers
    async def register_worker(
        self,
        worker_id: str,
        job_types: Iterable[str],
        capabilities: Mapping[str, Any] | None = None,
        *,
        hub_id: str = "",
        session: str | None = None,
        prefetch: int = 0,
    ) -> Assignment | None:
        """Register (or re-register) a worker and claim its first job, if any.

        ``session`` identifies this connection; pass the same one to
        :meth:`worker_lost` and :meth:`touch` so that a stale connection cannot
        affect a newer one. ``prefetch=1``: from its next report on, while the
        worker runs a job it is also given one queued job to hold ahead
        (:class:`FinishResult` ``ahead``); it must run its jobs in that order.
        """
        return await self._run(
            self.ops.register(
                worker_id,
                job_types,
                capabilities,
                hub_id,
                session or secrets.token_hex(8),
                prefetch,
            )
        )

    async def complete_job(
        self, job_id: str, attempt: int, worker_id: str, result: Any = None
    ) -> FinishResult:
        """Record a result (fenced on ``attempt``) and claim the worker's next job."""
        return await self._run(self.ops.complete(job_id, attempt, worker_id, result))

    async def fail_job(
        self, job_id: str, attempt: int, worker_id: str, error: str, retryable: bool = True
    ) -> FinishResult:
        """Record a failure (retry with backoff or fail for good) and claim the next job."""
        return await self._run(self.ops.fail(job_id, attempt, worker_id, error, retryable))

    async def update_progress(
        self,
        job_id: str,
        attempt: int,
        worker_id: str,
        progress: float,
        message: str | None = None,
    ) -> str:
        """Record progress (0-100); marks the job running and extends its lease."""
        return await self._run(self.ops.progress(job_id, attempt, worker_id, progress, message))

    async def touch(self, workers: Iterable[tuple[str, str]]) -> list[str]:
        """Extend liveness for ``(worker_id, session)`` pairs; returns stale worker ids."""
        renewal = await self.renew((w, s, None) for w, s in workers)
        return renewal.stale

    async def renew(self, workers: Iterable[tuple[str, str, int | None]]) -> Renewal:
        """Extend liveness for ``(worker_id, session, pushed)``: the caller (a hub)
        must close the ``stale`` workers and push the ``missed`` assignments (those
        numbered above ``pushed``, the highest it pushed to that socket)."""
        triples = list(workers)
        if not triples:
            return Renewal([], [])
        return await self._run(self.ops.touch(triples))

    async def worker_lost(self, worker_id: str, session: str, count: bool = True) -> bool:
        """The worker's socket closed: requeue its job now. ``count=False`` for a
        deliberate shutdown, which does not count against the job's ``max_lost``."""
        return await self._run(self.ops.lost(worker_id, session, count))

    async def reap(self, limit: int = 100) -> int:
        """Requeue jobs of workers and leases past their deadline (dead hubs)."""
        return await self._run(self.ops.reap(limit))

    async def promote(self, limit: int = 100) -> tuple[int, float | None, list[Assignment]]:
        """Move due retries back; returns (moved, seconds to the next due, assignments)."""
        return await self._run(self.ops.promote(limit))

    # -- reading
    async def get_stats(self, window_s: float = 60.0) -> dict[str, Any]:
        """Queue depth by type and priority, running, workers, totals: one round trip."""
        return await self._run(self.ops.stats(window_s))

    async def read_events(
        self, last_id: str, count: int = 1000, block_ms: int | None = None
    ) -> list[Event]:
        """Events after ``last_id`` (``$``: only new ones), waiting up to ``block_ms``."""
        return await self._xread(self.keys.events, last_id, count, block_ms)

    async def _xread(self, key: str, last_id: str, count: int, block_ms: int | None) -> list[Event]:
        """The entries of stream ``key`` after ``last_id``, waiting up to ``block_ms``."""
        r: Any = self.redis
        read = r.xread({key: last_id}, count=count, block=block_ms)
        reply = await self._bounded(read, "xread", (block_ms or 0) / 1000)
        if not reply:
            return []
        entries = reply[0][1] if isinstance(reply, list) else reply[key][0]
        return [event_from_entry(e) for e in entries]

    async def events_since(self, since: str = "0", limit: int = EVENTS_LIMIT) -> list[Event]:
        """Up to ``limit`` events strictly after ``since``, oldest first."""
        r: Any = self.redis
        xrange = r.xrange(self.keys.events, *_after(since), limit)
        return [event_from_entry(e) for e in await self._bounded(xrange, "xrange")]

    async def recent_events(
        self, about: tuple[str, str], names: Iterable[str], within_ms: int = 2000, pages: int = 10
    ) -> list[Event]:
        """The events named in ``names`` whose field ``about[0]`` (``job`` or
        ``worker``) is ``about[1]``, among the newest of the stream, oldest first:
        read back from the newest entry, a page of 1,000 at a time, to ``within_ms``
        before it (by the entries' own ids: no clock of this machine) or ``pages``
        pages. For the events a call's first run made just now, whose copies for this
        hub went with a lost reply (``on_rerun``)."""
        field, value = about
        wanted = set(names)
        r: Any = self.redis
        found: list[Event] = []
        end, stop_ms = "+", None
        for _ in range(pages):
            entries = await self._bounded(
                r.xrevrange(self.keys.events, end, "-", 1000), "xrevrange"
            )
            for entry in entries:
                ev = event_from_entry(entry)
                ms = event_id_key(ev.id)[0]
                stop_ms = ms - within_ms if stop_ms is None else stop_ms
                if ms < stop_ms:
                    return found[::-1]
                if ev.name in wanted and ev.fields.get(field) == value:
                    found.append(ev)
            if len(entries) < 1000:
                break
            end = "(" + ev.id  # the oldest read: the next page starts below it
        return found[::-1]

    async def last_event_id(self) -> str:
        """The id of the newest event (``0-0`` when there is none)."""
        r: Any = self.redis
        return _last_id(
            await self._bounded(r.xrevrange(self.keys.events, "+", "-", 1), "xrevrange")
        )

    async def job_payloads(self, job_ids: Iterable[str]) -> dict[str, list[str | None]]:
        """``[params, result, error]`` of each of ``job_ids``, in one round trip."""
        ids = list(job_ids)
        r: Any = self.redis

        async def read() -> list[Any]:
            async with r.pipeline(transaction=False) as p:
                for job in ids:
                    p.hmget(self.keys.job(job), ["params", "result", "error"])
                return list(await p.execute())

        return dict(zip(ids, await self._bounded(read(), "hmget"), strict=True))

    async def hub_start(self) -> None:
        """List this hub as live, with no clients and an empty inbox."""
        await self._run(self.ops.hub("start", self.ops.hub_ttl))

    async def hub_alive(self) -> bool:
        """Extend this hub's listing. True if it had lapsed: the caller must list its
        clients again with :meth:`clients_here`."""
        relisted: int = await self._run(self.ops.hub("alive", self.ops.hub_ttl))
        return relisted > 0

    async def clients_here(self, client_ids: Iterable[str]) -> None:
        """These client ids now have a socket on this hub: route their jobs' events here."""
        await self._run(self.ops.hub("join", *client_ids))

    async def clients_gone(self, client_ids: Iterable[str]) -> None:
        """These client ids have no socket on this hub any more."""
        await self._run(self.ops.hub("leave", *client_ids))

    async def hub_stop(self) -> None:
        """Unlist this hub and drop its client list and inbox."""
        await self._run(self.ops.hub("stop"))

    async def read_inbox(
        self, last_id: str, count: int = 1000, block_ms: int = 1000
    ) -> list[Event]:
        """Events for this hub's sockets that other callers caused, after ``last_id``
        (``0-0`` after :meth:`hub_start`), waiting up to ``block_ms``."""
        return await self._xread(self.keys.inbox(self.hub_id), last_id, count, block_ms)


class RedisService(_Shell):
    """The queue engine, blocking flavour: the seed's API for scripts and notebooks.

    >>> svc = RedisService(host="localhost", port=6379, db=0)        # doctest: +SKIP
    >>> svc.add_job(job_id="j1", job_type="image_generation", priority=5,
    ...             params={"prompt": "a sunset"}, client_id="me")  # doctest: +SKIP
    >>> svc.get_job_status("j1")["status"]                           # doctest: +SKIP
    'queued'
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        db: int | None = None,
        password: str | None = None,
        *,
        url: str | None = None,
        namespace: str | None = None,
        limits: EngineLimits | None = None,
        client: redis.Redis | None = None,
        shard: int = 0,
    ) -> None:
        if client is None:
            url, extra = resolve_url(url, host, port, db, password)
            client = connect_sync(url, **extra)
        self.redis = client
        self._setup(client, limits, namespace, shard)

    def _run(self, op: Op[T]) -> T:
        try:
            try:
                reply = self.redis.fcall(*self._call(op))
            except ResponseError as exc:
                if not _missing(exc):
                    raise
                self.redis.function_load(library_source(), replace=True)
                reply = self.redis.fcall(*self._call(op))
        except ResponseError as exc:
            raise engine_error(exc) from None
        return self._reply(op, reply)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> RedisService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def submit_job(
        self,
        job_type: str,
        priority: int = 0,
        params: Mapping[str, Any] | None = None,
        *,
        job_id: str | None = None,
        client_id: str | None = None,
        max_attempts: int | None = None,
        delay_s: float | None = None,
        run_at: float | None = None,
    ) -> SubmitResult:
        """Queue a job, or assign it at once to an idle worker that accepts its type
        (that worker's hub pushes it). Raises ProtocolError for bad input. With
        ``delay_s`` or ``run_at`` ahead it is ``scheduled`` until a hub's promoter
        queues it when due: within a second of its time, as the hubs' promoters check
        at least once a second (no hub running: it stays scheduled)."""
        return self._run(
            self.ops.submit(
                job_type,
                priority,
                params,
                job_id=job_id,
                client_id=client_id,
                max_attempts=max_attempts,
                delay_s=delay_s,
                run_at=run_at,
            )
        )

    def add_job(
        self,
        job_id: str | None = None,
        job_type: str = "default",
        priority: int = 0,
        params: Mapping[str, Any] | None = None,
        client_id: str | None = None,
        max_attempts: int | None = None,
        *,
        delay_s: float | None = None,
        run_at: float | None = None,
    ) -> SubmitResult:
        """:meth:`submit_job` under the seed's name and argument order."""
        return self.submit_job(
            job_type,
            priority,
            params,
            job_id=job_id,
            client_id=client_id,
            max_attempts=max_attempts,
            delay_s=delay_s,
            run_at=run_at,
        )

    def get_job(self, job_id: str) -> JobModel | None:
        """The job with its queue position, or None if unknown or expired."""
        return self._run(self.ops.status(job_id))

    def get_job_status(self, job_id: str) -> dict[str, Any] | None:
        """The job as a dict (status, position, timestamps, ...) or None if unknown."""
        job = self.get_job(job_id)
        return job.to_dict() if job else None

    def cancel_job(self, job_id: str, client_id: str | None = None) -> CancelResult:
        """Cancel a job (only ``client_id``'s own, when given); a running worker is
        told to stop by its hub."""
        return self._run(self.ops.cancel(job_id, client_id))

    def get_stats(self, window_s: float = 60.0) -> dict[str, Any]:
        """Queue depth by type and priority, running, workers, totals: one round trip."""
        return self._run(self.ops.stats(window_s))

    # -- bulk reads for monitors (pipelined; no KEYS, no SCAN)
    def job_ids(self, status: str, limit: int = 1000) -> list[str]:
        """Ids of jobs in ``status``: ``queued`` (queue order), ``active`` (assigned,
        running, retrying, scheduled), ``scheduled`` (by due time), or a finished
        status (newest first)."""
        validate_limit(limit, most=1 << 62)
        k = self.keys
        r: Any = self.redis
        if status == "queued":
            return self._queued_ids(limit)
        if status == "active":
            with r.pipeline(transaction=False) as p:
                p.zrange(k.leases, 0, limit - 1)
                p.zrange(k.delayed, 0, limit - 1)
                running, delayed = p.execute()
            return [*running, *delayed][:limit]
        if status == "scheduled":
            return list(r.zrange(k.scheduled, 0, limit - 1))
        if status in {s.value for s in TERMINAL_STATUSES}:
            return list(r.zrevrange(k.done(status), 0, limit - 1))
        raise ProtocolError(
            ErrorCode.INVALID_FIELD,
            "status: expected queued, active, scheduled, completed, failed or cancelled",
        )

    def _queued_ids(self, limit: int) -> list[str]:
        """Queued job ids in queue order. Under fair share (sub-queues exist) the
        order beyond the heads is approximate: the heads, then each head's client's
        second job in the heads' order, then the third, ... (docs/scheduling.md)."""
        k = self.keys
        r: Any = self.redis
        types = sorted(r.smembers(k.types))
        with r.pipeline(transaction=False) as p:
            for jt in types:
                p.zrange(k.queue(jt), 0, limit - 1, withscores=True)
                p.smembers(k.subs(jt))
            replies = p.execute()
        per_type, subs = replies[::2], replies[1::2]
        merged = sorted(
            (
                (score, jid, jt)
                for jt, rows in zip(types, per_type, strict=True)
                for jid, score in rows
            ),
            key=lambda x: x[0],
        )
        heads = [(jid, jt) for _, jid, jt in merged[:limit]]
        clients = [(jt, c) for jt, cs in zip(types, subs, strict=True) for c in sorted(cs)]
        if not clients or len(heads) >= limit:
            return [jid for jid, _ in heads]
        with r.pipeline(transaction=False) as p:
            for jt, c in clients:
                p.zrange(k.sub(jt, c), 0, limit - 1)
            queues = {ids[0]: ids[1:] for ids in p.execute() if ids}
        out = [jid for jid, _ in heads]
        rest = [queues.get(jid, []) for jid, _ in heads]
        for i in range(max((len(q) for q in rest), default=0)):
            out += [q[i] for q in rest if i < len(q)]
            if len(out) >= limit:
                break
        return out[:limit]

    def get_jobs(self, job_ids: Sequence[str]) -> list[JobModel]:
        """The jobs that still exist among ``job_ids``, in order (one pipeline)."""
        with self.redis.pipeline(transaction=False) as p:
            for jid in job_ids:
                p.hgetall(self.keys.job(jid))
            rows = p.execute()
        return [JobModel.from_redis(jid, h) for jid, h in zip(job_ids, rows, strict=True) if h]

    def get_worker(self, worker_id: str) -> WorkerModel | None:
        r: Any = self.redis
        h = r.hgetall(self.keys.worker(validate_worker_id(worker_id)))
        return WorkerModel.from_redis(h) if h else None

    def get_workers(self) -> list[WorkerModel]:
        """Every live worker (one ZRANGE and one pipeline)."""
        r: Any = self.redis
        ids = r.zrange(self.keys.workers, 0, -1)
        with r.pipeline(transaction=False) as p:
            for w in sorted(ids):
                p.hgetall(self.keys.worker(w))
            rows = [dict(h) for h in p.execute() if h]
        return [WorkerModel.from_redis(h) for h in rows]

    def events_since(self, since: str = "0", limit: int = EVENTS_LIMIT) -> list[Event]:
        """Up to ``limit`` events strictly after ``since``, oldest first."""
        r: Any = self.redis
        return [event_from_entry(e) for e in r.xrange(self.keys.events, *_after(since), limit)]

    def last_event_id(self) -> str:
        """The id of the newest event (``0-0`` when there is none)."""
        r: Any = self.redis
        return _last_id(r.xrevrange(self.keys.events, "+", "-", 1))
