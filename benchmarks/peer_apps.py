"""The peer queues under test, one adapter per library, run inside subprocesses.

Each adapter knows how to enqueue one no-op job, run a worker (``drain``: stop when
the queue is empty where the library has a burst mode, else run until stopped;
``serve``: run until stopped) and do one round trip (submit a job, block until its
result is known to this client). Libraries are imported only inside the adapter,
so a missing one fails that peer alone. :mod:`benchmarks.peers` drives these in
subprocesses; nothing here runs in the benchmark runner itself.

The task bodies are module-level functions so that every library's worker can
import them by name (``benchmarks.peer_apps.noop`` and friends). ``noop`` counts
its calls and every 50 ms (and at the last job) writes the count and the time of
the latest call to ``$BENCH_PROGRESS``; the drain rate is read from those files,
so worker start-up does not count. ``echo`` returns ``time.monotonic_ns()`` taken
when it starts, which gives submit -> start as well as submit -> result (the
monotonic clock is system-wide on Linux).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

JOB = "noop"
QUEUE = "bench"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def run_id() -> str:
    """Names this run's RabbitMQ queues; the driver sets it for its worker."""
    return os.environ.setdefault("BENCH_RUN_ID", str(os.getpid()))


# ----------------------------------------------------------------- task bodies

_lock = threading.Lock()
_count = 0
_last_write = 0


def _progress(i: int) -> None:
    """Count one finished no-op job and report progress (see the module docstring).

    With ``BENCH_BY_INDEX=1`` (a worker that forks a process per job, so no counter
    survives) the job's own index counts instead: jobs run strictly in FIFO order
    there, so index i finishing means i + 1 jobs have."""
    global _count, _last_write
    now = time.monotonic_ns()
    with _lock:
        _count += 1
        done = i + 1 if os.environ.get("BENCH_BY_INDEX") == "1" else _count
        total = int(os.environ.get("BENCH_TOTAL", "0"))
        if done == 1:
            _write("BENCH_START", f"{now}")
        if done >= total or now - _last_write >= 50_000_000:
            _last_write = now
            _write("BENCH_PROGRESS", f"{done} {now}")


def _write(var: str, text: str) -> None:
    path = os.environ.get(var)
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def noop(i: int = 0) -> None:
    _progress(i)


def echo(i: int = 0) -> int:
    return time.monotonic_ns()


async def arq_noop(ctx: Any, i: int = 0) -> None:
    _progress(i)


async def arq_echo(ctx: Any, i: int = 0) -> int:
    return time.monotonic_ns()


async def saq_noop(ctx: Any, *, i: int = 0) -> None:
    _progress(i)


async def saq_echo(ctx: Any, *, i: int = 0) -> int:
    return time.monotonic_ns()


def _wait_for_sigterm() -> None:
    """Block the main thread until SIGTERM or SIGINT."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


class _Loop:
    """A private event loop for the async libraries' client side."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def close_loop(self) -> None:
        self.loop.close()


# -------------------------------------------------------------------- adapters

#: The knobs each setting turns. ``fast`` values come from a sweep on a 2-core
#: machine (see docs/benchmarks.md); ``default`` is each library's out-of-the-box
#: behaviour with one worker process. ``BENCH_KNOBS`` (JSON) overrides them, to
#: repeat the sweep, e.g. ``BENCH_KNOBS='{"concurrency": 50}'``.
KNOBS: dict[str, dict[str, dict[str, Any]]] = {
    "rq": {
        "fast": {"worker_class": "SimpleWorker", "log_level": "WARNING"},
        "default": {"worker_class": "Worker", "log_level": "INFO"},
    },
    "arq": {
        "fast": {"poll_delay": 0.001, "max_jobs": 100, "result_poll": 0.001, "log_results": False},
        "default": {"poll_delay": 0.5, "max_jobs": 10, "result_poll": 0.5, "log_results": True},
    },
    "saq": {
        "fast": {"concurrency": 20, "wait": "refresh"},
        "default": {"concurrency": 10, "wait": "apply"},
    },
    "dramatiq": {
        "fast": {"worker_threads": 2, "worker_timeout": 1},
        "default": {"worker_threads": 8, "worker_timeout": 1000},
    },
    "huey": {
        "fast": {"workers": 1, "notify_result": True, "periodic": False},
        "default": {"workers": 1, "notify_result": False, "periodic": True},
    },
    "celery": {
        "fast": {"pool": "solo", "prefetch": 64, "lean": True, "ignore_noop_result": True},
        "default": {"pool": "prefork", "prefetch": 4, "lean": False, "ignore_noop_result": False},
    },
    "rabbitmq": {"fast": {"prefetch": 256}},
}
KNOBS["celery-rabbitmq"] = KNOBS["celery"]


