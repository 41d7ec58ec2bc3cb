"""``python -m benchmarks --only hub-instructions``: the hub's instructions per job,
counted under callgrind, for this checkout and a base."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import hub_instructions

ROOT = Path(__file__).resolve().parents[1]


def test_a_base_whose_hub_does_more_per_frame_counts_more_instructions(
    tmp_path: Path,
) -> None:
    """A base checkout whose hub does extra work for every frame it reads must count
    more instructions per job, both ways of running jobs, by far more than the
    counts' 1 % spread: the part runs each checkout's own hub, and counts whole jobs
    (a part's count is not the start-up's, nor zero)."""
    base = tmp_path / "base"
    shutil.copytree(
        ROOT / "server" / "redisq_server",
        base / "server" / "redisq_server",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    routes = base / "server" / "redisq_server" / "routes.py"
    text = routes.read_text()
    marker = "        try:\n            msg = protocol.decode_message(raw, conn.role)\n"
    assert marker in text
    routes.write_text(text.replace(marker, "        sum(range(20_000))\n" + marker, 1))
    res = hub_instructions.measure(30, 120, 1, base=base, repeats=1)
    per_job = res["per_job"]
    for kind in ("one_at_a_time", "drain"):
        this, other = per_job["this"][kind][0], per_job["base"][kind][0]
        assert 50_000 < this < 20_000_000, (kind, this)
        assert other > this * 1.05, (kind, this, other)
    # more frames per job one at a time (a submit and a completion) than drained
    assert per_job["this"]["one_at_a_time"][0] > per_job["this"]["drain"][0]
    text = "\n".join(hub_instructions.lines(res))
    assert "one at a time" in text and "a drain" in text
    assert text.count("this / base: ") == 2


def test_without_valgrind_the_part_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_instructions.shutil, "which", lambda name: None)
    res = hub_instructions.measure(10, 10, 1, base=None, repeats=1)
    assert "valgrind" in res["skipped"]
    assert hub_instructions.lines(res)[0].startswith("Hub instructions per job: skipped")
