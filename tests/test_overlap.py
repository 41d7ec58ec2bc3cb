"""A socket's requests overlap: the hub reads a socket's next frame while the last
one's Redis call is in flight, so one client's submits (or a prefetching worker's
reports) share a pipeline; they still reach Redis, and are answered, in the order
sent. Requests that depend on the socket's state wait for the ones before them.

Redis' writes are paused (``CLIENT PAUSE ... WRITE``) to hold the first call in
flight while the test looks at what waits behind it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio

from redisq_server import protocol
from redisq_server.main import Hub
from redisq_server.routes import IN_FLIGHT_BYTES, IN_FLIGHT_PER_SOCKET

from .helpers import invariant_violations, wait_for
from .peers import Peer, open_worker


@contextlib.asynccontextmanager
async def writes_paused(url: str) -> AsyncIterator[None]:
    """Redis runs no write (no engine function) until the block ends."""
    r = redis.asyncio.from_url(url)
    await r.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
    try:
        yield
    finally:
        await r.execute_command("CLIENT", "UNPAUSE")
        await r.aclose()


async def _waiting(hub: Hub, script: str, n: int) -> None:
    async def enough() -> bool:
        return hub.svc.waiting().count(script) >= n

    await wait_for(enough, 10, f"{n} {script} calls waiting behind the one in flight")


def _submit(i: int) -> dict[str, Any]:
    return protocol.submit_job("ov", 0, {"i": i}, job_id=f"ov-{i}", id=f"s{i}")


async def test_one_clients_submits_share_a_pipeline_in_order(hub: Hub, redis_url: str) -> None:
    client = await Peer.open(f"{hub.url}/ws/client/ov")
    async with writes_paused(redis_url):
        for i in range(20):
            await client.send(_submit(i))
        # the first is in flight (held by the pause); the other 19 were read meanwhile
        await _waiting(hub, "submit", 19)
    replies = [await client.expect("job_accepted") for _ in range(20)]
    assert [m["ref"] for m in replies] == [f"s{i}" for i in range(20)]
    assert [m["job_id"] for m in replies] == [f"ov-{i}" for i in range(20)]
    assert [m["position"] for m in replies] == list(range(20))  # FIFO, as sent
    assert hub.svc.calls_pipelined >= 19
    queued = await hub.svc.redis.zrange(hub.svc.keys.queue("ov"), 0, -1)
    assert queued == [f"ov-{i}" for i in range(20)]
    await client.close()


async def test_a_refusal_keeps_its_place_in_the_order_of_replies(hub: Hub, redis_url: str) -> None:
    """The same job id sent twice in a row: the second is refused at once (the
    socket already follows that job), but its error leaves after the first's reply."""
    client = await Peer.open(f"{hub.url}/ws/client/ovdup")
    async with writes_paused(redis_url):
        await client.send(_submit(0))
        await client.send({**_submit(0), "id": "again"})
        (conn,) = hub.registry.clients["ovdup"]

        async def both_read() -> bool:
            return conn.requests == 2

        await wait_for(both_read, 10, "both submits to be read")
    first, second = await client.recv(), await client.recv()
    assert (first["type"], first["ref"]) == ("job_accepted", "s0"), first
    assert (second["type"], second["ref"], second["code"]) == ("error", "again", "duplicate")
    await client.close()


async def test_a_refusal_is_not_overtaken_by_a_later_reply(hub: Hub, redis_url: str) -> None:
    """The same job id twice, then another submit: the refusal (made at once, while
    the first waits for Redis) leaves after the first's reply and before the third's,
    though the first and third are answered in the same loop turn."""
    other = await Peer.open(f"{hub.url}/ws/client/ovhold")
    client = await Peer.open(f"{hub.url}/ws/client/ovdup3")
    async with writes_paused(redis_url):
        alone = hub.svc.calls_alone
        await other.send(protocol.submit_job("ov", 0, {}, job_id="ov-hold", id="h"))

        async def held() -> bool:  # another socket's call holds the one place in flight
            return hub.svc.calls_alone > alone

        await wait_for(held, 10, "the other call in flight")
        await client.send(_submit(10))
        await client.send({**_submit(10), "id": "again"})
        await client.send(_submit(11))
        await _waiting(hub, "submit", 2)  # the first and third will share a pipeline
    got = [await client.recv() for _ in range(3)]
    assert [(m["type"], m["ref"]) for m in got] == [
        ("job_accepted", "s10"),
        ("error", "again"),
        ("job_accepted", "s11"),
    ], got
    await client.close()
    await other.close()


async def test_an_engine_refusal_keeps_its_place(hub: Hub, redis_url: str) -> None:
    """A submit the engine refuses (another client's job id) in the middle of a
    pipeline: its error leaves between the replies before and after it."""
    await hub.svc.submit_job("ov", 0, {}, job_id="theirs", client_id="someone-else")
    client = await Peer.open(f"{hub.url}/ws/client/ovmid")
    async with writes_paused(redis_url):
        await client.send(_submit(20))
        await client.send(_submit(21))
        await client.send({**_submit(22), "job_id": "theirs"})
        await client.send(_submit(23))
        await _waiting(hub, "submit", 3)
    got = [await client.recv() for _ in range(4)]
    assert [m["ref"] for m in got] == ["s20", "s21", "s22", "s23"], got
    assert (got[2]["type"], got[2]["code"]) == ("error", "duplicate")
    await client.close()


