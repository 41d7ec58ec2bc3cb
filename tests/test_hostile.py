"""Hostile input over real sockets to a real hub process.

A property-based test sends random and mutated protocol frames from every role
(client, worker, monitor): wrong types, missing fields, huge numbers, unicode
(lone surrogates included), nested junk, unknown types, bad ids, invalid JSON,
binary frames, deep nesting. Every frame gets its reply (an ``error`` with the
code the protocol's own validator predicts, or the proper reply), the connection
stays open, the hub stays healthy, a bystander's sockets are unaffected, and the
engine's invariants hold. Then floods and limits, each enforced per connection:
20,000 frames as fast as a client can send them, a flood that does not read its
replies (closed 1008), params at and over the limit, a frame over the frame limit
(closed 1009), more subscriptions than ``HUB_MAX_SUBSCRIPTIONS`` and more sockets
than ``HUB_MAX_CONNECTIONS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sync_connect

from redisq_lab.client import QueueClient, RequestError
from redisq_server import EngineLimits, Keys, RedisService, Settings
from redisq_server.main import Hub
from redisq_server.protocol import ErrorCode, Message, ProtocolError, Role, decode_message

from .helpers import invariant_violations_sync, wait_for
from .peers import Peer
from .test_faults import LiveHub, health

MAX_SUBSCRIPTIONS = 2000
UNSERVED = "zz-unserved-9q"  # a job type no worker in this module accepts
BYSTANDER_TYPE = "zz-bystander-7k"
KNOWN_IDS = [f"known-{i}" for i in range(5)]  # real jobs, for worker messages to aim at

#: the reply each valid request gets (besides an ``error``)
REPLIES = {
    "submit_job": "job_accepted",
    "get_job_status": "job_status",
    "subscribe_job": "subscribed",
    "cancel_job": "job_status",
    "get_stats": "stats",
    "get_events": "events",
    "register_worker": "worker_registered",
    "worker_heartbeat": "ack",
    "update_job_progress": "ack",
    "complete_job": "ack",
    "fail_job": "ack",
    "subscribe_stats": "stats",
    "subscribe_events": "subscribed",
}
#: error codes a well-formed request may still get (everything else is a hub bug here)
REQUEST_ERRORS = {
    ErrorCode.INVALID_FIELD,  # e.g. params that are not JSON-serialisable (NaN)
    ErrorCode.NOT_ALLOWED,
    ErrorCode.NOT_FOUND,
    ErrorCode.DUPLICATE,
    ErrorCode.STALE_ATTEMPT,
    ErrorCode.JOB_CANCELLED,
    ErrorCode.BAD_STATE,
    ErrorCode.TOO_LARGE,
    ErrorCode.RATE_LIMITED,
}
PATHS = {
    Role.CLIENT: "/ws/client/hostile-c",
    Role.WORKER: "/ws/worker/hostile-m:gpu0",
    Role.MONITOR: "/ws/monitor/hostile-mon",
}
SENTINEL = {Role.CLIENT: "get_stats", Role.WORKER: "worker_heartbeat", Role.MONITOR: "get_stats"}


# ------------------------------------------------------------------ the module hub


class SyncPeer:
    """A blocking protocol peer (the property test is synchronous)."""

    def __init__(self, url: str) -> None:
        self._stack = contextlib.ExitStack()
        self.ws: SyncConnection = self._stack.enter_context(
            sync_connect(url, max_size=None, compression=None, open_timeout=10)
        )
        welcome = self.recv()
        assert welcome["type"] == "welcome"
        self.n = 0

    def recv(self, timeout: float = 10) -> dict[str, Any]:
        return json.loads(self.ws.recv(timeout=timeout))  # type: ignore[no-any-return]

    def sentinel(self, kind: str) -> list[dict[str, Any]]:
        """Send a harmless request; return every frame up to and excluding its reply."""
        self.n += 1
        rid = f"sentinel-{self.n}"
        self.ws.send(json.dumps({"type": kind, "id": rid}))
        before: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = self.recv(max(0.01, deadline - time.monotonic()))
            if m.get("ref") == rid:
                return before
            before.append(m)
        raise AssertionError(f"no reply to {rid}")

    def close(self) -> None:
        self._stack.close()


class Env:
    def __init__(self, hub: LiveHub, namespace: str, redis_url: str) -> None:
        self.hub = hub
        self.keys = Keys(namespace)
        self.namespace = namespace
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.peers: dict[Role, SyncPeer] = {}

    def peer(self, role: Role) -> SyncPeer:
        """This role's hostile socket, reopened if an earlier example lost it."""
        p = self.peers.get(role)
        if p is None or p.ws.close_code is not None:
            p = self.peers[role] = SyncPeer(self.hub.url + PATHS[role])
        return p

    def check_healthy(self) -> None:
        status, body = health(self.hub.port)
        assert status == 200 and body["status"] == "ok", body
        assert invariant_violations_sync(self.redis, self.keys) == []
        assert self.hub.alive


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[Env]:
    namespace = f"hostile{os.getpid()}"
    hub = LiveHub(
        redis_url,
        namespace,
        env={"HUB_MAX_SUBSCRIPTIONS": str(MAX_SUBSCRIPTIONS), "REDISQ_LEASE_S": "30"},
    )
    e = Env(hub, namespace, redis_url)
    with RedisService(url=redis_url, limits=EngineLimits(namespace=namespace)) as svc:
        for job_id in KNOWN_IDS:
            svc.add_job(job_id=job_id, job_type="t", client_id="hostile-c")
    try:
        yield e
    finally:
        for p in e.peers.values():
            p.close()
        e.redis.close()
        assert hub.stop() == 0
        assert "Traceback" not in hub.output(), hub.output()[-3000:]


