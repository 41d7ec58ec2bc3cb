"""The running subcommands: submit, mock-workers, serve and demo."""

from __future__ import annotations

import json
import os
import re
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
    for params, says in [("{nope", "not JSON"), ("[1,2]", "must be a JSON object")]:
        assert main(["submit", "t", "--params", params, "--hub-url", stack.hub_url]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(["submit", "bad type!", "--hub-url", stack.hub_url]) == 2
    assert "invalid_field" in capsys.readouterr().err
    assert main(["submit", "t", "--priority", "99999", "--hub-url", stack.hub_url]) == 2
    err = capsys.readouterr().err
    assert "priority" in err and err.count("\n") == 1
    assert main(["submit", "t", "--wait", "--timeout", "0", "--hub-url", stack.hub_url]) == 2
    assert "positive number" in capsys.readouterr().err


def test_submit_without_wait_prints_the_job_ids(
    stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["submit", "nobody", "--count", "2", "--hub-url", stack.hub_url]
    assert main([*argv, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["queued", "queued"]
    assert main(argv) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["job_id", "status"]
    ids = [line.split()[0] for line in lines]
    assert len(ids) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    with stack.service() as svc:
        jobs = svc.get_jobs([r["job_id"] for r in rows] + ids)
        assert [j.status for j in jobs] == ["queued"] * 4
        for j in jobs:
            svc.cancel_job(j.job_id)


def test_submit_wait_says_when_no_worker_takes_the_job_type(
    stack: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    stack.add_workers(1, 1, run_time=0.0, prefix="other", job_types=["inference"])
    argv = ["submit", "nobody", "--wait", "--timeout", "2.5", "--hub-url", stack.hub_url]
    assert main([*argv, "--format", "json"]) == 1
    out, err = capsys.readouterr()
    (row,) = json.loads(out)
    assert row["status"] == "queued"
    warning, final = err.splitlines()
    assert (
        warning == "redisq: no connected worker accepts job type 'nobody'; waiting until --timeout"
    )
    assert final == (
        "redisq: timed out after 2.5 s: 1 of 1 jobs not finished; "
        "no connected worker accepts job type 'nobody'"
    )
    # a type that a worker takes: done well within the timeout, no warning
    argv = ["submit", "inference", "--wait", "--timeout", "30", "--hub-url", stack.hub_url]
    assert main([*argv, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["status"] == "completed" and err == ""
    stack.stop_workers()
    with stack.service() as svc:
        svc.cancel_job(row["job_id"])


def test_serve_runs_a_local_stack_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "redisq_lab.cli", "serve", "--port", "0", "--machines", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(8)]
    hub = lines[0].split()[1]
    redis_url = lines[1].split()[1]
    assert hub.startswith("ws://127.0.0.1:") and redis_url.startswith("redis://127.0.0.1:")
    page = hub.replace("ws://", "http://")
    assert lines[2:5] == [
        "namespace redisq\n",
        f"dashboard {page}/dashboard\n",
        f"metrics   {page}/metrics\n",
    ]
    # what the reading commands need, ready to paste
    assert lines[5] == f"read it with: export REDIS_URL={redis_url}\n"
    assert lines[6] == f"          or: redisq summary --redis-url {redis_url}\n"
    assert "Ctrl-C" in lines[7]
    with urllib.request.urlopen(page + "/health", timeout=5) as r:
        health = json.loads(r.read())
    assert health["connections"]["workers"] == 2
    summary = subprocess.run(
        [sys.executable, "-m", "redisq_lab.cli", *lines[6].split()[2:], "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert summary.returncode == 0, summary.stderr
    assert json.loads(summary.stdout)["workers"] == 2
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
