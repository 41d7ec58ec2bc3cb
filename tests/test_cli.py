"""The ``redisq`` command against a real redis-server: tables, JSON, exit codes.

Most tests run ``main([...])`` in-process; one runs ``python -m redisq_lab.cli``.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from redisq_lab import cli
from redisq_lab.cli import COMMANDS, main
from redisq_lab.monitors import JOB_COLUMNS
from redisq_server import AsyncRedisService

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "redis://127.0.0.1:1/0"
GPU = {"gpu": {"model": "A100", "memory_gb": 80}}


@dataclass(frozen=True)
class Seeded:
    """What the ``seeded`` fixture put in the namespace."""

    completed: str
    failed: str
    queued: str


@pytest.fixture
async def seeded(svc: AsyncRedisService) -> Seeded:
    """One completed job (0.2 s of work), one failed, one queued; one idle worker."""
    done = (await svc.submit_job("render", 3, {"prompt": "a sunset"}, client_id="c1")).job_id
    bad = (await svc.submit_job("render", 1, client_id="c1")).job_id
    waiting = (await svc.submit_job("train", 7)).job_id
    a = await svc.register_worker("m1:gpu0", ["render"], GPU, hub_id="hub-a", session="s")
    assert a is not None and a.job_id == done
    await svc.update_progress(done, a.attempt, "m1:gpu0", 50, "half way")
    await asyncio.sleep(0.2)  # the job's work
    nxt = (await svc.complete_job(done, a.attempt, "m1:gpu0", {"url": "x.png"})).next
    assert nxt is not None and nxt.job_id == bad
    await svc.fail_job(bad, nxt.attempt, "m1:gpu0", "CUDA out of memory", retryable=False)
    return Seeded(done, bad, waiting)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Redisq = Callable[..., Run]


def run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Run:
    code = main(argv)
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


@pytest.fixture
def redisq(redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]) -> Redisq:
    """``redisq("jobs", "--status", "queued")`` runs the command on the test's
    namespace (``url=`` points it elsewhere) and returns a :class:`Run`."""

    def run(*argv: str, url: str = redis_url) -> Run:
        return run_main(capsys, ["--redis-url", url, "--namespace", namespace, *argv])

    return run


def iso_utc(text: str) -> datetime:
    """Parse an ISO 8601 time from the JSON output; it must carry UTC."""
    t = datetime.fromisoformat(text)
    assert t.tzinfo is not None and t.utcoffset() == UTC.utcoffset(t)
    return t


def one_line_error(run: Run, code: int) -> str:
    assert run.code == code, run
    assert run.out == ""
    assert run.err.startswith("redisq: ") and run.err.count("\n") == 1, run.err
    assert "Traceback" not in run.err
    return run.err


# ------------------------------------------------------------------ jobs


async def test_job_json_reports_what_happened(redisq: Redisq, seeded: Seeded) -> None:
    run = redisq("job", seeded.completed, "--format", "json")
    assert run.code == 0 and run.err == ""
    job = run.json()
    assert job["job_id"] == seeded.completed
    assert job["status"] == "completed" and job["worker_id"] == "m1:gpu0"
    assert job["params"] == {"prompt": "a sunset"} and job["result"] == {"url": "x.png"}
    assert job["priority"] == 3 and job["attempt"] == 1 and job["progress"] == 100.0
    assert 0.15 < job["run_s"] < 1.0
    assert job["position"] is None
    times = [iso_utc(job[k]) for k in ("created", "queued", "assigned", "started", "finished")]
    assert times == sorted(times)
    assert (times[4] - times[3]).total_seconds() == pytest.approx(job["run_s"], abs=1e-5)


async def test_job_table_is_one_field_a_line(redisq: Redisq, seeded: Seeded) -> None:
    run = redisq("job", seeded.failed)
    assert run.code == 0
    lines = dict(line.split(None, 1) for line in run.out.splitlines())
    assert lines["job_id"] == seeded.failed
    assert lines["status"] == "failed"
    assert lines["error"] == "CUDA out of memory"
    # it failed before reporting progress: started is the failure time
    assert lines["started"].endswith("Z")
    assert lines["finished"].endswith("Z")


@pytest.mark.parametrize(
    ("status", "field"),
    [("completed", "completed"), ("failed", "failed"), ("queued", "queued")],
)
async def test_jobs_json_lists_one_status(
    redisq: Redisq, seeded: Seeded, status: str, field: str
) -> None:
    run = redisq("jobs", "--status", status, "--format", "json")
    assert run.code == 0
    rows = run.json()
    assert [r["job_id"] for r in rows] == [getattr(seeded, field)]
    row = rows[0]
    assert row["status"] == status
    assert set(row) == {"job_id", *JOB_COLUMNS}
    iso_utc(row["created"])
    if status == "queued":
        assert row["job_type"] == "train" and row["priority"] == 7
        assert row["worker_id"] is None and row["finished"] is None and row["run_s"] is None
    if status == "failed":
        assert row["error"] == "CUDA out of memory" and row["client_id"] == "c1"
    if status == "completed":
        assert 0.15 < row["run_s"] < 1.0 and row["wait_s"] >= 0


async def test_jobs_limit_and_table(redisq: Redisq, svc: AsyncRedisService) -> None:
    ids = [(await svc.submit_job("render", p)).job_id for p in (1, 9, 5)]
    run = redisq("jobs", "--status", "queued", "--limit", "2", "--format", "json")
    assert [r["job_id"] for r in run.json()] == [ids[1], ids[2]]  # priority order
    run = redisq("jobs", "--status", "queued")
    assert run.code == 0
    header, *rows = run.out.splitlines()
    assert header.split() == [
        "job_id",
        "job_type",
        "priority",
        "status",
        "worker_id",
        "attempt",
        "progress",
        "created",
        "wait_s",
        "run_s",
        "error",
    ]
    assert [r.split()[0] for r in rows] == [ids[1], ids[2], ids[0]]
    assert redisq("jobs", "--status", "active").out == "(none)\n"


# --------------------------------------------------------------- workers


async def test_workers_json_and_table(redisq: Redisq, seeded: Seeded) -> None:
    rows = redisq("workers", "--format", "json").json()
    assert len(rows) == 1
    w = rows[0]
    assert w["worker_id"] == "m1:gpu0" and w["machine_id"] == "m1"
    assert w["status"] == "idle" and w["current_job"] is None and w["hub_id"] == "hub-a"
    assert w["jobs_done"] == 1 and w["jobs_failed"] == 1
    assert w["cap_gpu_model"] == "A100" and w["cap_gpu_memory_gb"] == 80
    assert w["busy_s"] > 0.15
    assert iso_utc(w["last_heartbeat"]) >= iso_utc(w["registered"])

    run = redisq("workers")
    header, row = run.out.splitlines()
    assert header.split()[:3] == ["worker_id", "machine_id", "status"]
    assert "cap_gpu_model" in header and row.split()[:3] == ["m1:gpu0", "m1", "idle"]

    machines = redisq("workers", "--by", "machine", "--format", "json").json()
    assert machines == [
        {
            "machine_id": "m1",
            "workers": 1,
            "busy": 0,
            "idle": 1,
            "jobs_done": 1,
            "jobs_failed": 1,
            "busy_s": pytest.approx(w["busy_s"]),
            "uptime_s": pytest.approx(machines[0]["uptime_s"]),
            "failure_rate": 0.5,
            "busy_share": pytest.approx(machines[0]["busy_share"]),
        }
    ]


async def test_worker_json_and_table(redisq: Redisq, seeded: Seeded) -> None:
    w = redisq("worker", "m1:gpu0", "--format", "json").json()
    assert w["worker_id"] == "m1:gpu0" and w["capabilities"] == GPU
    assert w["job_types"] == ["render"] and w["jobs_done"] == 1
    iso_utc(w["registered"])
    run = redisq("worker", "m1:gpu0")
    lines = dict(line.split(None, 1) for line in run.out.splitlines())
    assert lines["status"] == "idle" and lines["machine_id"] == "m1"
    assert json.loads(lines["capabilities"]) == GPU


# ----------------------------------------------------------------- summary


async def test_summary_json_and_table(redisq: Redisq, seeded: Seeded) -> None:
    stats = redisq("summary", "--format", "json").json()
    assert stats["queued"] == 1 and stats["running"] == 0
    assert stats["depth_by_type"] == {"render": 0, "train": 1}
    assert stats["depth_by_priority"] == {"7": 1}
    assert stats["workers"] == 1 and stats["workers_idle"] == 1
    assert stats["totals"]["completed"] == 1 and stats["totals"]["failed"] == 1
    assert stats["latency"]["sample"] == 1
    assert 0.15 < stats["latency"]["run_s"]["p99"] < 1.0
    iso_utc(stats["time"])

    out = redisq("summary").out
    assert "queued      1" in out
    assert "workers     1 (1 idle, 0 busy)" in out
    assert "latency (last 1 completed)" in out
    depth = out.split("queue depth\n", 1)[1].splitlines()
    assert depth[0].split() == ["job_type", "priority", "queued"]
    assert depth[1].split() == ["train", "7", "1"]


# ------------------------------------------------------------------ errors


async def test_unknown_ids_exit_1_with_one_line(redisq: Redisq, seeded: Seeded) -> None:
    err = one_line_error(redisq("job", "no-such-job"), 1)
    assert "no job 'no-such-job'" in err
    one_line_error(redisq("job", "not a job id", "--format", "json"), 1)
    err = one_line_error(redisq("worker", "m9:gpu9"), 1)
    assert "no worker 'm9:gpu9'" in err
    one_line_error(redisq("worker", "gpu0"), 1)


@pytest.mark.parametrize(
    "argv",
    [
        ["summary"],
        ["jobs", "--status", "queued"],
        ["job", "j1"],
        ["workers", "--format", "json"],
        ["worker", "m1:gpu0"],
    ],
)
def test_unreachable_redis_exits_2(redisq: Redisq, argv: list[str]) -> None:
    err = one_line_error(redisq(*argv, url=UNREACHABLE), 2)
    assert f"cannot reach Redis at {UNREACHABLE}" in err


def test_password_is_masked_in_errors(redisq: Redisq) -> None:
    err = one_line_error(redisq("summary", url="redis://:hunter2@127.0.0.1:1/0"), 2)
    assert "hunter2" not in err and "redis://:***@127.0.0.1:1/0" in err


def test_bad_arguments(redisq: Redisq, capsys: pytest.CaptureFixture[str]) -> None:
    assert redisq("jobs").code == 2  # --status is required
    assert redisq("jobs", "--status", "running").code == 2
    assert redisq("jobs", "--status", "queued", "--limit", "0").code == 2
    assert run_main(capsys, []).code == 2
    bad = run_main(capsys, ["--redis-url", UNREACHABLE, "--namespace", "bad ns", "summary"])
    assert "namespace 'bad ns'" in one_line_error(bad, 2)


# ------------------------------------------------------------ the registry


def test_subcommands_come_from_the_registry(
    redisq: Redisq, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert {"summary", "jobs", "job", "workers", "worker"} <= set(COMMANDS)
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in COMMANDS)

    monkeypatch.setattr(cli, "COMMANDS", dict(COMMANDS))

    @cli.command("hello", "say hello", formats=False)
    def _hello(args: Any) -> int:
        print(f"hello {args.namespace}")
        return 0

    run = redisq("hello")
    assert run.code == 0 and run.out.startswith("hello ")
    assert "hello" not in COMMANDS  # the patched registry took it


# ----------------------------------------------------------- as a process


async def test_runs_as_a_module_with_the_environment(
    redis_url: str, namespace: str, seeded: Seeded
) -> None:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDISQ_NAMESPACE": namespace,
        "PYTHONPATH": str(ROOT),
    }
    argv = [sys.executable, "-m", "redisq_lab.cli", "jobs", "--status", "completed"]
    done = await asyncio.to_thread(
        subprocess.run,
        [*argv, "--format", "json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [r["job_id"] for r in json.loads(done.stdout)] == [seeded.completed]

    env["REDIS_URL"] = UNREACHABLE
    failed = await asyncio.to_thread(
        subprocess.run, argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert failed.returncode == 2 and failed.stdout == ""
    assert (
        failed.stderr.startswith("redisq: cannot reach Redis") and "Traceback" not in failed.stderr
    )


# ------------------------------------------------------- as a person uses it


async def test_options_may_follow_the_command(
    redis_url: str, namespace: str, seeded: Seeded, capsys: pytest.CaptureFixture[str]
) -> None:
    after = run_main(
        capsys,
        ["summary", "--redis-url", redis_url, "--namespace", namespace, "--format", "json"],
    )
    assert after.code == 0, after.err
    assert after.json()["queued"] == 1 and after.json()["namespace"] == namespace
    # given on both sides, the one after the command wins
    both = run_main(
        capsys,
        ["--redis-url", UNREACHABLE, "--namespace", "other", "job", seeded.queued,
         "--redis-url", redis_url, "--namespace", namespace, "--format", "json"],
    )  # fmt: skip
    assert both.code == 0, both.err
    assert both.json()["job_id"] == seeded.queued
    err = one_line_error(run_main(capsys, ["summary", "--redis-url", UNREACHABLE]), 2)
    assert UNREACHABLE in err


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["job", "no-such-job"], 1, "no job 'no-such-job'"),
        (["worker", "m9:gpu9"], 1, "no worker 'm9:gpu9'"),
        (["jobs", "--status", "queued", "--limit", "x"], 2, "expected a positive integer"),
        (["top", "--interval", "-1"], 2, "expected a positive number"),
        (["nonsense"], 2, "invalid choice"),
    ],
)
def test_exit_codes_are_the_documented_ones(
    redisq: Redisq, argv: list[str], code: int, says: str
) -> None:
    """0 ok, 1 not found, 2 usage or connection (see the module docs and the README)."""
    run = redisq(*argv)
    assert run.code == code and says in run.err
    assert "Traceback" not in run.err
    for doc in (cli.__doc__ or "", (ROOT / "README.md").read_text()):
        assert "1 not found" in doc and "2 a usage error" in doc


async def test_machine_uptime_is_the_machines_not_the_sum_over_gpus(
    redisq: Redisq, svc: AsyncRedisService
) -> None:
    await svc.register_worker("box:gpu0", ["render"], GPU, hub_id="h", session="s0")
    await asyncio.sleep(0.4)  # the second GPU comes up later
    await svc.register_worker("box:gpu1", ["render"], GPU, hub_id="h", session="s1")
    await asyncio.sleep(0.4)
    gpus = {w["worker_id"]: w["uptime_s"] for w in redisq("workers", "--format", "json").json()}
    (box,) = redisq("workers", "--by", "machine", "--format", "json").json()
    assert box["machine_id"] == "box" and box["workers"] == 2
    assert gpus["box:gpu0"] > gpus["box:gpu1"] + 0.3
    assert box["uptime_s"] == pytest.approx(gpus["box:gpu0"], abs=0.2)
    assert box["uptime_s"] < gpus["box:gpu0"] + gpus["box:gpu1"] - 0.2
    assert 0 <= box["busy_share"] <= 1
    table = redisq("workers", "--by", "machine").out.splitlines()
    assert table[0].split()[:2] == ["machine_id", "workers"] and table[1].split()[0] == "box"


async def test_a_closed_pipe_ends_quietly(
    redis_url: str, namespace: str, svc: AsyncRedisService
) -> None:
    """``redisq jobs ... | head -1``: far more output than a pipe holds, and the
    reader goes away after one line."""
    for i in range(600):
        await svc.submit_job("render", i % 5, {"prompt": "x" * 200})
    argv = [sys.executable, "-m", "redisq_lab.cli", "jobs", "--status", "queued",
            "--format", "json", "--redis-url", redis_url, "--namespace", namespace]  # fmt: skip

    def head_one() -> tuple[int, str, str]:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline().decode()
        proc.stdout.close()  # what head does after its line
        err = proc.stderr.read().decode()
        return proc.wait(60), first, err

    code, first, err = await asyncio.to_thread(head_one)
    assert first == "[\n"
    assert err == ""  # no "Broken pipe", no traceback
    assert code == 141


# -------------------------------------------------------------------- top


async def test_top_prints_each_refresh_into_a_pipe(redisq: Redisq, seeded: Seeded) -> None:
    run = await asyncio.to_thread(redisq, "top", "--iterations", "2", "--interval", "0.05")
    assert run.code == 0 and run.err == ""
    frames = run.out.split("redisq top")[1:]
    assert len(frames) == 2
    for frame in frames:
        assert "1 queued" in frame and "1 GPUs: 0 busy, 1 idle" in frame
        assert re.search(r"│ train\s+│\s+7 │\s+1 │", frame), frame
        assert re.search(r"│ m1\s+│\s+1 │\s+0 │\s+1 │\s+1 │\s+1 │", frame), frame
        assert "jobs/s now" in frame and "latency, s (last 1 completed)" in frame


async def test_top_refreshes_in_place_on_a_terminal(
    redis_url: str, namespace: str, seeded: Seeded
) -> None:
    argv = [sys.executable, "-m", "redisq_lab.cli", "top", "--iterations", "3",
            "--interval", "0.2", "--redis-url", redis_url, "--namespace", namespace]  # fmt: skip
    out = await asyncio.to_thread(run_in_terminal, argv)
    # three renders (rich draws the last one once more as it stops) ...
    assert out.count(b"redisq top") in (3, 4)
    assert b"\x1b[?25l" in out  # ... with the cursor hidden
    assert out.count(b"\x1b[1A") >= 2 * 10  # ... each drawn over the last, line by line
    assert b"train" in out and b"Traceback" not in out


def run_in_terminal(argv: list[str]) -> bytes:
    """Run ``argv`` in a pseudo-terminal of 120 x 50; return all it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color"}
    for var in ("NO_COLOR", "COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE"):
        env.pop(var, None)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    assert proc.wait(60) == 0, out.decode(errors="replace")
    return out
