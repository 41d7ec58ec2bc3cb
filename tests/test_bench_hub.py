"""Smoke test: our drain and latency parts run end to end on a tiny N, with the hub
in a process of its own and in this process."""

from __future__ import annotations

from benchmarks import ours, suite
from benchmarks.common import HUB_PLACES
from redisq_lab.redis_process import RedisProcess


async def test_hub_benchmark_smoke(redis_proc: RedisProcess, namespace: str) -> None:
    assert redis_proc.proc is not None
    for place in HUB_PLACES:
        ns = f"{namespace}-{place}"
        drain = await ours.drain(redis_proc.url, ns, 100, 2, redis_proc.proc.pid, place=place)
        assert drain["jobs"] == 100 and drain["jobs_per_s"] > 0
        latency = await ours.latency(
            redis_proc.url,
            f"{ns}-lat",
            samples=20,
            gpus=2,
            saturate_jobs=50,
            window=8,
            loads=(0.5,),
            load_seconds=0.2,
            load_max_jobs=50,
            place=place,
        )
        assert set(latency["idle"]) == {"submit->job_assigned", "submit->job_completed"}
        for p in latency["idle"].values():
            assert 0 < p["p50"] <= p["p95"] <= p["p99"]
        result = {
            "machine": suite.machine("test"),
            "sizes": {"quick": True, "gpus": 2, "hub_place": place},
            "ours": {"drain": drain, "latency": latency},
            "wall_s": 0.0,
        }
        table = suite.format_tables(result)
        assert "idle, one at a time" in table and "redisq (hub" in table