async def test_a_prefetching_workers_reports_overlap_in_order(hub: Hub, redis_url: str) -> None:
    for i in range(4):
        await hub.svc.submit_job("ovw", 0, {}, job_id=f"w{i}")
    worker = await open_worker(hub.url, "ov:gpu0", ["ovw"], prefetch=1)
    w0 = await worker.expect("job_assigned")
    assert w0["job_id"] == "w0"
    # its report fills the window: w1 to run next, w2 to hold ahead
    ack = await worker.request({"type": "complete_job", "job_id": "w0", "attempt": 1})
    assert ack["outcome"] == "completed"
    frames = [await worker.expect("job_assigned") for _ in range(2)]
    assert [f["job_id"] for f in frames] == ["w1", "w2"]
    async with writes_paused(redis_url):
        for k, f in enumerate(frames):
            await worker.send(
                {"type": "complete_job", "job_id": f["job_id"], "attempt": f["attempt"]}
                | {"result": k, "id": f"c{k}"}
            )
        await _waiting(hub, "complete", 1)
    acks = [await worker.expect("ack") for _ in range(2)]
    assert [(a["ref"], a["outcome"]) for a in acks] == [("c0", "completed"), ("c1", "completed")]
    for job_id in ("w0", "w1"):
        job = await hub.svc.get_job(job_id)
        assert job is not None and job.status.value == "completed" and job.attempt == 1
    assert await invariant_violations(hub.svc.redis, hub.svc.keys) == []
    await worker.close()


async def test_a_request_on_the_sockets_state_waits_for_the_ones_before(hub: Hub) -> None:
    """A heartbeat sent right behind register_worker is answered as a registered
    worker's (it waits for the registration), not refused."""
    peer = await Peer.open(f"{hub.url}/ws/worker/ov:gpu1")
    await peer.send({"type": "register_worker", "job_types": ["ovr"], "id": "reg"})
    await peer.send({"type": "worker_heartbeat", "id": "hb"})
    first, second = await peer.recv(), await peer.recv()
    assert (first["type"], first["ref"]) == ("worker_registered", "reg")
    assert (second["type"], second["ref"]) == ("ack", "hb"), second
    await peer.close()


async def test_a_report_in_flight_lands_before_the_sockets_loss(hub: Hub, redis_url: str) -> None:
    await hub.svc.submit_job("ovl", 0, {}, job_id="l0")
    worker = await open_worker(hub.url, "ov:gpu2", ["ovl"])
    m = await worker.expect("job_assigned")
    conn = hub.registry.workers["ov:gpu2"]
    async with writes_paused(redis_url):
        await worker.send({"type": "complete_job", "job_id": "l0", "attempt": m["attempt"]})

        async def read() -> bool:
            return bool(conn.in_flight)

        await wait_for(read, 10, "the report to be read")
        await worker.close()  # the socket is gone while its report waits for Redis

    async def gone() -> bool:
        return "ov:gpu2" not in hub.registry.workers

    await wait_for(gone, 10, "the hub to let the socket go")
    job = await hub.svc.get_job("l0")
    assert job is not None and job.status.value == "completed" and job.attempt == 1
    assert job.lost == 0
    assert await invariant_violations(hub.svc.redis, hub.svc.keys) == []


def _count_in_flight(hub: Hub) -> dict[str, int]:
    """Counts the requests ``hub`` is answering at once: ``now`` and ``peak``."""
    seen = {"now": 0, "peak": 0}
    answer = hub.routes._answer

    async def counted(*args: Any) -> None:
        seen["now"] += 1
        seen["peak"] = max(seen["peak"], seen["now"])
        try:
            await answer(*args)
        finally:
            seen["now"] -= 1

    hub.routes._answer = counted  # type: ignore[method-assign]
    return seen


async def test_a_socket_has_at_most_its_limit_in_flight(hub: Hub, redis_url: str) -> None:
    n = IN_FLIGHT_PER_SOCKET + 16
    seen = _count_in_flight(hub)
    client = await Peer.open(f"{hub.url}/ws/client/ovmax")
    async with writes_paused(redis_url):
        for i in range(n):
            await client.send(_submit(i))
        await _waiting(hub, "submit", IN_FLIGHT_PER_SOCKET - 1)
    replies = [await client.expect("job_accepted") for _ in range(n)]
    assert [m["ref"] for m in replies] == [f"s{i}" for i in range(n)]
    assert seen["peak"] == IN_FLIGHT_PER_SOCKET
    await client.close()


async def test_large_frames_in_flight_are_bounded_in_bytes(hub: Hub, redis_url: str) -> None:
    """Frames of 0.4 of the byte bound: two are in flight at once, not more."""
    blob = "x" * int(IN_FLIGHT_BYTES * 0.4)
    seen = _count_in_flight(hub)
    client = await Peer.open(f"{hub.url}/ws/client/ovbig")
    async with writes_paused(redis_url):
        for i in range(5):
            await client.send({**_submit(i), "params": {"blob": blob}})
        await _waiting(hub, "submit", 1)
    replies = [await client.expect("job_accepted") for _ in range(5)]
    assert [m["ref"] for m in replies] == [f"s{i}" for i in range(5)]
    assert seen["peak"] == 2
    await client.close()
