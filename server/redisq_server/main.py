"""The hub: configuration, startup, background tasks, logging, graceful shutdown.

``redisq-server --host 127.0.0.1 --port 8000`` (or ``python -m redisq_server``) runs
one hub; any number may share one Redis. In code::

    async with Hub(Settings.from_env(hub_port=0)) as hub:
        print(hub.url)          # ws://127.0.0.1:<port>
        await hub.wait_stopped()  # or leave the block to stop it

Background tasks: the liveness sweep (extends this hub, its workers and their
leases), the reaper (requeues what dead hubs left behind) and the monitors' stats
loops here; the event loops (inbox fan-in, local events, the monitors' tap, the
retry promoter) belong to :class:`~redisq_server.routing.EventRouter`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http
import json
import logging
import multiprocessing
import multiprocessing.process
import os
import re
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from importlib import resources
from multiprocessing.connection import Connection as PipeEnd
from multiprocessing.connection import wait
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, unquote_plus, urlsplit

from redis.exceptions import RedisError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .auth import TOKEN_PATTERN, Authenticator, Refusal, parse_secrets
from .config import ENV, Settings, check_redis_url, safe_url
from .connections import Connection, Registry
from .metrics import HubMetrics
from .protocol import (
    PROTOCOL_VERSION,
    CloseCode,
    ProtocolError,
    Role,
    validate_client_id,
    validate_worker_id,
)
from .redis_service import AsyncRedisService
from .routes import Routes
from .routing import forever
from .sharding_async import open_async_service
from .version import __version__

__all__ = ["Hub", "main", "run", "serve_processes", "served_loop"]

log = logging.getLogger("redisq.hub")


def _http(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _json_response(status: http.HTTPStatus, data: Any) -> Response:
    return _http(status, json.dumps(data).encode(), "application/json")


def parse_path(path: str) -> tuple[Role, str]:
    """``/ws/<role>/<id>`` -> (role, id), validating the id: raises ProtocolError for
    an invalid id, ValueError for any other path (an empty id is a missing one)."""
    parts = urlsplit(path).path.split("/")
    if len(parts) != 4 or parts[0] != "" or parts[1] != "ws" or not parts[3]:
        raise ValueError("not a websocket path")
    try:
        role = Role(parts[2])
    except ValueError:
        raise ValueError("unknown role") from None
    ident = unquote(parts[3])
    if role is Role.WORKER:
        validate_worker_id(ident)
    else:
        validate_client_id(ident, f"{role.value}_id")
    return role, ident


@functools.cache
def _static(name: str) -> bytes:
    """A page shipped in ``static/`` (read once)."""
    try:
        return resources.files(__package__).joinpath("static", name).read_bytes()
    except FileNotFoundError:
        return b"<!doctype html><title>redisq</title><p>" + name.encode() + b" is not installed"


class Hub:
    """One hub process's server. Use ``async with Hub(settings) as hub`` or call
    :meth:`start` and then :meth:`stop` (idempotent)."""

    def __init__(self, settings: Settings, service: AsyncRedisService | None = None) -> None:
        self.settings = settings
        self.hub_id = settings.hub_id or f"hub-{secrets.token_hex(4)}"
        self.svc = service or open_async_service(settings.redis_url, limits=settings.limits)
        self._own_svc = service is None
        self.svc.hub_id = self.hub_id
        self.registry = Registry()
        self.metrics = HubMetrics(self.svc, self.registry, self.hub_id)
        self.events = self.metrics.event_router()
        self.routes = Routes(self.svc, self.registry, self.events, settings, self.hub_id)
        self.metrics.time_submits(self.routes)
        self.svc.on_events = self.events.local_events
        self.svc.on_rerun = self.events.rerun
        self._listed: set[str] = set()  # client ids listed in Redis as on this hub
        self._presence = asyncio.Lock()  # keeps those listings in the order of events
        self.server: Server | None = None
        self.port = settings.hub_port
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._page: bytes | None = None
        self.tokens = {
            Role.CLIENT: settings.client_token,
            Role.WORKER: settings.worker_token,
            Role.MONITOR: settings.monitor_token,
        }
        self.auth = Authenticator(self.tokens, parse_secrets(settings.auth_secrets))

    @property
    def url(self) -> str:
        """``ws://host:port`` of this hub (valid after :meth:`start`)."""
        return f"ws://{self.settings.hub_host}:{self.port}"

    @property
    def hub_url(self) -> str:
        """The same as :attr:`url`; lab tools accept anything with a ``hub_url``."""
        return self.url

    async def start(self) -> Hub:
        """Check Redis, bind the port (0 picks a free one) and start the tasks."""
        await self.svc.ping()
        await self.svc.hub_start()
        self.server = await serve(
            self._handler,
            self.settings.hub_host,
            self.settings.hub_port,
            process_request=self._process_request,
            max_size=self.settings.max_frame_bytes,
            max_queue=64,
            open_timeout=5,  # idle pre-opened sockets (browsers) must not hold up stop()
            close_timeout=3,  # nor peers that cannot answer a close (a blocked kernel loop)
            compression=None,
            server_header=f"redisq/{__version__}",
            # several hub processes share the port (redisq-server --processes N)
            reuse_port=self.settings.processes > 1,
        )
        self.port = int(self.server.sockets[0].getsockname()[1])
        interval = max(0.05, self.settings.limits.lease_s / 3)
        self.events.start()
        self._tasks = [
            asyncio.create_task(self._sweep(interval), name="sweep"),
            asyncio.create_task(self._reap(min(1.0, interval)), name="reaper"),
        ]
        log.info(
            "hub %s listening on %s (redis %s)",
            self.hub_id,
            self.url,
            safe_url(self.settings.redis_url),
        )
        return self

    async def stop(self) -> None:
        """Close every socket with 1001, requeue the jobs of this hub's workers at
        once (not counted as lost), stop the tasks and close Redis. Idempotent."""
        if self.stopping:
            await self._stopped.wait()
            return
        self.stopping = True
        log.info("hub %s stopping", self.hub_id)
        if self.server is not None:
            self.server.close()  # closes every connection with 1001 (going away)
            await self.server.wait_closed()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.events.stop()
        try:
            await self.svc.hub_stop()
        except RedisError as exc:  # other hubs' reapers forget it once its listing lapses
            log.warning("could not unlist hub %s: %s", self.hub_id, exc)
        if self._own_svc:
            await self.svc.aclose()
        self._stopped.set()
        log.info("hub %s stopped", self.hub_id)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> Hub:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------- HTTP

    def _authorized(
        self, role: Role, ident: str, request: Request, query: dict[str, list[str]]
    ) -> Refusal | None:
        """None if the request's token opens ``/ws/<role>/<ident>``, else the refusal."""
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else (query.get("token") or [""])[0]
        return self.auth.check(role, ident, given)

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        split = urlsplit(request.path)
        if split.path == "/health":
            return await self._health()
        if split.path == "/debug" and self.settings.debug:
            return _http(http.HTTPStatus.OK, self._debug_page(), "text/html; charset=utf-8")
        if split.path == "/metrics":
            status, body, content_type = await self.metrics.scrape()
            return _http(http.HTTPStatus(status), body, content_type)
        if split.path == "/dashboard":
            return _http(http.HTTPStatus.OK, _static("dashboard.html"), "text/html; charset=utf-8")
        try:
            role, ident = parse_path(request.path)
        except ProtocolError as err:
            return _json_response(http.HTTPStatus.BAD_REQUEST, {"error": err.message})
        except ValueError:
            return _json_response(
                http.HTTPStatus.NOT_FOUND,
                {"error": "use /ws/client/<id>, /ws/worker/<machine>:<gpu>, /ws/monitor/<id>"},
            )
        refusal = self._authorized(role, ident, request, parse_qs(split.query))
        if refusal is not None:
            return _json_response(refusal.status, {"error": refusal.error})
        if self.stopping or self.registry.count >= self.settings.max_connections:
            return _json_response(
                http.HTTPStatus.SERVICE_UNAVAILABLE, {"error": "hub is full or stopping"}
            )
        return None

    async def _health(self) -> Response:
        try:
            redis_ok = await asyncio.wait_for(self.svc.ping(), 2)
        except (RedisError, OSError, TimeoutError):
            redis_ok = False
        r = self.registry
        body = {
            "status": "ok" if redis_ok else "degraded",
            "redis": redis_ok,
            "hub": self.hub_id,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "policy": self.settings.limits.policy,  # every hub of a namespace runs the same
            "connections": {
                "clients": sum(len(c) for c in r.clients.values()),
                "workers": len(r.workers),
                "monitors": len(r.monitors),
            },
        }
        status = http.HTTPStatus.OK if redis_ok else http.HTTPStatus.SERVICE_UNAVAILABLE
        return _json_response(status, body)

    def _debug_page(self) -> bytes:
        if self._page is None:
            try:
                self._page = (
                    resources.files(__package__).joinpath("static/ws_debug.html").read_bytes()
                )
            except FileNotFoundError:
                self._page = b"<!doctype html><title>redisq</title><p>debug page not installed</p>"
        return self._page

    # -------------------------------------------------------- WebSockets

    async def _handler(self, ws: ServerConnection) -> None:
        task = asyncio.current_task()
        assert task is not None and ws.request is not None
        self._handlers.add(task)
        role, ident = parse_path(ws.request.path)
        conn = Connection(
            ws, role, ident, self.settings.send_queue_frames, self.settings.send_queue_bytes
        )
        self.registry.add(conn)
        conn.start()
        if role is Role.CLIENT:
            await self._list_clients([ident])  # before its first request: events find it
        conn.send(self.routes.welcome(conn))
        try:
            async for raw in ws:
                if conn.closing:  # being closed by the hub: read on to the close, do nothing
                    continue
                await self.routes.handle(conn, raw)
        except ConnectionClosed:
            pass
        finally:
            # a report still in flight lands before the socket's loss is handled
            await self.routes.settled(conn)
            self.registry.remove(conn)
            if role is Role.CLIENT:
                await self._list_clients([ident])
            # a shutdown, or a close for this hub's own Redis trouble, is not the
            # worker's loss: its job is requeued without counting against it
            count = not self.routes.closed_for_outage(conn) and not self.stopping
            if conn.registered:
                if not count:  # told again later if Redis cannot hear it now
                    self.routes.uncounted_loss(conn.id, conn.session)
                try:
                    await self.svc.worker_lost(conn.id, conn.session, count=count)
                    self.routes.told(conn.id, conn.session)
                except RedisError as exc:  # told later if uncounted, else the reaper's
                    log.warning("could not requeue %s's job now: %s", conn.id, exc)
                    for job, attempt in conn.delivered:  # the loss may still fail it for good
                        self.events.recheck(job, attempt, conn.id)
            await conn.finish()
            self._handlers.discard(task)

    # ------------------------------------------------------------- tasks

    async def _list_clients(self, ids: Sequence[str], relist: bool = False) -> None:
        """Bring Redis' list of the client ids with a socket here in line with the
        registry, for ``ids``. Serialized, so a leave and a join of one id land in
        the order they happened. A failure is logged; the sweep tries again."""
        async with self._presence:
            try:
                if relist:
                    self._listed.clear()
                here = [c for c in ids if c in self.registry.clients and c not in self._listed]
                gone = [c for c in ids if c not in self.registry.clients and c in self._listed]
                if here:
                    await self.svc.clients_here(here)
                    self._listed.update(here)
                if gone:
                    await self.svc.clients_gone(gone)
                    self._listed.difference_update(gone)
            except RedisError as exc:
                log.warning("could not list this hub's clients: %s", exc)

    async def _sweep(self, interval: float) -> None:
        async def step() -> None:
            relist = await self.svc.hub_alive()
            if relist or self._listed != self.registry.clients.keys():
                await self._list_clients([*self.registry.clients, *self._listed], relist)
            live = [c for c in self.registry.workers.values() if c.registered]
            renewal = await self.svc.renew((c.id, c.session, c.delivered_n) for c in live)
            for worker_id in renewal.stale:
                conn = self.registry.workers.get(worker_id)
                if conn is not None:
                    conn.close(CloseCode.SESSION_EXPIRED, "worker record expired; reconnect")
            for a in renewal.missed:  # a push lost with a reply or an event
                if self.events.push(a):
                    log.warning(
                        "pushed %s's job %s late: its assignment was lost", a.worker_id, a.job_id
                    )
            await self.routes.tell_losses()

        await forever("sweep", step, interval, self._is_stopping)

    async def _reap(self, interval: float) -> None:
        async def step() -> None:
            await self.routes.tell_losses()  # a loss this hub knows is uncounted, first
            n = await self.svc.reap()
            if n:
                log.info("reaped %d expired workers/leases", n)

        await forever("reaper", step, interval, self._is_stopping)

    def _is_stopping(self) -> bool:
        return self.stopping