class Adapter:
    """The interface :mod:`benchmarks.peers` drives. ``url`` is the peer's own Redis
    database (or the AMQP URL); ``setting`` is ``fast`` or ``default``."""

    by_index = False  # drain progress is counted by job index (fork-per-job workers)

    name = ""

    def __init__(self, url: str, setting: str) -> None:
        self.url = url
        self.setting = setting
        self.knobs: dict[str, Any] = {
            **KNOBS.get(self.name, {}).get(setting, {}),
            **json.loads(os.environ.get("BENCH_KNOBS") or "{}"),
        }

    def enqueue(self, i: int) -> None:
        raise NotImplementedError

    def roundtrip(self, i: int, timeout: float) -> int:
        """Submit one job and block until its result is known; return the job's
        start time (``time.monotonic_ns`` read in the worker)."""
        raise NotImplementedError

    def work(self, mode: str) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Empty the peer's queues (called before and after each phase)."""

    def close(self) -> None:
        pass


class RQ(Adapter):
    """``worker_class``: ``SimpleWorker`` runs jobs in the worker process, ``Worker``
    (RQ's default) forks a work horse per job. Burst mode for the drain; results are
    awaited with ``Job.latest_result(timeout)`` (a blocking XREAD on the job's
    result stream)."""

    name = "rq"

    def __init__(self, url: str, setting: str) -> None:
        super().__init__(url, setting)
        from redis import Redis
        from rq import Queue

        self.redis = Redis.from_url(url)
        self.queue = Queue(QUEUE, connection=self.redis)
        self.by_index = self.knobs["worker_class"] != "SimpleWorker"

    def enqueue(self, i: int) -> None:
        self.queue.enqueue(noop, i)

    def roundtrip(self, i: int, timeout: float) -> int:
        job = self.queue.enqueue(echo, i)
        result = job.latest_result(timeout=max(1, int(timeout)))
        if result is None:
            raise TimeoutError("no result")
        value: Any = result.return_value
        return int(value)

    def work(self, mode: str) -> None:
        import rq

        cls = getattr(rq, self.knobs["worker_class"])
        w = cls([self.queue], connection=self.redis)
        w.work(burst=mode == "drain", logging_level=self.knobs["log_level"])

    def reset(self) -> None:
        self.redis.flushdb()


class Arq(Adapter):
    """``poll_delay``: how often the worker looks for jobs (arq polls a sorted set);
    ``max_jobs``: jobs in flight; ``result_poll``: how often ``Job.result`` polls.
    Burst mode for the drain."""

    name = "arq"

    def __init__(self, url: str, setting: str) -> None:
        super().__init__(url, setting)
        from arq.connections import RedisSettings

        self.settings = RedisSettings.from_dsn(url)
        self.io = _Loop()
        self.pool: Any = None

    async def _pool(self) -> Any:
        from arq import create_pool

        if self.pool is None:
            self.pool = await create_pool(self.settings)
        return self.pool

    def enqueue(self, i: int) -> None:
        async def go() -> None:
            await (await self._pool()).enqueue_job("arq_noop", i)

        self.io.run(go())

    def roundtrip(self, i: int, timeout: float) -> int:
        async def go() -> int:
            job = await (await self._pool()).enqueue_job("arq_echo", i)
            return int(await job.result(timeout=timeout, poll_delay=self.knobs["result_poll"]))

        return int(self.io.run(go()))

    def work(self, mode: str) -> None:
        from arq.worker import Worker

        k = self.knobs
        asyncio.set_event_loop(asyncio.new_event_loop())
        w = Worker(
            functions=[arq_noop, arq_echo],
            redis_settings=self.settings,
            burst=mode == "drain",
            poll_delay=k["poll_delay"],
            max_jobs=k["max_jobs"],
            log_results=k["log_results"],
        )
        w.run()

    def reset(self) -> None:
        async def go() -> None:
            await (await self._pool()).flushdb()

        self.io.run(go())

    def close(self) -> None:
        if self.pool is not None:
            self.io.run(self.pool.aclose())
        self.io.close_loop()