# -------------------------------------------------------------------- strategies

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**53, -(2**53), 2**63, 10**30, -1, 0, 1, 100, 32768, -32769]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3),
    st.sampled_from(
        ["", " ", "\x00", "../../etc/passwd", "a" * 129, "m1:gpu0", "é" * 70, "0", "$", "*"]
    ),
    st.sampled_from(KNOWN_IDS),
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
NAME = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]{0,12}\Z")
#: a valid name with whitespace or a control character after it (``$`` matched before "\n")
TRAILING = st.tuples(NAME, st.sampled_from(["\n", "\r\n", " ", "\t", "\x00", "\x85"])).map("".join)
JOB_ID = st.one_of(st.sampled_from(KNOWN_IDS), NAME, TRAILING)
JOB_TYPE = st.sampled_from(["t", "render", "x"]) | NAME | TRAILING
ATTEMPT = st.integers(-2, 5) | st.sampled_from([2**53 - 1, 2**53, 2**63, 10**30])
REQUEST_ID = st.one_of(st.from_regex(r"\Ah[0-9a-z]{1,8}\Z"), st.integers(-(2**60), 2**60))

FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "submit_job": {
        "job_type": JOB_TYPE,
        "priority": st.integers(-40_000, 40_000),
        "params": st.dictionaries(st.text(max_size=8), JUNK, max_size=4),
        "job_id": JOB_ID,
        "max_attempts": st.integers(-2, 120),
    },
    "get_job_status": {"job_id": JOB_ID},
    "subscribe_job": {"job_id": JOB_ID},
    "cancel_job": {"job_id": JOB_ID},
    "get_stats": {},
    "get_events": {
        "since": st.sampled_from(
            [
                "0",
                "0-0",
                "$",
                "-",
                "+",
                "99999999999999-0",
                "99999999999999999999-0",
                "0-18446744073709551616",
                "18446744073709551615-18446744073709551615",
                "0\n",
            ]
        )
        | st.from_regex(r"\A\d{1,20}(-\d{1,20})?\Z"),
        "limit": st.integers(-5, 12_000),
    },
    "register_worker": {
        "job_types": st.lists(JOB_TYPE, max_size=4),
        "capabilities": st.dictionaries(st.text(max_size=8), JUNK, max_size=4),
    },
    "worker_heartbeat": {},
    "update_job_progress": {
        "job_id": JOB_ID,
        "attempt": ATTEMPT,
        "progress": st.floats(-10, 110) | st.integers(-5, 105),
        "message": st.text(max_size=50),
    },
    "complete_job": {"job_id": JOB_ID, "attempt": ATTEMPT, "result": JUNK},
    "fail_job": {
        "job_id": JOB_ID,
        "attempt": ATTEMPT,
        "error": st.text(max_size=50),
        "retryable": st.booleans(),
    },
    "subscribe_stats": {"interval_ms": st.integers(0, 100_000)},
    "subscribe_events": {},
}
ROLE_TYPES = {
    Role.CLIENT: [
        "submit_job",
        "get_job_status",
        "subscribe_job",
        "cancel_job",
        "get_stats",
        "get_events",
    ],
    Role.WORKER: [
        "register_worker",
        "worker_heartbeat",
        "update_job_progress",
        "complete_job",
        "fail_job",
    ],
    Role.MONITOR: [
        "get_stats",
        "subscribe_stats",
        "subscribe_events",
        "get_job_status",
        "get_events",
    ],
}


