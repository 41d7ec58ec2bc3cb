"""Smoke test: ``python -m benchmarks --quick`` runs our parts end to end in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def test_runner_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--only", "drain,latency,enqueue,memory"]
    proc = subprocess.run(
        [*cmd, "--peers", "none", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    o = res["ours"]
    assert set(o) == {"drain", "latency", "enqueue", "memory"}
    assert "peers" not in res and "growth" not in o
    assert o["drain"]["jobs_per_s"] > 0 and o["drain"]["jobs"] == res["sizes"]["jobs"]
    for key in ("submit->job_assigned", "submit->job_completed"):
        p = o["latency"]["idle"][key]
        assert 0 < p["p50"] <= p["p95"] <= p["p99"]
    assert o["latency"]["max_rate_per_s"] > 0 and o["latency"]["loaded"]
    assert o["enqueue"]["one_at_a_time_per_s"] > 0 and o["enqueue"]["batched_per_s"] > 0
    assert o["memory"]["redis"]["bytes_per_job"] > 0
    hub = o["memory"]["hub"]
    assert hub["workers"]["opened"] > 0 and hub["clients"]["opened"] > 0
    assert hub["rss_mb"]["with_clients"] > 0
    assert {t["target"] for t in res["targets"]} >= {"submit->result p50 <= 1 ms"}
    assert "redisq (hub)" in proc.stdout
    assert "CPU per job in the drain" in proc.stdout
    assert out.with_suffix(".html").exists()


def test_cpu_table_rows_per_system() -> None:
    from benchmarks.suite import _cpu_table

    def peer(worker: float, redis: float) -> dict[str, Any]:
        return {"drain": {"cpu_ms_per_job": {"worker": worker, "redis": redis}}}

    result = {
        "ours": {
            "drain": {"gpus": 4, "cpu_ms_per_job": {"hub": 0.2, "worker": 0.1, "redis": 0.15}}
        },
        "peers": {
            "huey": {"fast": peer(0.13, 0.03), "default": {"skipped": "not installed"}},
            "rabbitmq": {"fast": peer(0.12, 0.001)},
        },
    }
    rows = _cpu_table(result)
    ours = next(r for r in rows if r.startswith("redisq"))
    assert ours.split()[-4:] == ["0.200", "0.100", "0.150", "0.450"]
    huey = next(r for r in rows if r.startswith("Huey"))
    assert huey.split()[-4:] == ["-", "0.130", "0.030", "0.160"]
    # an AMQP peer's Redis is not its broker: not counted
    rabbit = next(r for r in rows if r.startswith("RabbitMQ"))
    assert rabbit.split()[-4:] == ["-", "0.120", "-", "0.120"]
    assert len(rows) == 5  # title, header, three systems (a skipped setting has no row)


def test_runner_rejects_unknown_part() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "unknown: nope" in proc.stderr