class Saq(Adapter):
    """``concurrency``: jobs in flight in the worker. ``wait``: ``apply`` is
    ``Queue.apply`` (polls the job every 0.5 s, and in SAQ 0.26 sleeps once more
    after the result is there), ``refresh`` is ``enqueue`` then
    ``Job.refresh(until_complete=...)`` (waits on Redis pub/sub, in 50 ms slices
    because a completion published before it subscribes is missed). Burst mode for the
    drain (``dequeue_timeout`` 1 s, which burst mode requires)."""

    name = "saq"

    def __init__(self, url: str, setting: str) -> None:
        super().__init__(url, setting)
        self.io = _Loop()
        self.queue: Any = None

    async def _queue(self) -> Any:
        from saq import Queue

        if self.queue is None:
            self.queue = Queue.from_url(self.url, name=QUEUE)
            await self.queue.connect()
        return self.queue

    def enqueue(self, i: int) -> None:
        async def go() -> None:
            await (await self._queue()).enqueue("saq_noop", i=i)

        self.io.run(go())

    def roundtrip(self, i: int, timeout: float) -> int:
        async def go() -> int:
            q = await self._queue()
            if self.knobs["wait"] == "apply":
                return int(await q.apply("saq_echo", timeout=timeout, i=i))
            job = await q.enqueue("saq_echo", i=i)
            deadline = time.monotonic() + timeout
            # a completion published before refresh() subscribes is missed, so wait
            # in 50 ms slices, re-reading the job after each
            while not job.completed:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job.key} did not complete")
                try:
                    await job.refresh(until_complete=0.05)
                except TimeoutError:
                    await job.refresh()
            return int(job.result)

        return int(self.io.run(go()))

    def work(self, mode: str) -> None:
        from saq import Queue, Worker

        async def go() -> None:
            queue = Queue.from_url(self.url, name=QUEUE)
            burst = mode == "drain"
            w = Worker(
                queue,
                functions=[saq_noop, saq_echo],
                concurrency=self.knobs["concurrency"],
                burst=burst,
                dequeue_timeout=1.0 if burst else 0.0,
            )
            await w.start()

        asyncio.run(go())

    def reset(self) -> None:
        async def go() -> None:
            await (await self._queue()).redis.flushdb()

        self.io.run(go())

    def close(self) -> None:
        if self.queue is not None:
            self.io.run(self.queue.disconnect())
        self.io.close_loop()


class Dramatiq(Adapter):
    """One worker process (the ``dramatiq`` CLI starts one per core).
    ``worker_threads``: threads running actors; ``worker_timeout`` (ms): how long an
    idle consumer backs off at most before it polls Redis again. Results go through
    the ``Results`` middleware with its Redis backend (a blocking pop)."""

    name = "dramatiq"

    def __init__(self, url: str, setting: str) -> None:
        super().__init__(url, setting)
        # typed loosely on purpose: the checks must pass with or without dramatiq
        lib: Any = importlib.import_module("dramatiq")
        brokers: Any = importlib.import_module("dramatiq.brokers.redis")
        results: Any = importlib.import_module("dramatiq.results")
        backends: Any = importlib.import_module("dramatiq.results.backends")

        self.broker = brokers.RedisBroker(url=url)
        self.backend = backends.RedisBackend(url=url)
        self.broker.add_middleware(results.Results(backend=self.backend))
        lib.set_broker(self.broker)
        self.noop = lib.actor(noop, actor_name="noop", queue_name=QUEUE, broker=self.broker)
        self.echo = lib.actor(
            echo, actor_name="echo", queue_name=QUEUE, broker=self.broker, store_results=True
        )

    def enqueue(self, i: int) -> None:
        self.noop.send(i)

    def roundtrip(self, i: int, timeout: float) -> int:
        message = self.echo.send(i)
        return int(message.get_result(block=True, timeout=int(timeout * 1000)))

    def work(self, mode: str) -> None:
        lib: Any = importlib.import_module("dramatiq")
        w = lib.Worker(
            self.broker,
            worker_threads=self.knobs["worker_threads"],
            worker_timeout=self.knobs["worker_timeout"],
        )
        w.start()
        _wait_for_sigterm()
        w.stop(timeout=2000)

    def reset(self) -> None:
        self.broker.client.flushdb()

    def close(self) -> None:
        self.broker.close()


