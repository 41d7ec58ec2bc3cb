"""Smoke test: the hub benchmark runs end to end on a tiny N, both hub placements."""

from __future__ import annotations

from benchmarks.hub import HUB_MODES, format_table, run_benchmark


async def test_hub_benchmark_smoke(redis_url: str, namespace: str) -> None:
    res = await run_benchmark(redis_url, jobs=100, gpus=2, samples=20, namespace=namespace)
    assert set(res["results"]) == set(HUB_MODES)
    for r in res["results"].values():
        assert r["drain"]["jobs"] == 100 and r["drain"]["jobs_per_s"] > 0
        assert set(r["latency_ms"]) == {"submit->job_assigned", "submit->job_completed"}
        for p in r["latency_ms"].values():
            assert 0 < p["p50"] <= p["p95"] <= p["p99"]
    assert "submit->job_completed" in format_table(res)
