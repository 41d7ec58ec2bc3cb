"""``python -m benchmarks.functions``: two function libraries, interleaved on one Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import functions, suite
from redisq_server.scripts import library_name, library_source


def test_the_base_library_is_built_by_the_base_checkout() -> None:
    root = Path(__file__).resolve().parents[1]
    assert functions.base_library(root) == library_source()
    with pytest.raises(ValueError, match="no function library"):
        functions.base_library(root / "docs")


async def test_each_segment_runs_the_library_it_is_counted_for(redis_url: str) -> None:
    """A base whose completion runs one command more must show exactly one more
    command per completion, and the same per submit: the segments are told apart."""
    this = library_source()
    body = "local function complete_body()\n"
    base = this.replace(library_name(), "redisq_fnbase").replace(
        body, body + "redis.call('EXISTS', K.events())\n", 1
    )
    assert base.count("redis.call('EXISTS', K.events())") == 1
    res = await functions.compare(redis_url, base, jobs=1200, segment=50)
    submit, complete = res["submit"], res["complete+claim"]
    assert min(r["segments"] for r in (*submit.values(), *complete.values())) >= 2
    assert submit["base"]["commands"] == pytest.approx(submit["this"]["commands"])
    assert complete["base"]["commands"] == pytest.approx(complete["this"]["commands"] + 1)
    assert all(r["fcall_us"] > 0 for r in (*submit.values(), *complete.values()))
    assert "this / base in FCALL: " in "\n".join(functions.lines(res))
    assert functions.lines({"skipped": "no base"}) == ["Function libraries: skipped: no base"]


def test_the_runner_runs_the_part_only_with_a_base(tmp_path: Path) -> None:
    """``--only functions`` with no ``--base`` says how to run it and fails nothing;
    with one, the runner's JSON holds both libraries' medians."""
    out = tmp_path / "r.json"
    common = ["--quick", "--only", "functions", "--peers", "none", "--json", str(out)]
    skipped = suite.main(common)
    assert "--base" in skipped["ours"]["functions"]["skipped"]
    root = Path(__file__).resolve().parents[1]
    ran = suite.main([*common, "--base", str(root)])["ours"]["functions"]
    assert set(ran) == {"submit", "complete+claim"}
    assert ran["submit"]["this"]["commands"] == pytest.approx(ran["submit"]["base"]["commands"])


async def test_each_library_s_completions_run_on_workers_it_registered(redis_url: str) -> None:
    """A base whose registration turns the prefetch window off: its completions take
    no job ahead (fewer commands), while this library's workers, registered by this
    library, do. Measured on workers registered by one library, both sides would
    run the same commands."""
    this = library_source()
    window = "'heard', ts(t), 'prefetch', A(7))"
    assert this.count(window) == 1
    base = this.replace(library_name(), "redisq_fnbase").replace(
        window, "'heard', ts(t), 'prefetch', '0')"
    )
    res = await functions.compare(redis_url, base, jobs=1200, segment=50)
    complete = res["complete+claim"]
    assert complete["base"]["commands"] + 0.5 < complete["this"]["commands"]
