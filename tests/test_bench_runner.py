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
    assert o["latency"]["max_rate_again_per_s"] > 0
    assert "again after the Poisson runs" in proc.stdout
    # once more through more GPU sockets, the hub's share of the time said
    wide = o["latency"]["saturated_wide"]
    assert wide["gpus"] == 8 and o["latency"]["max_rate_wide_per_s"] > 0
    assert wide["cpu_busy"]["hub"] > 0 and "jobs/s with 8 GPU sockets, hub " in proc.stdout
    assert o["enqueue"]["one_at_a_time_per_s"] > 0 and o["enqueue"]["batched_per_s"] > 0
    assert o["memory"]["redis"]["bytes_per_job"] > 0
    hub = o["memory"]["hub"]
    assert hub["workers"]["opened"] > 0 and hub["clients"]["opened"] > 0
    assert hub["rss_mb"]["with_clients"] > 0
    assert {t["target"] for t in res["targets"]} >= {
        "submit->result p50 <= 1 ms",
        "hub CPU per drained job <= 100 us",
        "one client through one hub >= 5,000 jobs/s",
    }
    assert "redisq (hub)" in proc.stdout
    assert "CPU per job in the drain" in proc.stdout
    assert out.with_suffix(".html").exists()


def test_the_machine_line_says_how_idle_cores_wait() -> None:
    """The idle cores' wait sets what each hop between processes costs: the machine
    line names it when the runner read it, and an older JSON without it still
    formats."""
    from benchmarks import suite

    m = suite.machine("test")
    m["cpu_idle"] = {"driver": "haltpoll", "guest_halt_poll_ns": 0}
    result = {"machine": m, "sizes": {"quick": True}, "ours": {}, "wall_s": 0.0}
    first = suite.format_tables(result).splitlines()[0]
    assert "idle cores: haltpoll (poll 0 ns before halting)" in first
    del m["cpu_idle"]
    assert "idle cores" not in suite.format_tables(result).splitlines()[0]


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


def test_speed_targets_read_the_parts_that_measure_them() -> None:
    from benchmarks.suite import targets

    def pct(p50: float) -> dict[str, float]:
        return {"p50": p50, "p95": p50, "p99": p50}

    result = {
        "ours": {
            "drain": {
                "gpus": 4,
                "jobs_per_s": 6000.0,
                "cpu_ms_per_job": {"hub": 0.09, "worker": 0.05, "redis": 0.08},
            },
            "growth": {
                "depth": [],
                "gpus": [{"gpus": 4, "jobs_per_s": 6000.0}, {"gpus": 64, "jobs_per_s": 9000.0}],
            },
            "engine": {"runs": [{"concurrency": 8, "redis_us_per_job": {"cpu": 90.0}}]},
            "latency": {
                "gpus": 4,
                "idle": {"submit->job_assigned": pct(0.4), "submit->job_completed": pct(0.7)},
                "loaded": [
                    {"load": 0.5, "submit->job_assigned": pct(1.0)},
                    {"load": 0.9, "offered_per_s": 4680.0, "submit->job_assigned": pct(6.0)},
                ],
                "max_rate_per_s": 5200.0,
                "max_rate_again_per_s": 4100.0,
            },
        },
        "peers": {
            "huey": {
                "fast": {
                    "drain": {"complete": True, "jobs_per_s": 2500.0},
                    "latency": {"submit->result": pct(0.65)},
                }
            },
            "celery-rabbitmq": {"fast": {"drain": {"complete": True, "jobs_per_s": 4000.0}}},
            "rabbitmq": {
                "fast": {
                    "drain": {"complete": True, "jobs_per_s": 8000.0},
                    "latency": {"submit->result": pct(0.9)},
                }
            },
        },
    }
    rows = {t["target"]: t for t in targets(result)}
    assert rows["hub CPU per drained job <= 100 us"]["met"] is True
    # against Huey (on Redis), not Celery on RabbitMQ, though Celery drained faster
    on_redis = rows["drain >= 2x the best Redis-backed peer"]
    assert on_redis["met"] is True
    assert on_redis["measured"] == (
        "6,000 jobs/s (4 GPU sockets) = 2.40x Huey (fast) (2,500); 9,000 with 64 sockets = 3.60x"
    )
    assert rows["drain >= 2x the best peer"]["status"] == "missed by 33%"
    assert rows["drain above RabbitMQ via aio-pika"]["met"] is False
    amqp = rows["drain above RabbitMQ via aio-pika"]["measured"]
    assert amqp.endswith(
        "= 0.75x RabbitMQ (aio-pika) (fast) (8,000); 9,000 with 64 sockets = 1.12x"
    )
    assert rows["Redis CPU per job, whole lifecycle <= 60 us"]["status"] == "missed by 1.5x"
    at90 = rows["submit->start p50 at 90% of the max <= 5 ms"]
    assert at90["status"] == "missed by 20%"
    assert at90["measured"] == "6.00 ms at 4,680/s (max 5,200 before, 4,100 after)"
    assert rows["one client through one hub >= 5,000 jobs/s"]["met"] is True
    best = rows["submit->result p50 at idle below the best peer's"]
    assert best["met"] is False and "Huey (fast) 0.65 ms" in best["measured"]


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


def test_a_part_too_short_to_measure_is_not_noted_apart() -> None:
    """/proc/stat counts 10 ms ticks: a part of microseconds (a skipped one) once
    read 195 cores of other processes. Such a part is not noted; its time counts
    toward the next one's."""
    import os

    from benchmarks.suite import Background

    bg = Background(os.getpid())
    bg.part("skipped")
    assert bg.parts == {}
    bg._mark = (bg._mark[0] - 1.0, *bg._mark[1:])  # as if a second had passed
    bg.part("measured")
    assert set(bg.parts) == {"measured"} and bg.parts["measured"]["seconds"] >= 1.0
    assert 0 <= bg.parts["measured"]["other_cores"] < 2.5