@st.composite
def message(draw: st.DrawFn, role: Role) -> dict[str, Any]:
    """A valid-looking request of this role (fields may still be out of range)."""
    kind = draw(st.sampled_from(ROLE_TYPES[role]))
    msg: dict[str, Any] = {"type": kind}
    for name, strategy in FIELDS[kind].items():
        if draw(st.integers(0, 3)):  # usually present
            msg[name] = draw(strategy)
    if draw(st.integers(0, 4)):
        msg["id"] = draw(REQUEST_ID)
    return msg


@st.composite
def mutated(draw: st.DrawFn, role: Role) -> dict[str, Any] | list[Any] | Any:
    msg = draw(message(role))
    op = draw(st.sampled_from(["none", "drop", "junk", "extra", "type", "id", "replace"]))
    keys = sorted(msg)
    if op == "drop":
        msg.pop(draw(st.sampled_from(keys)))
    elif op == "junk":
        msg[draw(st.sampled_from(keys))] = draw(JUNK)
    elif op == "extra":
        msg[draw(st.text(max_size=12))] = draw(JUNK)
    elif op == "type":
        msg["type"] = draw(
            st.sampled_from([*sorted(REPLIES), "welcome", "error", "job_assigned", "event"])
            | st.text(max_size=20)
            | JUNK
        )
    elif op == "id":
        msg["id"] = draw(JUNK | st.text(min_size=120, max_size=140))
    elif op == "replace":
        return draw(JUNK)
    return msg


def _text(value: Any, ascii_only: bool) -> str:
    text = json.dumps(value, ensure_ascii=ascii_only)
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates travel as \\u escapes
        text = json.dumps(value)
    return text


@st.composite
def frame(draw: st.DrawFn, role: Role) -> str | bytes:
    kind = draw(st.sampled_from(["json"] * 6 + ["bytes", "text", "binary", "cut", "deep", "num"]))
    if kind in ("json", "bytes", "cut"):
        text = _text(draw(mutated(role)), draw(st.booleans()))
        if kind == "bytes":
            return text.encode()
        if kind == "cut":
            return text[: draw(st.integers(0, max(0, len(text) - 1)))]
        return text
    if kind == "text":
        return draw(st.text(max_size=100))
    if kind == "binary":
        return draw(st.binary(max_size=100))
    if kind == "deep":
        depth = draw(st.sampled_from([10, 100, 5000, 100_000]))
        opener = draw(st.sampled_from(["[", '{"a":', '{"type":"submit_job","params":{"a":']))
        if opener == "[":
            return "[" * depth + "]" * depth
        return opener * depth + "1" + "}" * opener.count("{") * depth
    digits = draw(st.sampled_from([20, 400, 5000]))
    field = draw(st.sampled_from(["priority", "id", "max_attempts"]))
    return f'{{"type":"submit_job","job_type":"t","{field}":{"9" * digits}}}'


# --------------------------------------------------------------- property test