#: ``Bearer <credential>`` (any case), e.g. an ``Authorization`` header
_BEARER = re.compile(r"(?i)(\bbearer\s+)[^\s'\",;]+")
#: one ``key=value`` of a query string
_QUERY_PARAM = re.compile(r"([?&])([^=&\s'\"#?]*)=([^&\s'\"#]*)")


def _mask_param(m: re.Match[str]) -> str:
    """A query parameter the hub would read as ``token`` (in any percent-encoding of
    its name), with its value masked."""
    if unquote_plus(m[2]).lower() == "token":
        return f"{m[1]}{m[2]}=***"
    return m[0]


class _Redact(logging.Filter):
    """Masks secrets in every log line, e.g. in the WebSocket library's DEBUG dump of
    a handshake's path and headers: the configured ones (role tokens, signing
    secrets, the Redis password) wherever they appear, and whatever a request
    carries as a token (a ``Bearer`` credential, a ``token`` query parameter in any
    percent-encoding, a signed token), known or not."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        """``text`` with every secret and token replaced by ``***``."""
        for s in self.secrets:
            text = text.replace(s, "***")
        text = TOKEN_PATTERN.sub("***", text)
        text = _BEARER.sub(r"\1***", text)
        return _QUERY_PARAM.sub(_mask_param, text)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        masked = self.mask(msg)
        if masked != msg:
            record.msg, record.args = masked, None
        return True


def _secrets(settings: Settings) -> list[str]:
    """Every secret in ``settings``, as given and percent-encoded."""
    raw = [settings.client_token, settings.worker_token, settings.monitor_token]
    raw += [s.strip() for s in (settings.auth_secrets or "").split(",")]
    password = urlsplit(settings.redis_url).password
    if password:
        raw += [password, unquote(password)]
    return [v for s in raw if s for v in (s, quote(s, safe=""))]


def _parser() -> argparse.ArgumentParser:
    table = "\n".join(
        f"  {var:<24} {doc} (default {default or '-'})" for var, (_, default, doc) in ENV.items()
    )
    p = argparse.ArgumentParser(
        prog="redisq-server",
        description="Run one redisq hub (WebSocket server for clients, GPU workers and monitors).",
        epilog="environment:\n" + table,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", help="listen address (HUB_HOST)")
    p.add_argument("--port", type=int, help="listen port, 0 for a free one (HUB_PORT)")
    p.add_argument("--redis-url", help="Redis URL (REDIS_URL)")
    p.add_argument("--namespace", help="key namespace (REDISQ_NAMESPACE)")
    p.add_argument("--hub-id", help="this hub's id (HUB_ID); with --processes, a prefix")
    p.add_argument(
        "--processes",
        type=int,
        help="hub processes sharing the port, each its own hub (HUB_PROCESSES, default 1)",
    )
    p.add_argument("--log-level", help="log level (LOG_LEVEL)")
    p.add_argument("--debug", action="store_true", default=None, help="serve /debug (HUB_DEBUG)")
    return p


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "hub_host": args.host,
            "hub_port": args.port,
            "redis_url": args.redis_url,
            "namespace": args.namespace,
            "hub_id": args.hub_id,
            "processes": args.processes,
            "log_level": args.log_level,
            "debug": args.debug,
        }.items()
        if v is not None
    }
    return Settings.from_env(**overrides)


async def main(settings: Settings, on_ready: Callable[[Hub], None] | None = None) -> None:
    """Run a hub until SIGTERM or SIGINT, then stop it gracefully. ``on_ready`` is
    called once it serves."""
    hub = Hub(settings)
    await hub.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(hub)
    else:
        print(f"redisq hub listening on {hub.url}", flush=True)
        print(f"dashboard {hub.url.replace('ws://', 'http://', 1)}/dashboard", flush=True)
    await stop.wait()
    await hub.stop()


def served_loop() -> str:
    """The event loop a hub started by :func:`run` uses: ``"uvloop"`` when the
    ``fast`` extra installed it, else ``"asyncio"`` (the standard loop)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _run_loop(coro: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run``, on the loop :func:`served_loop` names."""
    if served_loop() == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


def run(argv: Sequence[str] | None = None) -> None:
    """Console entry point of ``redisq-server``."""
    try:
        settings = settings_from_args(argv)
        check_redis_url(settings.redis_url)
        parse_secrets(settings.auth_secrets)
        if settings.processes < 1:
            raise ValueError(f"--processes/HUB_PROCESSES: {settings.processes}: expected >= 1")
    except ValueError as exc:
        print(f"redisq-server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.processes > 1:
        try:
            status = serve_processes(settings)
        except OSError as exc:  # the port is taken by a socket without SO_REUSEPORT
            print(f"redisq-server: cannot start: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        raise SystemExit(status)
    _serve(settings)


def _serve(settings: Settings, on_ready: Callable[[Hub], None] | None = None) -> None:
    """One hub process: logging with secrets masked, then :func:`main` on the loop
    :func:`served_loop` names. Exits with status 2 if the hub cannot start."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    redact = _Redact(_secrets(settings))
    for handler in logging.getLogger().handlers:
        handler.addFilter(redact)
    try:
        _run_loop(main(settings, on_ready))
    except (RedisError, OSError) as exc:
        print(f"redisq-server: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _child(settings: Settings, ready: PipeEnd) -> None:
    """One of :func:`serve_processes`' hubs: tells the parent its URL once it serves."""

    def on_ready(hub: Hub) -> None:
        ready.send(hub.url)
        ready.close()

    _serve(settings, on_ready)


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT and not listening: it holds a
    free port (``port`` 0) for the hub processes, and takes no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def serve_processes(settings: Settings) -> int:
    """Run ``settings.processes`` hub processes on one port (SO_REUSEPORT: the kernel
    spreads new sockets over them; hubs share nothing but Redis, so a client and its
    job's worker may be on different ones). Each has its own hub id (``HUB_ID`` with
    ``-0``, ``-1``, ... appended; random ids when none is set).

    Returns the exit status once all have stopped: SIGTERM or SIGINT here stops each
    gracefully (SIGTERM to each, then waits); if one exits on its own, the others are
    stopped too and its status is returned (a supervisor restarts the set)."""
    ctx = multiprocessing.get_context("spawn")
    reserved = _reserve_port(settings.hub_host, settings.hub_port)
    port = int(reserved.getsockname()[1])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    procs: list[multiprocessing.process.BaseProcess] = []
    pipes: list[PipeEnd] = []
    try:
        for i in range(settings.processes):
            hub_id = f"{settings.hub_id}-{i}" if settings.hub_id else ""
            child = replace(settings, hub_port=port, hub_id=hub_id)
            ours, theirs = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(child, theirs), name=f"redisq-hub-{i}")
            proc.start()
            theirs.close()
            procs.append(proc)
            pipes.append(ours)
        url = ""
        waiting = list(pipes)
        while waiting and not stop.is_set():
            if any(p.exitcode is not None for p in procs):
                break
            ready = wait(waiting, 0.2)
            for pipe in [p for p in waiting if p in ready]:
                with contextlib.suppress(EOFError):  # EOF: it died; the next turn sees it
                    url = str(pipe.recv())
                waiting.remove(pipe)
        reserved.close()
        if not waiting and all(p.exitcode is None for p in procs):
            print(f"redisq hub listening on {url} ({len(procs)} processes)", flush=True)
            print(f"dashboard {url.replace('ws://', 'http://', 1)}/dashboard", flush=True)
        while not stop.is_set() and all(p.exitcode is None for p in procs):
            wait([p.sentinel for p in procs], 0.2)
    finally:
        reserved.close()
        for p in procs:
            if p.exitcode is None and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join(30)
            if p.exitcode is None:
                p.kill()
                p.join(5)
        for pipe in pipes:
            pipe.close()
    codes = [p.exitcode or 0 for p in procs]
    return 0 if stop.is_set() and not any(codes) else next((c for c in codes if c), 1)
