"""The running subcommands: submit, mock-workers, serve and demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from redisq_lab.cli import main
from redisq_lab.stack import LocalStack


@pytest.fixture(scope="module")
def stack() -> LocalStack:
    with LocalStack(namespace="clirun") as s:
        yield s  # type: ignore[misc]


def test_submit_and_wait_through_the_hub(
    stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    stack.add_workers(1, 2, run_time=0.0, prefix="sub")
    code = main(
        ["submit", "inference", "--count", "3", "--priority", "2", "--params", '{"n": 1}',
         "--wait", "--hub-url", stack.hub_url, "--format", "json"]
    )  # fmt: skip
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    assert {r["status"] for r in rows} == {"completed"}
    assert all(r["result"]["worker_id"].startswith("sub1:") for r in rows)
    stack.stop_workers()


def test_mock_workers_burst_drains_the_queue(
    stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [stack.submit("training", priority=i % 2) for i in range(20)]
    code = main(
        ["mock-workers", "--hub-url", stack.hub_url, "--machines", "2", "--gpus", "2",
         "--burst", "--run-time", "0", "--job-types", "training"]
    )  # fmt: skip
    assert code == 0
    assert "completed 20 jobs" in capsys.readouterr().out
    with stack.service() as svc:
        assert all(j.status == "completed" for j in svc.get_jobs(ids))


def test_submit_errors(stack: LocalStack, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "t", "--hub-url", "ws://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("redisq: cannot connect") and err.count("\n") == 1
    assert main(["submit", "t", "--params", "{nope", "--hub-url", stack.hub_url]) == 1
    assert "not JSON" in capsys.readouterr().err
    assert main(["submit", "bad type!", "--hub-url", stack.hub_url]) == 1
    assert "invalid_field" in capsys.readouterr().err


def test_serve_runs_a_local_stack_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "redisq_lab.cli", "serve", "--port", "0", "--machines", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    hub = proc.stdout.readline().split()[1]
    redis_url = proc.stdout.readline().split()[1]
    assert hub.startswith("ws://127.0.0.1:") and redis_url.startswith("redis://127.0.0.1:")
    assert "Ctrl-C" in proc.stdout.readline() + proc.stdout.readline()
    with urllib.request.urlopen(hub.replace("ws://", "http://") + "/health", timeout=5) as r:
        health = json.loads(r.read())
    assert health["connections"]["workers"] == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # its redis-server is gone too


def test_demo_prints_a_summary_and_writes_a_report(tmp_path: Path) -> None:
    report = tmp_path / "demo.html"
    r = subprocess.run(
        [sys.executable, "-m", "redisq_lab.cli", "demo", "--jobs", "150", "--machines", "1",
         "--gpus", "4", "--report", str(report)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "150/150 jobs completed" in r.stdout
    assert "p50" in r.stdout and "priority  10" in r.stdout
    assert "server clock: queued -> assigned" in r.stdout and "client clock" in r.stdout
    html = report.read_text()
    assert "Wait for a GPU by priority" in html and "plotly" in html