def _decode(raw: str | bytes, role: Role) -> Message | ProtocolError:
    """What the protocol's own validator makes of ``raw``: the message, or the error."""
    try:
        return decode_message(raw, role)
    except ProtocolError as err:
        return err


def check_reply(role: Role, raw: str | bytes, between: list[dict[str, Any]]) -> None:
    """The frames received after ``raw`` and before the sentinel's reply hold the
    reply the protocol promises for ``raw``."""
    errors = [m for m in between if m.get("type") == "error"]
    assert all(m["code"] in {c.value for c in ErrorCode} for m in errors), errors
    assert not [m for m in errors if m["code"] == ErrorCode.INTERNAL], errors
    msg = _decode(raw, role)
    if isinstance(msg, ProtocolError):
        assert len(errors) == 1, (raw[:200], between)
        assert errors[0]["code"] == msg.code.value, (raw[:200], errors, msg)
        assert errors[0]["ref"] == msg.ref
        return
    if msg.id is None:  # replies carry "ref": null; a worker's ack is not sent at all
        assert len(errors) <= 1 and all(m["ref"] is None for m in errors)
        return
    replies = [m for m in between if "ref" in m and m["ref"] == msg.id]
    assert len(replies) == 1, (raw[:200], between)
    reply = replies[0]
    if reply["type"] == "error":
        assert reply["code"] in REQUEST_ERRORS, (raw[:200], reply)
    else:
        assert reply["type"] == REPLIES[msg.type.value], (raw[:200], reply)


@pytest.mark.parametrize("role", list(Role), ids=str)
def test_random_and_mutated_frames_get_answers(env: Env, role: Role) -> None:
    bystander = SyncPeer(env.hub.url + "/ws/client/bystander")
    ran: Counter[str] = Counter()

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(frames=st.lists(frame(role), min_size=1, max_size=5))
    def run(frames: list[str | bytes]) -> None:
        peer = env.peer(role)
        ran["examples"] += 1
        for raw in frames:
            ran["frames"] += 1
            peer.ws.send(raw)
            try:
                between = peer.sentinel(SENTINEL[role])
            except ConnectionClosed as closed:
                raise AssertionError(f"connection closed by {raw[:200]!r}: {closed}") from None
            check_reply(role, raw, between)
        assert bystander.sentinel("get_stats") is not None
        env.check_healthy()

    run()
    assert ran["examples"] >= 150 and ran["frames"] >= 300, ran
    env.peers.pop(role).close()
    # a full job lifecycle between bystanders still works after all that
    worker = SyncPeer(env.hub.url + "/ws/worker/bystander-m:gpu0")
    worker.ws.send(
        json.dumps({"type": "register_worker", "id": "reg", "job_types": [BYSTANDER_TYPE]})
    )
    assert worker.recv()["type"] == "worker_registered"
    bystander.ws.send(json.dumps({"type": "submit_job", "id": "s", "job_type": BYSTANDER_TYPE}))
    accepted = bystander.recv()
    assert accepted["type"] == "job_accepted", accepted
    assigned = _next(worker, "job_assigned")
    worker.ws.send(
        json.dumps(
            {"type": "complete_job", "job_id": assigned["job_id"], "attempt": 1, "result": 1}
        )
    )
    done = _next(bystander, "job_completed")
    assert done["job_id"] == accepted["job_id"] and done["result"] == 1
    worker.close()
    bystander.close()
    env.check_healthy()


