"""LocalStack and LoadGenerator: start, stop, leave nothing behind, run a workload."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from redisq_lab.load import LoadGenerator, summarize
from redisq_lab.redis_process import RedisProcess
from redisq_lab.stack import LocalStack, RedisNotInstalled


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_start_stop_twice_leaves_nothing() -> None:
    for _ in range(2):
        stack = LocalStack(namespace="twice")
        redis_pid = stack.redis.proc.pid if stack.redis.proc else 0
        redis_dir = stack.redis.dir
        hub_port = stack.hub.port
        assert _port_open(hub_port)
        assert stack.stats()["workers"] == 0
        assert "LocalStack" in stack._repr_html_() and stack.hub_url in stack._repr_html_()
        stack.close()
        stack.close()  # idempotent
        assert stack.closed
        assert not _port_open(hub_port)
        assert not _pid_alive(redis_pid)
        assert not redis_dir.exists()
        assert not stack._thread.is_alive()


def test_missing_redis_server_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RedisNotInstalled, match="apt-get install redis-server"):
        LocalStack()
    with pytest.raises(RedisNotInstalled):
        RedisProcess().start()


def test_stack_runs_workers_and_a_workload() -> None:
    with LocalStack(namespace="load") as stack:
        workers = stack.add_workers(machines=2, gpus=2, run_time=0.0, progress_steps=1)
        assert len(workers) == 2
        assert stack.stats()["workers"] == 4
        seen: list[int] = []
        gen = LoadGenerator(
            stack,
            n_jobs=120,
            job_types={"default": 2, "inference": 1},
            priorities={0: 3, 5: 1},
            seed=1,
            on_progress=lambda done, total: seen.append(done),
        )
        rows = asyncio.run(gen.run_rows())
        assert len(rows) == 120
        assert {r["status"] for r in rows} == {"completed"}
        assert seen[-1] == 120
        assert all(r["total_s"] >= r["accept_s"] > 0 for r in rows)
        summary = summarize(rows, gen.finished_at - gen.started_at)  # type: ignore[operator]
        assert summary["completed"] == 120
        assert summary["throughput_per_s"] > 0
        assert set(summary["wait_by_priority_s"]) == {0, 5}
        assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
        job_id = stack.submit("inference", priority=1)
        assert len(job_id) == 32
        assert sum(w.completed for w in workers) >= 120
    assert stack.closed


async def test_async_context_manager() -> None:
    async with LocalStack(namespace="async") as stack, stack.client("c1") as client:
        job_id = await client.submit("default")
        assert (await client.status(job_id))["status"] == "queued"
    assert stack.closed
