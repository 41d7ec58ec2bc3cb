"""Smoke test: the engine benchmark runs end to end on a tiny N."""

from __future__ import annotations

from benchmarks.engine import format_table, run_benchmark


async def test_engine_benchmark_smoke(redis_url: str, namespace: str) -> None:
    res = await run_benchmark(redis_url, jobs=200, concurrency=2, namespace=namespace)
    ops = res["ops_per_s"]
    assert set(ops) == {"PING", "ZADD+ZPOPMIN", "submit", "complete+claim"}
    assert all(v > 0 for v in ops.values())
    assert "complete+claim" in format_table(res)