def _next(peer: SyncPeer, kind: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = peer.recv(max(0.01, deadline - time.monotonic()))
        if m.get("type") == kind:
            return m
    raise AssertionError(f"no {kind}")


# ------------------------------------------------------------------------ floods


async def test_flood_of_20000_frames_is_answered_in_order(env: Env) -> None:
    """A client sends 20,000 frames as fast as it can (bad JSON, unknown types,
    lookups that go to Redis, stats) while reading: every one is answered, in
    order, and a bystander's requests keep being served meanwhile."""
    n = 20_000
    frames: list[str] = []
    expected: list[tuple[Any, str]] = []
    for i in range(n):
        k = i % 4
        if k == 0:
            frames.append("{not json")
            expected.append((None, "bad_json"))
        elif k == 1:
            frames.append(json.dumps({"type": "get_job_status", "job_id": f"nope-{i}", "id": i}))
            expected.append((i, "not_found"))
        elif k == 2:
            frames.append(json.dumps({"type": "get_stats", "id": i}))
            expected.append((i, "stats"))
        else:
            frames.append(json.dumps({"type": "teleport", "id": i}))
            expected.append((i, "unknown_type"))

    flood = await Peer.open(f"{env.hub.url}/ws/client/flooder")
    bystander = await Peer.open(f"{env.hub.url}/ws/client/bystander2")
    got: list[tuple[Any, str]] = []

    async def read() -> None:
        while len(got) < n:
            m = await flood.recv(timeout=30)
            got.append((m.get("ref"), m["code"] if m["type"] == "error" else m["type"]))

    async def send() -> None:
        for f in frames:
            await flood.ws.send(f)

    latencies: list[float] = []

    async def probe() -> None:
        while len(got) < n:
            t0 = time.monotonic()
            reply = await bystander.request({"type": "get_stats"}, timeout=10)
            assert reply["type"] == "stats"
            latencies.append(time.monotonic() - t0)
            await asyncio.sleep(0.02)

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(read(), send(), probe()), 120)
    elapsed = time.monotonic() - started
    assert got == expected
    assert len(latencies) >= 3 and max(latencies) < 2.0, (max(latencies), elapsed)
    await flood.close()
    await bystander.close()
    env.check_healthy()


async def test_flood_without_reading_is_closed_1008(redis_url: str, namespace: str) -> None:
    """A monitor asks for big replies (``get_events``) as fast as it can and never
    reads them: once its send queue (here 16 frames) is full the hub closes it with
    1008 and stops working for it (the frames it still sends are read and dropped);
    a bystander is unaffected and nothing of the socket is left behind."""
    limits = EngineLimits(namespace=namespace)
    settings_ = Settings(redis_url=redis_url, hub_port=0, limits=limits, send_queue_frames=16)
    async with Hub(settings_) as hub:
        for i in range(200):
            await hub.svc.submit_job("t", params={"i": i})
        handled: Counter[str] = Counter()
        handle = hub.routes.handle

        async def counting(conn: Any, raw: str | bytes) -> None:
            handled[conn.id] += 1
            await handle(conn, raw)

        hub.routes.handle = counting  # type: ignore[method-assign]
        bystander = await Peer.open(f"{hub.url}/ws/client/bystander")
        greedy = await Peer.open(f"{hub.url}/ws/monitor/greedy")
        greedy.ws.transport.pause_reading()
        request = json.dumps({"type": "get_events", "since": "0", "limit": 200})
        sent = 0
        deadline = time.monotonic() + 30
        try:
            while sent < 20_000 and time.monotonic() < deadline:
                await greedy.ws.send(request)
                sent += 1
        except ConnectionClosed:
            pass
        await wait_for(lambda: _let_go(hub, "greedy"), 30, "the hub to close the greedy socket")
        greedy.ws.transport.resume_reading()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await greedy.recv(timeout=30)
        replies = sum(1 for m in greedy.seen if m.get("type") == "events")
        assert 0 < replies < sent
        assert handled["greedy"] < 2000, handled  # the rest was read and dropped
        rcvd = closed.value.rcvd  # None: the close frame was stuck, the hub aborted
        assert rcvd is None or rcvd.code == 1008
        await wait_for(lambda: _no_monitors(hub), 10, "the greedy monitor to be gone")
        assert (await bystander.request({"type": "get_stats"}))["type"] == "stats"
        await bystander.close()
        await wait_for(lambda: _empty(hub), 10, "every socket forgotten")


async def _let_go(hub: Hub, monitor_id: str) -> bool:
    return all(c.closing for c in hub.registry.monitors if c.id == monitor_id)


async def _no_monitors(hub: Hub) -> bool:
    return not hub.registry.monitors