class Huey(Adapter):
    """One consumer process with ``workers`` threads and a blocking dequeue (BRPOP).
    ``notify_result``: the client waits on a BLPOP for the result instead of polling
    (from 50 ms, growing by 1.15x); ``periodic``: the periodic-task scheduler."""

    name = "huey"

    def __init__(self, url: str, setting: str) -> None:
        super().__init__(url, setting)
        from huey import RedisHuey

        self.huey = RedisHuey(QUEUE, url=url, notify_result=self.knobs["notify_result"])
        self.noop = self.huey.task(name="noop")(noop)
        self.echo = self.huey.task(name="echo")(echo)

    def enqueue(self, i: int) -> None:
        self.noop(i)

    def roundtrip(self, i: int, timeout: float) -> int:
        return int(self.echo(i).get(blocking=True, timeout=timeout))

    def work(self, mode: str) -> None:
        consumer = self.huey.create_consumer(
            workers=self.knobs["workers"], worker_type="thread", periodic=self.knobs["periodic"]
        )
        consumer.run()

    def reset(self) -> None:
        self.huey.storage.conn.flushdb()


class Celery(Adapter):
    """``pool``: ``solo`` runs tasks in the worker process, ``prefork`` (the default)
    in one child process (``--concurrency 1``); ``prefetch``: the prefetch
    multiplier; ``lean``: without gossip, mingle, heartbeat and remote control;
    ``ignore_noop_result``: the no-op's result is not stored. Results are awaited
    with ``AsyncResult.get`` (Redis pub/sub, or the ``rpc://`` reply queue on
    RabbitMQ)."""

    name = "celery"

    def __init__(self, url: str, setting: str) -> None:
        super().__init__(url, setting)
        from celery import Celery as App

        self.amqp = url.startswith("amqp")
        backend = "rpc://" if self.amqp else url
        self.queue = f"redisq-bench-{run_id()}-{setting}" if self.amqp else QUEUE
        k = self.knobs
        self.app = App("bench", broker=url, backend=backend)
        self.app.conf.update(
            task_default_queue=self.queue,
            broker_connection_retry_on_startup=True,
            worker_hijack_root_logger=False,
            result_expires=3600,
            worker_prefetch_multiplier=k["prefetch"],
            worker_enable_remote_control=not k["lean"],
        )
        self.noop = self.app.task(name="noop", ignore_result=k["ignore_noop_result"])(noop)
        self.echo = self.app.task(name="echo")(echo)
        # exchanges a Celery worker declares on the broker by default; the ones this
        # run creates are deleted again by close()
        self.shared = ["celery.pidbox", "reply.celery.pidbox", "celeryev"] if self.amqp else []
        self.preexisting = _amqp_existing(self.shared) if self.amqp else set()

    def enqueue(self, i: int) -> None:
        self.noop.delay(i)

    def roundtrip(self, i: int, timeout: float) -> int:
        return int(self.echo.delay(i).get(timeout=timeout))

    def work(self, mode: str) -> None:
        k = self.knobs
        argv = [
            "worker",
            "--concurrency=1",
            "--loglevel=WARNING",
            f"--hostname=bench-{os.getpid()}@%h",
            f"--pool={k['pool']}",
        ]
        if k["lean"]:
            argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        self.app.worker_main(argv=argv)

    def reset(self) -> None:
        if self.amqp:
            _amqp_purge(self.queue)
        else:
            self.app.backend.client.flushdb()

    def close(self) -> None:
        if self.amqp:
            created = [x for x in self.shared if x not in self.preexisting]
            replies = str(self.app.backend.oid)  # the rpc:// backend's reply queue
            _amqp_delete(queues=[self.queue, replies], exchanges=[self.queue, *created])
        self.app.close()


