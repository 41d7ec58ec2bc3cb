"""Engine calls of one hub are pipelined: a lone call leaves at once, the calls made
while one is in flight leave together in one pipeline, each with its own reply."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio

from redisq_server import (
    AsyncRedisService,
    EngineLimits,
    ErrorCode,
    JobStatus,
    ProtocolError,
    RedisService,
)
from redisq_server.scripts import function_name, library_name


async def test_a_lone_call_is_sent_alone(svc: AsyncRedisService) -> None:
    for _ in range(3):
        await svc.submit_job("lone", 0, {})
    assert (svc.calls_alone, svc.calls_pipelined, svc.pipelines) == (3, 0, 0)


async def test_calls_made_while_one_is_in_flight_share_one_pipeline(
    svc: AsyncRedisService,
) -> None:
    results = await asyncio.gather(*(svc.submit_job("many", i % 3, {"i": i}) for i in range(20)))
    # the first leaves alone; the 19 made in the same turn wait for it, then go together
    assert svc.calls_alone == 1 and svc.calls_pipelined == 19 and svc.pipelines == 1
    assert len({r.job_id for r in results}) == 20
    assert all(r.status is JobStatus.QUEUED for r in results)
    for i, r in enumerate(results):
        job = await svc.get_job(r.job_id)
        assert job is not None and job.params == {"i": i} and job.priority == i % 3


async def test_a_pipeline_carries_at_most_pipeline_calls(svc: AsyncRedisService) -> None:
    """100 calls in one turn: the first leaves alone, the other 99 in pipelines of at
    most 32 (a pipeline of every waiting call made a busy hub's jobs move in waves),
    each call still answered in order with its own reply."""
    assert svc.pipeline_calls == 32
    results = await asyncio.gather(*(svc.submit_job("cap", 0, {"i": i}) for i in range(100)))
    assert (svc.calls_alone, svc.calls_pipelined, svc.pipelines) == (1, 99, 4)
    for i, r in enumerate(results):
        job = await svc.get_job(r.job_id)
        assert job is not None and job.params == {"i": i} and job.position == i


async def test_each_call_in_a_pipeline_gets_its_own_error(svc: AsyncRedisService) -> None:
    first = await svc.submit_job("errs", 0, {}, job_id="taken")
    outcomes = await asyncio.gather(
        svc.submit_job("errs", 0, {}, job_id="a"),
        svc.submit_job("errs", 0, {}, job_id="taken"),  # already exists
        svc.submit_job("errs", 0, {}, job_id="b"),
        return_exceptions=True,
    )
    assert first.status is JobStatus.QUEUED
    assert svc.pipelines == 1
    ok_a, dup, ok_b = outcomes
    assert isinstance(dup, ProtocolError) and dup.code == ErrorCode.DUPLICATE
    assert not isinstance(ok_a, BaseException) and ok_a.job_id == "a"
    assert not isinstance(ok_b, BaseException) and ok_b.job_id == "b"


async def test_a_pipeline_reloads_the_library_redis_lost(svc: AsyncRedisService) -> None:
    await svc.submit_job("flush", 0, {})
    await svc.redis.function_flush()
    results = await asyncio.gather(*(svc.submit_job("flush", 0, {}) for _ in range(5)))
    assert svc.pipelines == 1 and all(r.status is JobStatus.QUEUED for r in results)
    assert (await svc.get_stats())["queued"] == 6
    libraries = [
        dict(zip(lib[::2], lib[1::2], strict=True)) for lib in await svc.redis.function_list()
    ]
    assert [lib["library_name"] for lib in libraries] == [library_name()]


async def test_a_lone_call_reloads_the_library_redis_lost(svc: AsyncRedisService) -> None:
    await svc.redis.function_flush()
    assert (await svc.submit_job("flush1", 0, {})).status is JobStatus.QUEUED
    assert svc.calls_alone == 1 and svc.pipelines == 0


def test_the_blocking_service_reloads_the_library_redis_lost(
    redis_url: str, limits: EngineLimits
) -> None:
    with RedisService(url=redis_url, limits=limits) as sync:
        sync.redis.function_flush()
        assert sync.submit_job("flush2", 0, {}).status is JobStatus.QUEUED
        assert sync.get_stats()["queued"] >= 1


async def test_depth_zero_sends_every_call_alone(redis_url: str, limits: EngineLimits) -> None:
    svc = AsyncRedisService(redis_url, limits=limits, pipeline_depth=0)
    try:
        await asyncio.gather(*(svc.submit_job("zero", 0, {}) for _ in range(8)))
        assert (svc.calls_alone, svc.pipelines) == (8, 0)
    finally:
        await svc.aclose()


async def test_a_caller_that_gives_up_before_its_pipeline_leaves_runs_nothing(
    svc: AsyncRedisService,
) -> None:
    first = asyncio.ensure_future(svc.submit_job("gone", 0, {}, job_id="kept"))
    await asyncio.sleep(0)  # the first call is in flight: the next one waits
    waiting = asyncio.ensure_future(svc.submit_job("gone", 0, {}, job_id="dropped"))
    await asyncio.sleep(0)
    waiting.cancel()
    await first
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await svc.get_job("kept") is not None
    assert await svc.get_job("dropped") is None
    assert svc.calls_pipelined == 0


async def test_calls_on_a_killed_connection_are_sent_again(
    svc: AsyncRedisService, redis_url: str
) -> None:
    await svc.submit_job("killed", 0, {})  # the service now holds a connection
    other = redis.asyncio.Redis.from_url(redis_url)
    try:
        killed = await other.client_kill_filter(_type="normal", skipme=True)
    finally:
        await other.aclose()
    assert killed >= 1
    results = await asyncio.gather(*(svc.submit_job("killed", 0, {}) for _ in range(4)))
    assert all(r.status is JobStatus.QUEUED for r in results)
    stats = await svc.get_stats()
    assert stats["queued"] == 5 and stats["totals"]["submitted"] == 5


async def test_a_report_whose_reply_was_lost_is_not_refused_by_its_own_rerun(
    svc: AsyncRedisService,
) -> None:
    """Redis runs a worker's completion and the connection breaks before its reply
    is read: the call is sent again and meets a job it completed itself. That
    refusal is not the answer: the caller gets a connection error (its outage path:
    the hub rechecks the job), not `bad_state`; the job is completed once."""
    assert await svc.register_worker("m:gpu0", ["lost"], session="s") is None
    job = await svc.submit_job("lost", 0, {})
    assert job.assignment is not None
    (conn,) = svc._pipe_conns  # the connection the next lone call is written on
    read = conn.read_response

    async def read_then_break(*args: Any, **kwargs: Any) -> Any:
        conn.read_response = read  # type: ignore[method-assign]  # once
        await read(*args, **kwargs)  # Redis ran the call; its reply is lost
        raise redis.exceptions.ConnectionError("connection reset")

    conn.read_response = read_then_break  # type: ignore[method-assign]
    with pytest.raises(redis.exceptions.ConnectionError, match="may have done it"):
        await svc.complete_job(job.job_id, 1, "m:gpu0", {"ok": 1})
    done = await svc.get_job(job.job_id)
    assert done is not None and done.status is JobStatus.COMPLETED and done.result == {"ok": 1}
    assert (await svc.get_stats())["totals"]["completed"] == 1


async def test_a_call_whose_reply_is_lost_and_whose_next_try_cannot_connect_is_answered(
    svc: AsyncRedisService,
) -> None:
    """Redis runs a submit and the connection breaks before its reply is read; the
    next try cannot connect; the third is answered with the stored job. The call
    gets that answer (listed unsure twice, it is still one rerun) and the hub is
    told once that its first run's events may have gone with the lost reply."""
    await svc.submit_job("twice", 0, {}, client_id="c", job_id="t0")  # a connection held
    (conn,) = svc._pipe_conns
    read, connect = conn.read_response, conn.connect

    async def read_then_break(*args: Any, **kwargs: Any) -> Any:
        conn.read_response = read  # type: ignore[method-assign]  # once
        await read(*args, **kwargs)  # Redis ran the call; its reply is lost
        raise redis.exceptions.ConnectionError("connection reset")

    async def refuse_once() -> None:
        conn.connect = connect  # type: ignore[method-assign]
        raise redis.exceptions.ConnectionError("connection refused")

    conn.read_response = read_then_break  # type: ignore[method-assign]
    conn.connect = refuse_once  # type: ignore[method-assign]
    reran: list[str] = []
    svc.on_rerun = lambda op, _svc: reran.append(op.script)
    lost = svc.replies_lost
    r = await svc.submit_job("twice", 0, {}, client_id="c", job_id="t1")
    assert r.status is JobStatus.QUEUED and r.position == 1
    assert reran == ["submit"] and svc.replies_lost == lost + 2
    assert (await svc.get_stats())["totals"]["submitted"] == 2


async def test_calls_are_packed_as_redis_py_packs_them(svc: AsyncRedisService) -> None:
    conn = svc.redis.connection_pool.make_connection()
    ops = [
        svc.ops.submit("pack", 7, {"prompt": "ünïcode ✓"}, job_id="p1", client_id="c"),
        svc.ops.complete("p1", 1, "m:gpu0", {"x": [1, 2.5, None]}),
        svc.ops.stats(60.0),
    ]
    for hub_id in ("", "hub-x"):  # the hub id is part of every call's fixed start
        svc.hub_id = hub_id
        for op in ops:
            expected = b"".join(conn.pack_command("FCALL", *svc._call(op)))
            assert svc._pack(op) == expected


async def test_the_next_pipeline_is_on_its_way_before_the_last_caller_resumes(
    svc: AsyncRedisService,
) -> None:
    """The calls that waited for a call in flight are written to Redis as it
    returns, before its caller goes on (not a loop turn later): Redis runs them
    while the hub handles that reply."""
    await svc.submit_job("early", 0, {})  # the service now holds a connection
    conn = svc._pipe_conns[-1]
    written: list[bytes] = []
    write = conn._writer.write

    def record(data: bytes) -> None:
        written.append(bytes(data))
        write(data)

    conn._writer.write = record
    on_the_wire: list[int] = []

    async def first() -> None:
        await svc.submit_job("early", 0, {}, job_id="first")
        on_the_wire.append(b"".join(written).count(b"FCALL"))

    rest = [svc.submit_job("early", 0, {}, job_id=f"next{i}") for i in range(3)]
    await asyncio.gather(first(), *rest)
    assert on_the_wire == [3]
    assert (svc.calls_alone, svc.calls_pipelined, svc.pipelines) == (2, 3, 1)
    for job_id in ("first", "next0", "next1", "next2"):
        assert await svc.get_job(job_id) is not None


async def test_the_deadlines_of_answered_calls_are_not_kept(svc: AsyncRedisService) -> None:
    """Each call has a deadline (one timer serves them all: the queued calls', the
    lone calls' and the pipelines'); a call's entry goes once it is answered and a
    later call comes, so a busy hub keeps about the calls in flight, not every call
    of the last ``call_timeout_s``."""
    for burst in range(3):
        pipelines = svc.pipelines
        await asyncio.gather(*(svc.submit_job("dl", 0, {}) for _ in range(50)))
        assert svc.calls_pipelined == 49 * (burst + 1)
        kept = svc._deadlines
        # at most this burst's: 49 queued calls, the lone call, its pipelines
        assert len(kept) <= 50 + svc.pipelines - pipelines
        assert all(target.done() for _, _, target, _, _ in kept)
    assert svc._alarm is not None and svc._alarm.when() > asyncio.get_running_loop().time()


async def test_each_caller_s_header_is_its_own_across_many_callers(
    redis_url: str, namespace: str
) -> None:
    """Every call carries its namespace, limits and hub id as one header that the
    library parses once and keeps, a few at a time: two namespaces with different
    leases, called in turn before and after 70 other callers (more than the library
    keeps), each get their own lease; a hub id holding the separator is its own."""
    services = [
        AsyncRedisService(redis_url, limits=EngineLimits(namespace=f"{namespace}{k}", lease_s=s))
        for k, s in (("a", 30.0), ("b", 300.0))
    ]
    others = [
        AsyncRedisService(redis_url, limits=EngineLimits(namespace=namespace)) for _ in range(70)
    ]
    try:
        services[1].hub_id = "hub|with|bars"

        async def lease_left(svc: AsyncRedisService, worker: str) -> float:
            await svc.submit_job("hdr", 0, {})
            a = await svc.register_worker(worker, ["hdr"], session=worker)
            assert a is not None
            deadline = await svc.redis.zscore(svc.keys.leases, a.job_id)
            now = await svc.redis.time()
            return float(deadline) - (now[0] + now[1] / 1e6)

        for round_ in range(2):
            left = [await lease_left(s, f"m{round_}:gpu{i}") for i, s in enumerate(services)]
            # (a lease of 10 s or more ends on the next whole second)
            assert 25 < left[0] <= 31 and 295 < left[1] <= 301, left
            for i, other in enumerate(others):
                other.hub_id = f"hub-{round_}-{i}"
                assert (await other.submit_job("hdr", 0, {})).status is JobStatus.QUEUED
        assert (await services[1].get_stats())["totals"]["submitted"] == 2
        assert (await others[0].get_stats())["queued"] == 140
    finally:
        for s in (*services, *others):
            await s.aclose()


async def test_a_malformed_header_is_refused_and_changes_nothing(svc: AsyncRedisService) -> None:
    await svc.submit_job("bad", 0, {})  # the library is loaded
    before = await svc.redis.dbsize()
    with pytest.raises(redis.ResponseError, match="malformed call header"):
        await svc.redis.fcall(function_name("submit"), 1, svc.keys.events, "no|fields", "x")
    assert await svc.redis.dbsize() == before


async def test_replies_read_from_hiredis_are_those_read_response_gives(redis_url: str) -> None:
    """The engine takes each reply straight from hiredis' reader (with the `fast`
    extra): the same values and the same raised errors as redis-py's
    ``read_response``, for a reply split over many socket reads too, and a
    connection Redis drops raises redis-py's ConnectionError."""
    pytest.importorskip("hiredis")
    from redisq_server.redis_service import _incomplete_marker, _next_reply

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.set("big-reply", b"x" * 3_000_000)  # many reads of the socket
        pool = client.connection_pool
        direct, plain = await pool.get_connection(), await pool.get_connection()
        assert _incomplete_marker(direct._parser) is not None  # the direct path is taken
        calls = [("PING",), ("GET", "big-reply"), ("NO-SUCH-COMMAND",), ("HGETALL", "none")]
        got: dict[str, list[Any]] = {"direct": [], "plain": []}
        for name, conn in (("direct", direct), ("plain", plain)):
            for call in calls:
                await conn.send_command(*call)
                try:
                    if name == "direct":
                        got[name].append(await _next_reply(conn))
                    else:
                        got[name].append(await conn.read_response(disconnect_on_error=False))
                except redis.ResponseError as exc:
                    got[name].append(("error", type(exc), str(exc)))
        assert got["direct"] == got["plain"]
        assert got["direct"][0] == b"PONG" and len(got["direct"][1]) == 3_000_000
        assert got["direct"][2][0] == "error"
        await direct.send_command("CLIENT", "ID")
        victim = await _next_reply(direct)
        await client.client_kill_filter(_id=victim)
        await direct.send_command("PING")
        with pytest.raises(redis.ConnectionError):
            await _next_reply(direct)
        await direct.disconnect()
        await pool.release(direct)
        await pool.release(plain)
    finally:
        await client.aclose()
