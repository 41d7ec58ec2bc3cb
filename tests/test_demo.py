"""``redisq demo``: waits from the queue's own timestamps, strict priority, JSON output.

Each run starts the demo's real LocalStack (redis-server and hub) with mock GPUs and a
workload small enough for a few seconds but larger than the GPUs serve at once, so a
backlog builds. run_demo returns when every job has its result.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from redisq_lab.cli import main
from redisq_lab.demo import _stream_window, run_demo
from redisq_lab.frames import percentiles
from redisq_lab.monitors import JobMonitor
from redisq_lab.stack import LocalStack

JOBS = 120


@pytest.fixture(scope="module")
def saturated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One demo run, 120 jobs at once on 4 GPUs (about 2.5 s of GPU time), with the
    completed jobs as a JobMonitor read them before the stack closed."""
    seen: dict[str, Any] = {}

    def on_finish(stack: LocalStack, jobs: pd.DataFrame) -> None:
        with JobMonitor(stack) as monitor:
            seen["monitor"] = monitor.get_completed_jobs(limit=10 * JOBS)
        with stack.service() as svc:
            seen["stored"] = svc.get_jobs(list(jobs.index))
        seen["frame"] = jobs

    report = tmp_path_factory.mktemp("demo") / "report.html"
    out = io.StringIO()
    summary = run_demo(
        machines=2, gpus=2, jobs=JOBS, report=report, seed=3, out=out, on_finish=on_finish
    )
    return {**seen, "summary": summary, "text": out.getvalue(), "report": report}


def test_waits_are_the_servers_queued_to_assigned(saturated: dict[str, Any]) -> None:
    summary, monitor = saturated["summary"], saturated["monitor"]
    assert summary["completed"] == JOBS and len(monitor) == JOBS
    assert set(saturated["frame"].index) == set(monitor.index)
    waits = summary["wait_ms_by_priority"]
    assert list(waits) == ["10", "5", "0"]
    for prio, got in waits.items():
        wait_s = monitor.loc[monitor["priority"] == int(prio), "wait_s"]
        expected = percentiles((wait_s * 1000).tolist())
        assert got["n"] == len(wait_s) > 0
        for q in ("p50", "p95", "p99"):
            assert got[q] == pytest.approx(expected[q], rel=1e-9)


def test_strict_priority_shows_in_a_saturated_run(saturated: dict[str, Any]) -> None:
    waits = saturated["summary"]["wait_ms_by_priority"]
    assert waits["10"]["p50"] < waits["5"]["p50"] < waits["0"]["p50"]
    assert waits["10"]["p95"] < waits["5"]["p95"] < waits["0"]["p95"]


def test_summary_text_and_report_name_their_clocks(saturated: dict[str, Any]) -> None:
    summary, text = saturated["summary"], saturated["text"]
    assert f"{JOBS}/{JOBS} jobs completed" in text
    assert "wait for a GPU by priority (ms, server clock: queued -> assigned)" in text
    assert "submit -> accepted by the hub (ms, client clock" in text
    assert "submit -> result (ms, client clock)" in text
    assert "2 machines x 2 GPUs" in text and "seed 3" in text
    settings = summary["settings"]
    assert (settings["machines"], settings["gpus"], settings["jobs"]) == (2, 4, JOBS)
    assert settings["rate_per_s"] is None and settings["seed"] == 3
    assert set(settings["run_times"]) == {"image_generation", "inference", "training"}
    html = saturated["report"].read_text()
    assert html.count("plotly.js v") == 1  # plotly.js embedded once
    for title in (
        "time since start (s, server clock)",
        "wait for a GPU (ms, server queued→assigned)",
        "submit → result (ms, client clock)",
        "<th>p95 ms</th>",
    ):
        assert title in html
    assert "done_at_s" not in html and "wait_ms" not in html.replace("wait_ms_by", "")


def _figures(html: str) -> list[dict[str, Any]]:
    """The figures a report embeds, as ``{"data": [...], "layout": {...}}``: the
    arguments of each ``Plotly.newPlot("<div id>", data, layout, ...)`` call."""
    decoder = json.JSONDecoder()
    out = []
    for call in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', html):
        data, at = decoder.raw_decode(html, call.end())
        at = html.index("{", at)
        layout, _ = decoder.raw_decode(html, at)
        out.append({"data": data, "layout": layout})
    return out