class AioPika(Adapter):
    """Plain RabbitMQ through aio-pika, as a transport baseline: messages are
    published (with publisher confirms, aio-pika's default) to a non-durable queue;
    the consumer (``prefetch`` messages in flight, manual ack) acks each; for a
    round trip it publishes the reply to the client's ``reply_to`` queue, which the
    client awaits."""

    name = "rabbitmq"

    def __init__(self, url: str, setting: str) -> None:
        super().__init__(url, setting)
        self.queue = f"redisq-bench-{run_id()}-pika"
        self.io = _Loop()
        self.conn: Any = None
        self.channel: Any = None
        self.reply_queue: Any = None
        self.waiting: dict[str, asyncio.Future[int]] = {}

    async def _open(self) -> Any:
        import aio_pika

        if self.conn is None:
            self.conn = await aio_pika.connect(self.url, timeout=10)
            self.channel = await self.conn.channel()
            await self.channel.declare_queue(self.queue, durable=False)
        return self.channel

    def enqueue(self, i: int) -> None:
        import aio_pika

        async def go() -> None:
            ch = await self._open()
            await ch.default_exchange.publish(aio_pika.Message(str(i).encode()), self.queue)

        self.io.run(go())

    def roundtrip(self, i: int, timeout: float) -> int:
        import aio_pika

        async def go() -> int:
            ch = await self._open()
            if self.reply_queue is None:
                self.reply_queue = await ch.declare_queue(exclusive=True, auto_delete=True)

                async def on_reply(m: Any) -> None:
                    fut = self.waiting.pop(m.correlation_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(int(m.body))

                await self.reply_queue.consume(on_reply, no_ack=True)
            cid = f"r{i}"
            fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self.waiting[cid] = fut
            message = aio_pika.Message(b"echo", correlation_id=cid, reply_to=self.reply_queue.name)
            await ch.default_exchange.publish(message, self.queue)
            return await asyncio.wait_for(fut, timeout)

        return int(self.io.run(go()))

    def work(self, mode: str) -> None:
        import aio_pika

        async def go() -> None:
            conn = await aio_pika.connect(self.url, timeout=10)
            ch = await conn.channel()
            await ch.set_qos(prefetch_count=self.knobs["prefetch"])
            queue = await ch.declare_queue(self.queue, durable=False)
            seen = 0

            async def on_message(m: Any) -> None:
                nonlocal seen
                if m.reply_to:
                    reply = aio_pika.Message(
                        str(time.monotonic_ns()).encode(), correlation_id=m.correlation_id
                    )
                    await ch.default_exchange.publish(reply, m.reply_to)
                else:
                    noop(seen)
                    seen += 1
                await m.ack()

            await queue.consume(on_message)
            await asyncio.Event().wait()

        asyncio.run(go())

    def reset(self) -> None:
        _amqp_purge(self.queue)

    def close(self) -> None:
        if self.conn is not None:
            self.io.run(self.conn.close())
        _amqp_delete(queues=[self.queue], exchanges=[])
        self.io.close_loop()


async def _amqp_each(names: list[str], op: Callable[[Any, str], Any]) -> list[bool]:
    """Run ``await op(channel, name)`` for each name on a fresh channel (a failed AMQP
    operation closes its channel); True where it succeeded."""
    import aio_pika

    ok: list[bool] = []
    conn = await aio_pika.connect(AMQP_URL, timeout=10)
    try:
        for name in names:
            ch = await conn.channel()
            try:
                await op(ch, name)
                ok.append(True)
            except Exception:
                ok.append(False)
    finally:
        await conn.close()
    return ok


def _amqp_existing(exchanges: list[str]) -> set[str]:
    """The names among ``exchanges`` that exist on the local RabbitMQ now."""

    async def probe(ch: Any, name: str) -> None:
        await ch.get_exchange(name, ensure=True)

    found = asyncio.run(_amqp_each(exchanges, probe))
    return {name for name, ok in zip(exchanges, found, strict=True) if ok}


def _amqp_purge(queue: str) -> None:
    async def purge(ch: Any, name: str) -> None:
        q = await ch.get_queue(name, ensure=True)
        await q.purge()

    asyncio.run(_amqp_each([queue], purge))


def _amqp_delete(queues: list[str], exchanges: list[str]) -> None:
    """Delete this run's queues and exchanges from the local RabbitMQ."""

    async def go() -> None:
        await _amqp_each(queues, lambda ch, name: ch.queue_delete(name))
        await _amqp_each(exchanges, lambda ch, name: ch.exchange_delete(name))

    asyncio.run(go())


ADAPTERS: dict[str, Callable[[str, str], Adapter]] = {
    "rq": RQ,
    "arq": Arq,
    "saq": Saq,
    "dramatiq": Dramatiq,
    "huey": Huey,
    "celery": Celery,
    "rabbitmq": AioPika,
    "celery-rabbitmq": Celery,
}
