"""``python -m benchmarks --only instructions``: Redis' instructions per job lifecycle,
counted under callgrind, for this checkout and a base."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import instructions

ROOT = Path(__file__).resolve().parents[1]


def test_a_base_that_runs_more_commands_counts_more_instructions(tmp_path: Path) -> None:
    """A base checkout whose completion runs 20 more commands must count more
    instructions per job than this one, by far more than the counts' 1 % spread: the
    part measures each checkout's own library, through its own engine."""
    base = tmp_path / "base"
    shutil.copytree(
        ROOT / "server" / "redisq_server",
        base / "server" / "redisq_server",
        ignore=shutil.ignore_patterns("__pycache__", "static"),
    )
    complete = base / "server" / "redisq_server" / "lua" / "complete.lua"
    extra = "for _ = 1, 20 do redis.call('EXISTS', K.events()) end\n"
    complete.write_text(extra + complete.read_text())
    res = instructions.measure(jobs=100, base=base, repeats=1, windows=(0,))
    this, other = res["per_job"][0]["this"][0], res["per_job"][0]["base"][0]
    assert 100_000 < this < 5_000_000, this
    assert other > this * 1.05, (this, other)
    text = "\n".join(instructions.lines(res))
    assert "this / base: " in text and f"{this:,.0f}" in text


def test_a_prefetch_window_is_counted_through_jobs_held_ahead() -> None:
    """With a window each completion also takes a job to hold ahead (the driver
    checks every job completed, so the held jobs ran): a lifecycle then costs
    Redis about what it costs without one, not a fraction of it or several."""
    res = instructions.measure(jobs=100, base=None, repeats=1, windows=(0, 1))
    plain, held = res["per_job"][0]["this"][0], res["per_job"][1]["this"][0]
    assert 0.7 * plain < held < 1.5 * plain, (plain, held)
    text = "\n".join(instructions.lines(res))
    assert "prefetch window 1 (a job held ahead)" in text and f"{held:,.0f}" in text


def test_without_valgrind_the_part_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    res = instructions.measure(jobs=10, base=None, repeats=1)
    assert "valgrind" in res["skipped"]
    assert instructions.lines(res)[0].startswith("Redis instructions per job: skipped")
