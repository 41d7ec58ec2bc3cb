"""Event routing between hubs: each hub gets back, with the reply, the events its own
calls produced for its sockets, and reads from its inbox only what other callers
produced for them; monitors that asked for events read the whole stream."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError

from redisq_server import AsyncRedisService, EngineLimits
from redisq_server.main import Hub
from redisq_server.operations import Event

from .helpers import hub_settings, wait_for
from .peers import Peer, open_worker
from .test_hub import client


async def _inbox_len(svc: AsyncRedisService, hub: Hub) -> int:
    return int(await svc.redis.xlen(svc.keys.inbox(hub.hub_id)))


async def test_a_hub_never_reads_back_what_its_own_calls_did(hub: Hub) -> None:
    svc = hub.svc
    c = await client(hub)
    w = await open_worker(hub.url, "m1:gpu0", ["t"])
    for i in range(20):
        acc = await c.request({"type": "submit_job", "job_type": "t", "params": {"i": i}})
        a = await w.expect("job_assigned")
        assert a["job_id"] == acc["job_id"]
        await w.send(
            {"type": "update_job_progress", "job_id": a["job_id"], "attempt": 1, "progress": 50}
        )
        up = await c.expect(
            lambda m, j=a["job_id"]: m.get("event") == "progress" and m["job_id"] == j
        )
        assert up["progress"] == 50.0
        await w.send({"type": "complete_job", "job_id": a["job_id"], "attempt": 1, "result": i})
        done = await c.expect("job_completed")
        assert (done["job_id"], done["result"]) == (acc["job_id"], i)
    # every update reached the client, yet nothing went through this hub's inbox
    assert await _inbox_len(svc, hub) == 0
    assert await svc.redis.xlen(svc.keys.events) > 0  # the stream has it all, for monitors
    await c.close()
    await w.close()


async def test_the_hub_a_job_ends_on_gets_no_copy_of_its_final_event(hub: Hub) -> None:
    """A worker's report that ends a job: its hub tells the job's client here from the
    report itself, so the engine hands that hub no copy of the final event; the
    events the hub does not tell by itself (assigned, retrying) still come back."""
    svc = hub.svc
    route = svc.on_events
    assert route is not None
    handed: list[str] = []

    def spy(events: list[Event]) -> None:
        handed.extend(e.name for e in events)
        route(events)

    svc.on_events = spy
    try:
        c = await client(hub)
        w = await open_worker(hub.url, "m1:gpu0", ["t"])
        for report in ("complete", "fail", "retry"):
            acc = await c.request(
                {
                    "type": "submit_job",
                    "job_type": "t",
                    "max_attempts": 2 if report == "retry" else 1,
                }
            )
            a = await w.expect("job_assigned")
            if report == "complete":
                msg = {"type": "complete_job", "result": 7}
            else:
                msg = {"type": "fail_job", "error": "boom", "retryable": report == "retry"}
            await w.request({**msg, "job_id": a["job_id"], "attempt": 1})
            want = {
                "complete": ("job_completed", None),
                "fail": ("job_failed", None),
                "retry": ("job_update", "retrying"),
            }[report]
            await c.expect(
                lambda m, j=acc["job_id"], want=want: (
                    m.get("job_id") == j and (m["type"], m.get("event")) == want
                )
            )
        await c.request({"type": "cancel_job", "job_id": acc["job_id"]})  # the retry: no rerun
        # told once each: a status request answered after them finds nothing more queued
        await c.request({"type": "get_stats"})
        assert [m["type"] for m in c.backlog if m["type"] in ("job_completed", "job_failed")] == []
        await c.close()
        await w.close()
    finally:
        svc.on_events = route
    assert "completed" not in handed and "failed" not in handed
    assert handed.count("assigned") == 3 and "retrying" in handed


async def test_other_hubs_calls_arrive_through_the_inbox(
    redis_url: str, limits: EngineLimits
) -> None:
    async with Hub(hub_settings(redis_url, limits)) as a, Hub(hub_settings(redis_url, limits)) as b:
        c = await client(a)
        w = await open_worker(b.url, "m1:gpu0", ["t"])
        acc = await c.request({"type": "submit_job", "job_type": "t"})
        job = await w.expect("job_assigned")  # B's push: A's submit wrote to B's inbox
        assert job["job_id"] == acc["job_id"]
        assert await _inbox_len(b.svc, b) == 1
        await w.send({"type": "complete_job", "job_id": job["job_id"], "attempt": 1, "result": 3})
        assert (await c.expect("job_completed"))["result"] == 3  # B's call, A's inbox
        assert await _inbox_len(a.svc, a) >= 1
        # a cancel on A of a job running on B reaches the worker through B's inbox
        acc2 = await c.request({"type": "submit_job", "job_type": "t"})
        j2 = await w.expect("job_assigned")
        await c.request({"type": "cancel_job", "job_id": acc2["job_id"]})
        cancel = await w.expect("cancel_job")
        assert cancel["job_id"] == j2["job_id"]
        await c.close()
        await w.close()


async def test_an_inbox_batch_whose_read_fails_is_read_again(
    redis_url: str, limits: EngineLimits
) -> None:
    """A job's result too large to ride in its event is read when the event is
    routed; when that read fails (Redis gone for a moment), the inbox batch is read
    again, so the client still gets its final frame (the batch used to be skipped)."""
    async with Hub(hub_settings(redis_url, limits)) as a, Hub(hub_settings(redis_url, limits)) as b:
        c = await client(a)
        w = await open_worker(b.url, "m1:gpu0", ["t"])
        acc = await c.request({"type": "submit_job", "job_type": "t"})
        job = await w.expect("job_assigned")
        real = a.events.svc.job_payloads
        failures = []

        async def fails_once(ids: Any) -> Any:
            if not failures:
                failures.append(ids)
                raise RedisConnectionError("Redis went away for a moment")
            return await real(ids)

        a.events.svc.job_payloads = fails_once  # type: ignore[method-assign]
        big = {"blob": "x" * 2000}  # over the 512 bytes an event carries
        await w.send({"type": "complete_job", "job_id": job["job_id"], "attempt": 1, "result": big})
        done = await c.expect("job_completed", timeout=10)
        assert done["job_id"] == acc["job_id"] and done["result"] == big
        assert failures  # the first read did fail
        await c.close()
        await w.close()


async def test_monitors_see_every_hubs_events(redis_url: str, limits: EngineLimits) -> None:
    async with Hub(hub_settings(redis_url, limits)) as a, Hub(hub_settings(redis_url, limits)) as b:
        m = await Peer.open(f"{b.url}/ws/monitor/mon1")
        assert (await m.request({"type": "subscribe_events"}))["type"] == "subscribed"
        c = await client(a)
        w = await open_worker(a.url, "m1:gpu0", ["t"])
        acc = await c.request({"type": "submit_job", "job_type": "t"})
        job = await w.expect("job_assigned")
        await w.send({"type": "complete_job", "job_id": job["job_id"], "attempt": 1})
        await c.expect("job_completed")
        seen = []
        while "completed" not in seen:
            ev = await m.expect(
                lambda x: x.get("type") == "event" and x.get("job") == acc["job_id"]
            )
            seen.append(ev["e"])
        assert seen == ["submitted", "assigned", "completed"]
        for p in (m, c, w):
            await p.close()


async def test_presence_follows_the_sockets(redis_url: str, limits: EngineLimits) -> None:
    # a short lease: the sweep (every lease/3) is what restores a lapsed listing
    async with Hub(hub_settings(redis_url, replace(limits, lease_s=0.6))) as hub:
        await _presence(hub)


async def _presence(hub: Hub) -> None:
    svc, keys = hub.svc, hub.svc.keys
    assert await svc.redis.zscore(keys.hubs, hub.hub_id) is not None

    async def listed() -> set[str]:
        return set(await svc.redis.smembers(keys.clients(hub.hub_id)))

    async def sockets(cid: str, n: int) -> bool:
        return len(hub.registry.clients.get(cid, ())) == n

    async def alice_gone() -> bool:
        return not await listed()

    async def bob_back() -> bool:
        return "bob" in await listed()

    one = await client(hub, "alice")
    two = await client(hub, "alice")
    assert await listed() == {"alice"}  # listed before its welcome
    await one.close()
    await wait_for(lambda: sockets("alice", 1), what="one socket of alice closed")
    assert await listed() == {"alice"}  # its other socket is still here
    await two.close()
    await wait_for(alice_gone, what="alice unlisted")
    # if the listing lapses (a stalled hub given up for dead), the sweep restores it
    c = await client(hub, "bob")
    await svc.redis.delete(keys.hubs, keys.clients(hub.hub_id))
    await wait_for(bob_back, what="bob listed again by the sweep")
    await c.close()


async def test_a_stopped_or_dead_hub_is_forgotten(redis_url: str, limits: EngineLimits) -> None:
    async with Hub(hub_settings(redis_url, limits)) as h:
        c = await client(h, "c9")
        keys, hub_id = h.svc.keys, h.hub_id
        await c.close()
    plain = aredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert await plain.zscore(keys.hubs, hub_id) is None
        assert not await plain.exists(keys.clients(hub_id), keys.inbox(hub_id))
        # a hub that dies without a word is dropped by any reaper once its listing lapses
        ghost = AsyncRedisService(redis_url, limits=replace(limits, lease_s=0.05))
        ghost.hub_id = "ghost"
        await ghost.hub_start()
        await ghost.clients_here(["c1"])
        await plain.xadd(keys.inbox("ghost"), {"e": "x"})
        reaper = AsyncRedisService(redis_url, limits=limits)

        async def forgotten() -> bool:
            await reaper.reap()
            return await plain.zscore(keys.hubs, "ghost") is None

        await wait_for(forgotten, what="ghost hub reaped")
        assert not await plain.exists(keys.clients("ghost"), keys.inbox("ghost"))
        await ghost.aclose()
        await reaper.aclose()
    finally:
        await plain.aclose()


async def test_a_hub_lists_ten_thousand_clients_in_one_call(
    redis_url: str, limits: EngineLimits
) -> None:
    """A hub given up for dead lists all its clients again in one call; Lua unpacks
    at most about 8,000 values at once, so the list goes in batches (one call of
    10,000 ids used to fail on every sweep, and those clients got no events)."""
    svc = AsyncRedisService(redis_url, limits=limits)
    svc.hub_id = "many"
    try:
        await svc.hub_start()
        ids = [f"c{i}" for i in range(10_000)]
        await svc.clients_here(ids)
        assert await svc.redis.scard(svc.keys.clients("many")) == 10_000
        await svc.clients_gone(ids[:9_000])
        assert await svc.redis.scard(svc.keys.clients("many")) == 1_000
        await svc.hub_stop()
    finally:
        await svc.aclose()


async def test_an_assignment_whose_push_was_lost_is_pushed_by_the_sweep(
    redis_url: str, limits: EngineLimits
) -> None:
    """A call's reply carries the assignment its hub must push; when that reply is
    lost (Redis stopped right after running the script), the worker would hold a job
    it was never told of, its lease renewed for ever. The sweep compares what the
    hub pushed with what Redis assigned, and pushes what is missing."""
    fast = replace(limits, lease_s=1.5)  # the sweep runs every 0.5 s
    async with Hub(hub_settings(redis_url, fast)) as hub:
        w = await open_worker(hub.url, "m1:gpu0", ["t"])
        # a caller that speaks for this hub but drops the events its calls return:
        # the reply (and with it the push) is lost, as in an outage
        lossy = AsyncRedisService(redis_url, limits=fast)
        lossy.hub_id = hub.hub_id
        try:
            r = await lossy.submit_job("t", job_id="lost-push", client_id="c1")
            assert r.assignment is not None and r.assignment.worker_id == "m1:gpu0"
            job = await w.expect("job_assigned", timeout=5)
            assert (job["job_id"], job["attempt"]) == ("lost-push", 1)
            await w.send({"type": "complete_job", "job_id": "lost-push", "attempt": 1, "result": 1})
            await wait_for(
                lambda: _status(lossy, "lost-push"), 5, "the late-pushed job to complete"
            )
            # pushed once: no second job_assigned for the same assignment
            await w.send({"type": "worker_heartbeat", "id": "hb"})
            assert (await w.expect("ack"))["ref"] == "hb"
        finally:
            await lossy.aclose()
        await w.close()


async def _status(svc: AsyncRedisService, job_id: str) -> bool:
    job = await svc.get_job(job_id)
    return job is not None and job.status.value == "completed"
