"""Smoke test: the prefetch part of ``python -m benchmarks`` runs end to end on a tiny N."""

from __future__ import annotations

from benchmarks import prefetch, suite


async def test_prefetch_benchmark_smoke(redis_url: str, namespace: str) -> None:
    res = await prefetch.measure(redis_url, namespace, jobs=40, gpus=2, run_s=0.001, reps=1)
    assert set(res["windows"]) == {"0", "1"}
    for r in res["windows"].values():
        assert r["jobs_per_s"] > 0 and 0 < r["gpu_busy"] <= 1
    result = {
        "machine": suite.machine("test"),
        "sizes": {"quick": True},
        "ours": {"prefetch": res},
        "wall_s": 0.0,
    }
    assert "Prefetch window" in suite.format_tables(result)