def test_the_report_draws_every_job_on_its_gpu_from_its_server_start(
    saturated: dict[str, Any],
) -> None:
    """The report's task stream: one run bar per job on its worker's row, from its
    server start to its finish, a wait bar from queued to assigned (seconds since the
    first job was created, as the other charts), colours by priority."""
    figures = _figures(saturated["report"].read_text())
    assert len(figures) == 5
    stream = [f for f in figures if f["layout"]["title"]["text"].startswith("Task stream")]
    assert len(stream) == 1
    data, layout = stream[0]["data"], stream[0]["layout"]
    assert layout["title"]["text"].startswith(f"Task stream: all {JOBS} jobs by GPU")
    assert layout["xaxis"]["title"]["text"] == "time since start (s, server clock)"
    assert layout["yaxis"]["title"]["text"] == "GPU (worker id)"
    frame = saturated["frame"]
    assert sorted(layout["yaxis"]["categoryarray"]) == sorted(set(frame["worker_id"]))
    assert len(layout["yaxis"]["categoryarray"]) == 4
    t0 = frame["created"].min()

    def since(column: str, job_id: str) -> float:
        return float((frame.loc[job_id, column] - t0).total_seconds())

    bars = {t["name"]: t for t in data if t["type"] == "bar"}
    run, wait = bars["running"], bars["waiting"]
    assert sorted(run["customdata"]) == sorted(wait["customdata"]) == sorted(frame.index)
    for job_id, y, base, length in zip(
        run["customdata"], run["y"], run["base"], run["x"], strict=True
    ):
        assert y == frame.loc[job_id, "worker_id"]
        assert base == pytest.approx(since("started", job_id), abs=2e-3)
        assert base + length == pytest.approx(since("finished", job_id), abs=2e-3)
    for job_id, y, base, length in zip(
        wait["customdata"], wait["y"], wait["base"], wait["x"], strict=True
    ):
        assert y == frame.loc[job_id, "worker_id"]
        assert base == pytest.approx(since("queued", job_id), abs=2e-3)
        assert base + length == pytest.approx(since("assigned", job_id), abs=2e-3)
    legend = {t["name"]: t["marker"]["color"] for t in data if t["type"] == "scatter"}
    assert list(legend) == ["priority 10", "priority 5", "priority 0"]
    assert len(set(legend.values())) == 3
    for job_id, colour in zip(run["customdata"], run["marker"]["color"], strict=True):
        assert colour == legend[f"priority {frame.loc[job_id, 'priority']}"]


def test_a_long_run_streams_the_first_jobs_to_start(saturated: dict[str, Any]) -> None:
    stored = saturated["stored"]
    shown, title = _stream_window(stored, 50)
    first = sorted(j.started for j in stored if j.started is not None)[:50]
    assert sorted(j.started for j in shown) == first
    assert title.startswith(f"Task stream: the first 50 to start of {JOBS} jobs by GPU")
    shown, title = _stream_window(stored, JOBS)
    assert len(shown) == JOBS and title.startswith(f"Task stream: all {JOBS} jobs")


def test_json_format_prints_the_summary_as_the_last_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--jobs", "40", "--machines", "1", "--gpus", "2", "--seed", "5",
            "--report", "", "--format", "json"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert {
        "jobs", "completed", "elapsed_s", "throughput_per_s", "wait_ms_by_priority",
        "submit_to_accept_ms", "total_ms", "settings",
    } <= set(summary)  # fmt: skip
    assert summary["jobs"] == summary["completed"] == 40
    assert summary["elapsed_s"] > 0 and summary["throughput_per_s"] > 0
    for w in summary["wait_ms_by_priority"].values():
        assert set(w) == {"p50", "p95", "p99", "n"}
    assert sum(w["n"] for w in summary["wait_ms_by_priority"].values()) == 40
    assert set(summary["submit_to_accept_ms"]) == {"p50", "p99"}
    assert set(summary["total_ms"]) == {"p50", "p95", "p99"}
    assert summary["settings"]["seed"] == 5 and summary["settings"]["gpus"] == 2
    assert "jobs [" in captured.err and "40/40 jobs completed" in captured.err