async def _empty(hub: Hub) -> bool:
    r = hub.registry
    return r.count == 0 and not r.clients and not r.workers and not r.monitors and not r.job_subs


# ------------------------------------------------------------------------ limits


async def test_params_at_the_limit_are_accepted_and_over_it_refused(env: Env) -> None:
    """The default ``REDISQ_MAX_PARAMS_BYTES`` (8 MiB of compact UTF-8 JSON): exactly
    at the limit is accepted, one byte over is ``too_large``, with ASCII and with
    two-byte characters alike; a frame over ``HUB_MAX_FRAME_BYTES`` (24 MiB) closes
    the socket with 1009 and nothing else."""
    limit = EngineLimits().max_params_bytes
    shell = len('{"b":""}')
    c = await Peer.open(f"{env.hub.url}/ws/client/big")
    for char, width in (("x", 1), ("é", 2)):
        fill = (limit - shell) // width
        pad = "x" * ((limit - shell) - fill * width)
        params = {"b": pad + char * fill}
        assert len(json.dumps(params, separators=(",", ":"), ensure_ascii=False).encode()) == limit
        ok = await _submit_utf8(c, params)
        assert ok["type"] == "job_accepted", ok
        params["b"] += "x"
        err = await _submit_utf8(c, params)
        assert err["type"] == "error" and err["code"] == "too_large", err
        cancel = await c.request({"type": "cancel_job", "job_id": ok["job_id"]})
        assert cancel["status"] == "cancelled"
    max_frame = c.seen[0]["max_frame_bytes"]
    assert max_frame == 24 * 1024 * 1024
    # under the frame limit but over the params limit: an error, the socket stays
    err = await c.request(
        {"type": "submit_job", "job_type": UNSERVED, "params": {"b": "x" * (20 << 20)}}, 60
    )
    assert err["code"] == "too_large"
    await c.ws.send(json.dumps({"type": "get_stats", "pad": "x" * max_frame}))
    with pytest.raises(ConnectionClosed) as closed:
        await c.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    env.check_healthy()


async def _submit_utf8(peer: Peer, params: dict[str, Any]) -> dict[str, Any]:
    """``submit_job`` sent as raw UTF-8 (no \\u escapes), so the frame stays small."""
    rid = f"big-{time.monotonic_ns()}"
    msg = {"type": "submit_job", "id": rid, "job_type": UNSERVED, "params": params}
    await peer.ws.send(json.dumps(msg, ensure_ascii=False))
    return await peer.expect(lambda m: m.get("ref") == rid, 60)


async def test_subscriptions_are_limited_per_socket(env: Env) -> None:
    """A client socket follows at most ``HUB_MAX_SUBSCRIPTIONS`` (here 2,000)
    unfinished jobs: the next submit or subscribe is ``rate_limited``; another
    socket has its own allowance; finishing jobs makes room again."""
    async with QueueClient(env.hub.url, "subs") as qc, QueueClient(env.hub.url, "subs") as qc2:
        ids = await qc.submit_many(
            [{"job_type": UNSERVED} for _ in range(MAX_SUBSCRIPTIONS)], concurrency=64
        )
        assert len(set(ids)) == MAX_SUBSCRIPTIONS
        with pytest.raises(RequestError) as err:
            await qc.submit(UNSERVED)
        assert err.value.code == "rate_limited"
        other = await qc2.submit(UNSERVED)  # per socket: the second one has room
        with pytest.raises(RequestError) as err:
            await qc.subscribe(other)
        assert err.value.code == "rate_limited"
        for job_id in ids[:10]:
            await qc.cancel(job_id)

        refusals: list[str] = []

        async def room() -> bool:
            try:
                await qc.submit(UNSERVED)
            except RequestError as e:
                refusals.append(e.code)
                return False
            return True

        await wait_for(room, 10, "room after cancelling")
        assert set(refusals) <= {"rate_limited"}
        stats = await qc.stats()
        assert stats["job_types"][UNSERVED]["queued"] == MAX_SUBSCRIPTIONS - 10 + 2
        for job_id in [*ids[10:], other]:
            await qc2.cancel(job_id)
    env.check_healthy()


