"""Smoke test: the engine part of ``python -m benchmarks`` runs end to end on a tiny N."""

from __future__ import annotations

from benchmarks import engine, suite


async def test_engine_benchmark_smoke(redis_url: str, namespace: str) -> None:
    res = await engine.measure(redis_url, namespace, jobs=200, concurrencies=[2])
    ops = res["runs"][0]["ops_per_s"]
    assert set(ops) == {"PING", "ZADD+ZPOPMIN", "submit", "complete+claim"}
    assert all(v > 0 for v in ops.values())
    cost = res["runs"][0]["redis_us_per_job"]
    assert cost["fcall"] > 0 and cost["cpu"] >= 0
    result = {
        "machine": suite.machine("test"),
        "sizes": {"quick": True},
        "ours": {"engine": res},
        "wall_s": 0.0,
    }
    tables = suite.format_tables(result)
    assert "complete+claim" in tables and "whole lifecycle" in tables
