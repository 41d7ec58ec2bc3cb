"""The hub over real sockets and a real Redis: lifecycle, order, requeue, cancel,
two hubs, slow readers, bad input, auth."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from redisq_server import EngineLimits, protocol
from redisq_server.main import Hub

from .helpers import hub_settings, namespace_keys, wait_for
from .peers import Peer, open_worker, serve_jobs


async def client(hub: Hub, cid: str = "c1", **kw: Any) -> Peer:
    return await Peer.open(f"{hub.url}/ws/client/{cid}", **kw)


async def test_welcome_and_health(hub: Hub) -> None:
    c = await client(hub)
    assert c.seen[0] == {
        "type": "welcome",
        "protocol": 1,
        "role": "client",
        "id": "c1",
        "hub": hub.hub_id,
        "max_frame_bytes": hub.settings.max_frame_bytes,
    }
    loop = asyncio.get_running_loop()
    status, body = await loop.run_in_executor(None, _get, f"http://127.0.0.1:{hub.port}/health")
    assert status == 200
    assert body["status"] == "ok" and body["redis"] is True
    assert body["connections"]["clients"] == 1
    status, body = await loop.run_in_executor(None, _get, f"http://127.0.0.1:{hub.port}/nope")
    assert status == 404
    status, _ = await loop.run_in_executor(None, _get, f"http://127.0.0.1:{hub.port}/debug")
    assert status == 404  # debug routes are off unless enabled
    await c.close()


def _get(url: str) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


async def test_full_lifecycle_with_progress(hub: Hub) -> None:
    w = await open_worker(hub.url, "m1:gpu0", ["render"])
    c = await client(hub)
    acc = await c.request(
        {"type": "submit_job", "job_type": "render", "priority": 3, "params": {"steps": 2}}
    )
    assert acc["type"] == "job_accepted" and acc["status"] == "assigned" and acc["position"] is None
    job_id = acc["job_id"]
    a = await w.expect("job_assigned")
    assert a == {
        "type": "job_assigned",
        "job_id": job_id,
        "attempt": 1,
        "job_type": "render",
        "priority": 3,
        "params": {"steps": 2},
    }
    up = await c.expect("job_update")
    assert up["status"] == "assigned" and up["worker_id"] == "m1:gpu0"
    for p in (50, 100):
        await w.send(
            {
                "type": "update_job_progress",
                "job_id": job_id,
                "attempt": 1,
                "progress": p,
                "message": f"step {p}",
            }
        )
        up = await c.expect("job_update")
        assert up["status"] == "running" and up["progress"] == p and up["message"] == f"step {p}"
    st = await c.request({"type": "get_job_status", "job_id": job_id})
    assert st["type"] == "job_status" and st["status"] == "running" and st["progress"] == 100
    ack = await w.request(
        {"type": "complete_job", "job_id": job_id, "attempt": 1, "result": {"url": "x.png"}}
    )
    assert ack == {
        "type": "ack",
        "ref": ack["ref"],
        "job_id": job_id,
        "outcome": "completed",
        "has_next": False,
    }
    done = await c.expect("job_completed")
    assert done["job_id"] == job_id and done["result"] == {"url": "x.png"}
    st = await c.request({"type": "get_job_status", "job_id": job_id})
    assert st["status"] == "completed" and st["result"] == {"url": "x.png"}
    assert st["started"] <= st["finished"]
    # exactly once: no second completion arrives
    ping = await c.request({"type": "get_stats"})
    assert ping["type"] == "stats" and ping["totals"]["completed"] == 1
    assert [m["type"] for m in c.seen].count("job_completed") == 1
    await c.close()
    await w.close()


async def test_push_order_priority_then_fifo(hub: Hub) -> None:
    c = await client(hub)
    expected = []
    for i, prio in enumerate([0, 5, 0, 9, 5, 0]):
        acc = await c.request(
            {"type": "submit_job", "job_type": "t", "priority": prio, "params": {"i": i}}
        )
        assert acc["status"] == "queued"
        expected.append((-prio, i, acc["job_id"]))
    w = await open_worker(hub.url, "m1:gpu0", ["t"])
    order = []
    for _ in expected:
        a = await w.expect("job_assigned")
        order.append(a["job_id"])
        await w.send({"type": "complete_job", "job_id": a["job_id"], "attempt": a["attempt"]})
    assert order == [j for _, _, j in sorted(expected)]


async def test_unaccepted_type_stays_queued(hub: Hub) -> None:
    w = await open_worker(hub.url, "m1:gpu0", ["render"])
    c = await client(hub)
    acc = await c.request({"type": "submit_job", "job_type": "train"})
    assert acc["status"] == "queued" and acc["position"] == 0
    st = await c.request({"type": "get_job_status", "job_id": acc["job_id"]})
    assert st["status"] == "queued"
    stats = await c.request({"type": "get_stats"})
    assert stats["job_types"]["train"]["queued"] == 1
    assert stats["workers_idle"] == 1
    # a worker for that type takes it at once
    w2 = await open_worker(hub.url, "m2:gpu0", ["train"])
    a = await w2.expect("job_assigned")
    assert a["job_id"] == acc["job_id"]
    await w.close()
    await w2.close()


async def test_worker_drop_requeues_and_late_complete_is_rejected(hub: Hub) -> None:
    c = await client(hub)
    w1 = await open_worker(hub.url, "m1:gpu0", ["t"])
    acc = await c.request({"type": "submit_job", "job_type": "t"})
    a1 = await w1.expect("job_assigned")
    assert a1["attempt"] == 1
    await w1.close()  # the socket drops mid-job
    up = await c.expect(lambda m: m.get("event") == "requeued")
    assert up["status"] == "queued"
    w2 = await open_worker(hub.url, "m2:gpu0", ["t"])
    a2 = await w2.expect("job_assigned")
    assert a2["job_id"] == acc["job_id"] and a2["attempt"] == 2
    # the first GPU comes back and reports its old attempt: rejected
    w1b = await open_worker(hub.url, "m1:gpu0", ["other"])
    err = await w1b.request(
        {"type": "complete_job", "job_id": acc["job_id"], "attempt": 1, "result": "stale"}
    )
    assert err["type"] == "error" and err["code"] == "stale_attempt"
    await w2.send(
        {"type": "complete_job", "job_id": acc["job_id"], "attempt": 2, "result": "fresh"}
    )
    done = await c.expect("job_completed")
    assert done["result"] == "fresh" and done["attempt"] == 2
    late = await w1b.request(
        {"type": "complete_job", "job_id": acc["job_id"], "attempt": 2, "result": "x"}
    )
    assert late["type"] == "error" and late["code"] == "stale_attempt"
    await c.request({"type": "get_stats"})  # flush
    assert [m["type"] for m in c.seen].count("job_completed") == 1
    for p in (c, w2, w1b):
        await p.close()


async def test_cancel_queued_and_running(hub: Hub) -> None:
    c = await client(hub)
    q = await c.request({"type": "submit_job", "job_type": "t"})
    st = await c.request({"type": "cancel_job", "job_id": q["job_id"]})
    assert st["type"] == "job_status" and st["status"] == "cancelled"
    w = await open_worker(hub.url, "m1:gpu0", ["t"])
    r = await c.request({"type": "submit_job", "job_type": "t"})
    a = await w.expect("job_assigned")
    assert a["job_id"] == r["job_id"]
    nxt = await c.request({"type": "submit_job", "job_type": "t"})
    st = await c.request({"type": "cancel_job", "job_id": r["job_id"]})
    assert st["status"] == "cancelled"
    cancel = await w.expect("cancel_job")
    assert cancel == {"type": "cancel_job", "job_id": r["job_id"], "attempt": 1}
    up = await c.expect(lambda m: m.get("job_id") == r["job_id"] and m.get("status") == "cancelled")
    assert up["type"] == "job_update"
    ack = await w.request(
        {
            "type": "fail_job",
            "job_id": r["job_id"],
            "attempt": 1,
            "error": "cancelled",
            "retryable": False,
        }
    )
    assert ack["outcome"] == "cancelled"
    a2 = await w.expect("job_assigned")
    assert a2["job_id"] == nxt["job_id"]
    await c.close()
    await w.close()


async def test_two_hubs_share_one_redis(redis_url: str, limits: EngineLimits) -> None:
    async with Hub(hub_settings(redis_url, limits)) as a, Hub(hub_settings(redis_url, limits)) as b:
        c = await client(a)
        w = await open_worker(b.url, "m1:gpu0", ["t"])
        acc = await c.request({"type": "submit_job", "job_type": "t", "params": {"n": 1}})
        job = await w.expect("job_assigned")
        assert job["job_id"] == acc["job_id"] and job["params"] == {"n": 1}
        await w.send(
            {"type": "update_job_progress", "job_id": job["job_id"], "attempt": 1, "progress": 10}
        )
        assert (await c.expect("job_update"))["status"] in ("assigned", "running")
        await w.send({"type": "complete_job", "job_id": job["job_id"], "attempt": 1, "result": 7})
        done = await c.expect("job_completed")
        assert done["result"] == 7 and done["worker_id"] == "m1:gpu0"
        # a client on hub B may follow a job submitted on hub A under the same client id
        c_b = await client(b)
        acc2 = await c.request({"type": "submit_job", "job_type": "t"})
        sub = await c_b.request({"type": "subscribe_job", "job_id": acc2["job_id"]})
        assert sub["type"] == "subscribed"
        j2 = await w.expect("job_assigned")
        await w.send({"type": "complete_job", "job_id": j2["job_id"], "attempt": 1})
        await c_b.expect("job_completed")
        await c.expect("job_completed")
        for p in (c, c_b, w):
            await p.close()


async def test_a_failed_subscribe_keeps_the_subscription_the_socket_had(hub: Hub) -> None:
    """A client follows its job (it submitted it); a subscribe_job for that job
    whose read fails answers `unavailable`, and the client still gets the job's
    final frame (the failure used to end the subscription it had)."""
    c = await client(hub, "subfail")
    w = await open_worker(hub.url, "m1:gpu0", ["t"])
    acc = await c.request({"type": "submit_job", "job_type": "t"})
    job = await w.expect("job_assigned")
    real = hub.routes.svc.get_job

    async def fails(job_id: str) -> Any:
        raise redis.exceptions.ConnectionError("Redis went away for a moment")

    hub.routes.svc.get_job = fails  # type: ignore[method-assign]
    try:
        sub = await c.request({"type": "subscribe_job", "job_id": acc["job_id"]})
    finally:
        hub.routes.svc.get_job = real  # type: ignore[method-assign]
    assert (sub["type"], sub["code"]) == ("error", "unavailable")
    await w.send({"type": "complete_job", "job_id": job["job_id"], "attempt": 1, "result": 5})
    done = await c.expect("job_completed")
    assert done["job_id"] == acc["job_id"] and done["result"] == 5
    await c.close()
    await w.close()


async def test_slow_reader_is_closed_and_others_unaffected(
    redis_url: str, limits: EngineLimits
) -> None:
    settings = hub_settings(redis_url, limits, send_queue_frames=4)
    async with Hub(settings) as h:
        done: list[str] = []
        w = await open_worker(h.url, "m1:gpu0", ["t"])
        result = "x" * 1_000_000
        runner = asyncio.create_task(serve_jobs(w, done, result))
        slow = await client(h, "slow")
        slow.ws.transport.pause_reading()  # stops reading; the hub's buffers fill
        for _ in range(40):
            await slow.send({"type": "submit_job", "job_type": "t"})
        fast = await client(h, "fast")
        acc = await fast.request({"type": "submit_job", "job_type": "t"})
        got = await fast.expect("job_completed", timeout=30)
        assert got["job_id"] == acc["job_id"]
        await wait_for(lambda: _gone(h, "slow"), timeout=30, what="slow client closed")
        slow.ws.transport.resume_reading()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await slow.recv()
        # the close frame (1008) may sit behind the full buffers, in which case the
        # hub aborts the transport once its close timeout passes
        rcvd = closed.value.rcvd
        assert rcvd is None or rcvd.code == 1008
        runner.cancel()
        await fast.close()
        await w.close()


async def _gone(h: Hub, cid: str) -> bool:
    return cid not in h.registry.clients


BAD_FRAMES: list[tuple[str, str]] = [
    ("not json at all", "bad_json"),
    ("[1, 2, 3]", "bad_message"),
    ('"a string"', "bad_message"),
    ('{"no_type": 1}', "bad_message"),
    ('{"type": 42}', "bad_message"),
    ('{"type": "launch_missiles", "id": "x"}', "unknown_type"),
    ('{"type": "submit_job", "id": "x"}', "invalid_field"),
    ('{"type": "submit_job", "job_type": ["t"]}', "invalid_field"),
    ('{"type": "submit_job", "job_type": "t", "priority": "high"}', "invalid_field"),
    ('{"type": "submit_job", "job_type": "t", "priority": 1e9}', "invalid_field"),
    ('{"type": "submit_job", "job_type": "t", "params": "p"}', "invalid_field"),
    ('{"type": "submit_job", "job_type": "t", "job_id": "../../etc"}', "invalid_field"),
    ('{"type": "submit_job", "job_type": "t", "max_attempts": -1}', "invalid_field"),
    ('{"type": "get_job_status", "job_id": 5}', "invalid_field"),
    ('{"type": "get_job_status", "job_id": "nope"}', "not_found"),
    ('{"type": "cancel_job", "job_id": "nope"}', "not_found"),
    ('{"type": "complete_job", "job_id": "j", "attempt": 1}', "not_allowed"),
    ('{"type": "register_worker", "job_types": ["t"]}', "not_allowed"),
    ('{"type": "get_events", "since": "abc"}', "invalid_field"),
]


async def test_bad_client_input_gets_errors_and_writes_nothing(hub: Hub, redis_url: str) -> None:
    c = await client(hub)
    other = await client(hub, "c2")
    theirs = await other.request({"type": "submit_job", "job_type": "t"})
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    before = namespace_keys(sync, hub.svc.keys)
    for frame, code in BAD_FRAMES:
        await c.ws.send(frame)
        reply = await c.expect("error")
        assert reply["code"] == code, (frame, reply)
        assert reply["message"]
    # another client's job: invisible and untouchable
    for kind in ("get_job_status", "cancel_job", "subscribe_job"):
        err = await c.request({"type": kind, "job_id": theirs["job_id"]})
        assert err["type"] == "error" and err["code"] == "not_found"
    assert namespace_keys(sync, hub.svc.keys) == before
    # the connection and the hub are still fine
    ok = await c.request({"type": "submit_job", "job_type": "t"})
    assert ok["type"] == "job_accepted"
    st = await other.request({"type": "get_job_status", "job_id": theirs["job_id"]})
    assert st["status"] == "queued"
    sync.close()
    await c.close()
    await other.close()


async def test_bad_worker_input(hub: Hub) -> None:
    w = await Peer.open(f"{hub.url}/ws/worker/m1:gpu0")
    err = await w.request({"type": "complete_job", "job_id": "j", "attempt": 1})
    assert err["code"] == "not_allowed"  # not registered yet
    err = await w.request({"type": "register_worker", "job_types": "t"})
    assert err["code"] == "invalid_field"
    ok = await w.request({"type": "register_worker", "job_types": ["t"]})
    assert ok["type"] == "worker_registered"
    err = await w.request({"type": "register_worker", "job_types": ["t"]})
    assert err["code"] == "not_allowed"
    err = await w.request({"type": "complete_job", "job_id": "nope", "attempt": 1})
    assert err["code"] == "not_found"
    err = await w.request(
        {"type": "update_job_progress", "job_id": "nope", "attempt": 1, "progress": -1}
    )
    assert err["code"] == "invalid_field"
    err = await w.request({"type": "submit_job", "job_type": "t"})
    assert err["code"] == "not_allowed"
    ack = await w.request({"type": "worker_heartbeat"})
    assert ack["type"] == "ack"
    await w.close()


async def test_oversized_frame_closes_1009_and_hub_survives(
    redis_url: str, limits: EngineLimits
) -> None:
    async with Hub(hub_settings(redis_url, limits, max_frame_bytes=64 * 1024)) as h:
        c = await client(h)
        await c.send({"type": "submit_job", "job_type": "t", "params": {"blob": "x" * 100_000}})
        with pytest.raises(ConnectionClosed) as closed:
            await c.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        c2 = await client(h)
        assert (await c2.request({"type": "submit_job", "job_type": "t"}))["type"] == "job_accepted"
        stats = await c2.request({"type": "get_stats"})
        assert stats["totals"]["submitted"] == 1
        await c2.close()


async def test_params_over_engine_limit_is_refused(redis_url: str, limits: EngineLimits) -> None:
    async with Hub(hub_settings(redis_url, replace(limits, max_params_bytes=1000))) as h:
        c = await client(h)
        err = await c.request({"type": "submit_job", "job_type": "t", "params": {"b": "x" * 2000}})
        assert err["type"] == "error" and err["code"] == "too_large"
        await c.close()


@pytest.mark.parametrize(
    "path", ["/ws/client/bad id", "/ws/worker/nogpu", "/ws/boss/x", "/ws/client"]
)
async def test_bad_paths_are_refused(hub: Hub, path: str) -> None:
    with pytest.raises(InvalidStatus) as err:
        await connect(f"{hub.url}{path.replace(' ', '%20')}")
    assert err.value.response.status_code in (400, 404)


async def test_auth_tokens(redis_url: str, limits: EngineLimits) -> None:
    settings = hub_settings(redis_url, limits, client_token="s3cret", worker_token="w0rk")
    async with Hub(settings) as h:
        with pytest.raises(InvalidStatus) as err:
            await connect(f"{h.url}/ws/client/c1")
        assert err.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            await connect(f"{h.url}/ws/client/c1?token=wrong")
        with pytest.raises(InvalidStatus):  # a worker token is not a client token
            await connect(
                f"{h.url}/ws/client/c1", additional_headers={"Authorization": "Bearer w0rk"}
            )
        c = await Peer.open(
            f"{h.url}/ws/client/c1", additional_headers={"Authorization": "Bearer s3cret"}
        )
        c2 = await Peer.open(f"{h.url}/ws/client/c1?token=s3cret")
        w = await Peer.open(f"{h.url}/ws/worker/m1:gpu0?token=w0rk")
        m = await Peer.open(f"{h.url}/ws/monitor/m")  # no monitor token configured: open
        for p in (c, c2, w, m):
            await p.close()
    async with Hub(hub_settings(redis_url, limits)) as open_hub:
        c = await client(open_hub)  # tokens unset: open for local use
        await c.close()


async def test_monitor_stats_and_events(hub: Hub) -> None:
    m = await Peer.open(f"{hub.url}/ws/monitor/mon1")
    first = await m.request({"type": "subscribe_stats", "interval_ms": 50})
    assert first["type"] == "stats" and "queued" in first
    again = await m.expect("stats")
    assert again["hub"]["monitors"] == 1
    sub = await m.request({"type": "subscribe_events"})
    assert sub["type"] == "subscribed"
    c = await client(hub)
    acc = await c.request({"type": "submit_job", "job_type": "t"})
    ev = await m.expect(lambda x: x.get("type") == "event" and x.get("job") == acc["job_id"])
    assert ev["e"] == "submitted"
    err = await m.request({"type": "cancel_job", "job_id": acc["job_id"]})
    assert err["code"] == "not_allowed"  # monitors are read-only
    await m.close()
    await c.close()


async def test_reconnecting_client_gets_missed_events(hub: Hub) -> None:
    c = await client(hub)
    acc = await c.request({"type": "submit_job", "job_type": "t"})
    last = (await c.request({"type": "get_events", "since": "0"}))["last_id"]
    await c.close()
    w = await open_worker(hub.url, "m1:gpu0", ["t"])
    a = await w.expect("job_assigned")
    await w.send({"type": "complete_job", "job_id": a["job_id"], "attempt": 1, "result": 1})
    other = await client(hub, "c2")
    await other.request({"type": "submit_job", "job_type": "t"})
    c = await client(hub)
    missed = await c.request({"type": "get_events", "since": last})
    names = [(e["e"], e["job"]) for e in missed["events"]]
    assert names == [("assigned", acc["job_id"]), ("completed", acc["job_id"])]  # only its own
    await w.close()
    await c.close()
    await other.close()


async def test_late_assignment_event_is_not_pushed_again(hub: Hub) -> None:
    w = await open_worker(hub.url, "m1:gpu0", ["t"])
    c = await client(hub)
    j1 = (await c.request({"type": "submit_job", "job_type": "t"}))["job_id"]
    j2 = (await c.request({"type": "submit_job", "job_type": "t"}))["job_id"]
    a1 = await w.expect("job_assigned")
    assert a1["job_id"] == j1
    await w.send({"type": "complete_job", "job_id": j1, "attempt": 1})
    a2 = await w.expect("job_assigned")
    assert a2["job_id"] == j2
    # replay the stream, as if the fan-in had been slow: nothing is pushed again
    events = await hub.svc.events_since("0")
    assert [e.fields["job"] for e in events if e.name == "assigned"] == [j1, j2]
    await hub.events.route_events(events)
    ack = await w.request({"type": "worker_heartbeat"})
    assert ack["type"] == "ack"
    assert [m["type"] for m in w.seen].count("job_assigned") == 2
    await w.close()
    await c.close()


async def test_duplicate_submit_keeps_following_the_job(hub: Hub) -> None:
    c = await client(hub)
    acc = await c.request({"type": "submit_job", "job_type": "t", "job_id": "dup-1"})
    err = await c.request({"type": "submit_job", "job_type": "t", "job_id": "dup-1"})
    assert err["type"] == "error" and err["code"] == "duplicate"
    w = await open_worker(hub.url, "m1:gpu0", ["t"])
    a = await w.expect("job_assigned")
    await w.send({"type": "complete_job", "job_id": a["job_id"], "attempt": 1, "result": 5})
    done = await c.expect("job_completed")
    assert done["job_id"] == acc["job_id"] and done["result"] == 5
    # subscribing after the end gives the same final frame as the live one
    late = await client(hub, "c1")
    sub = await late.request({"type": "subscribe_job", "job_id": "dup-1"})
    assert sub["status"] == "completed"
    again = await late.expect("job_completed")
    assert again == done
    await c.close()
    await late.close()
    await w.close()


async def test_client_event_pages(hub: Hub) -> None:
    c = await client(hub)
    other = await client(hub, "c2")
    for _ in range(3):
        await other.request({"type": "submit_job", "job_type": "t"})
    await c.request({"type": "submit_job", "job_type": "t"})
    page = await c.request({"type": "get_events", "since": "0", "limit": 3})
    assert page["more"] is True and page["events"] == []  # three of c2's events
    page2 = await c.request({"type": "get_events", "since": page["last_id"], "limit": 3})
    assert [e["e"] for e in page2["events"]] == ["submitted"]
    assert not {"hub", "session", "n"} & set(page2["events"][0])
    err = await c.request({"type": "get_events", "since": "$"})
    assert err["code"] == "invalid_field"
    await c.close()
    await other.close()


@pytest.mark.parametrize("closed", ["", "5e55", "5E555E555E555E55", 7, "../5e555e555e55"])
async def test_a_hub_refuses_a_malformed_closed_session_and_keeps_the_socket(
    hub: Hub, closed: object
) -> None:
    """``closed_session`` must be the 16 hex digits a ``worker_registered`` gave:
    anything else is refused (``invalid_field``) before any call, and the socket may
    register again. A well-formed session that is not the worker's changes nothing."""
    async with connect(f"{hub.url}/ws/worker/bad:gpu0") as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"
        frame = protocol.register_worker(["t"], id="r")
        frame["closed_session"] = closed
        await ws.send(protocol.encode(frame))
        m = json.loads(await ws.recv())
        assert m["type"] == "error" and m["code"] == "invalid_field", m
        assert "closed_session" in m["message"]
        again = protocol.register_worker(["t"], closed_session="0123456789abcdef", id="r2")
        await ws.send(protocol.encode(again))
        m = json.loads(await ws.recv())
        assert m["type"] == "worker_registered" and len(m["session"]) == 16
        assert m["session"] != "0123456789abcdef"


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 200_000])
def test_a_text_frame_the_hub_builds_is_the_one_websockets_builds(size: int) -> None:
    """The hub's own text frames (no extension, unfragmented, a server's: unmasked)
    are byte for byte what websockets' ``send_text`` queues, in each of the three
    length encodings and at their edges."""
    from websockets.frames import Frame, Opcode

    from redisq_server.connections import _text_frame

    data = ("é" * size).encode()[:size]
    assert _text_frame(data) == Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])