async def test_connections_are_limited_per_hub(redis_url: str, namespace: str) -> None:
    """``HUB_MAX_CONNECTIONS`` (here 20): the next handshake gets HTTP 503; a closed
    socket frees its place; nothing of any socket is left behind."""
    limits = EngineLimits(namespace=namespace)
    s = Settings(redis_url=redis_url, hub_port=0, limits=limits, max_connections=20)
    async with Hub(s) as hub:
        peers = [await Peer.open(f"{hub.url}/ws/client/c{i}") for i in range(20)]
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"{hub.url}/ws/monitor/m")
        assert refused.value.response.status_code == 503
        await peers.pop().close()
        await wait_for(lambda: _count(hub, 19), 10, "a free place")
        peers.append(await Peer.open(f"{hub.url}/ws/monitor/m"))
        for p in peers:
            await p.close()
        await wait_for(lambda: _empty(hub), 10, "every socket forgotten")


async def _count(hub: Hub, n: int) -> bool:
    return hub.registry.count == n


# ------------------------------------------------------------------- ids and paths


async def _status(url: str) -> int:
    with pytest.raises(InvalidStatus) as err:
        await connect(url, open_timeout=10)
    return err.value.response.status_code


async def test_paths_are_refused_as_documented(env: Env) -> None:
    """docs/protocol.md, Refused handshakes: an invalid id (a trailing newline, a
    space or a control character, percent-encoded or not; too long) is 400; a missing
    or empty id is 404; a request line over 8 KiB is 414 (the WebSocket library)."""
    url = env.hub.url
    for path in (
        "/ws/worker/m:g0%0A",
        "/ws/worker/m%0A:g0",
        "/ws/worker/m:g0%0D%0A",
        "/ws/worker/m:g0%20",
        "/ws/client/c1%0A",
        "/ws/client/c1%00",
        "/ws/monitor/mon%09",
        "/ws/client/" + "c" * 65,
        "/ws/client/" + "c" * 8000,
    ):
        assert await _status(url + path) == 400, path
    for path in ("/ws/client/", "/ws/worker/", "/ws/monitor/", "/ws/client", "/ws/client/c1/x"):
        assert await _status(url + path) == 404, path
    assert await _status(url + "/ws/client/" + "c" * 10_000) == 414
    # the valid forms still open
    for path in ("/ws/worker/m:g0", "/ws/client/c1", "/ws/monitor/mon"):
        peer = await Peer.open(url + path)
        await peer.close()


async def test_out_of_range_requests_are_invalid_fields(env: Env) -> None:
    """``since`` past 2^64 - 1 and ``attempt`` past 2^53 - 1 are ``invalid_field``,
    refused before any Redis call (no ``unavailable``, no warning in the log)."""
    client = await Peer.open(env.hub.url + "/ws/client/range-c")
    for since in ("99999999999999999999-0", "0-99999999999999999999", "18446744073709551616"):
        err = await client.request({"type": "get_events", "since": since})
        assert (err["type"], err["code"]) == ("error", "invalid_field"), err
    ok = await client.request({"type": "get_events", "since": "18446744073709551615-0"})
    assert ok["type"] == "events" and ok["events"] == []
    worker = await Peer.open(env.hub.url + "/ws/worker/range-m:gpu0")
    reg = await worker.request({"type": "register_worker", "job_types": [UNSERVED]})
    assert reg["type"] == "worker_registered"
    for attempt in (10**30, 2**63, 2**53):
        for kind in ("complete_job", "fail_job", "update_job_progress"):
            report = {"type": kind, "job_id": KNOWN_IDS[0], "attempt": attempt}
            report |= {"error": "x", "progress": 1}
            err = await worker.request(report)
            assert (err["type"], err["code"]) == ("error", "invalid_field"), (kind, err)
    await client.close()
    await worker.close()
    out = env.hub.output()
    assert "Redis error" not in out and "Invalid stream ID" not in out, out[-2000:]
