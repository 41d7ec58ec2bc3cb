"""LocalStack and LoadGenerator: start, stop, leave nothing behind, run a workload."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.request

import pytest

from redisq_lab.client import JobFailed
from redisq_lab.load import LoadGenerator, summarize
from redisq_lab.monitors import JobMonitor, WorkerMonitor
from redisq_lab.redis_process import RedisProcess
from redisq_lab.stack import LocalStack, RedisNotInstalled

from .helpers import wait_for, wait_sync


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_start_stop_twice_leaves_nothing() -> None:
    for _ in range(2):
        stack = LocalStack(namespace="twice")
        redis_pid = stack.redis.proc.pid if stack.redis.proc else 0
        redis_dir = stack.redis.dir
        hub_port = stack.hub.port
        assert _port_open(hub_port)
        assert stack.stats()["workers"] == 0
        assert "LocalStack" in stack._repr_html_() and stack.hub_url in stack._repr_html_()
        stack.close()
        stack.close()  # idempotent
        assert stack.closed
        assert not _port_open(hub_port)
        assert not _pid_alive(redis_pid)
        assert not redis_dir.exists()
        assert not stack._thread.is_alive()


def test_missing_redis_server_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RedisNotInstalled, match="apt-get install redis-server"):
        LocalStack()
    with pytest.raises(RedisNotInstalled):
        RedisProcess().start()


def test_stack_runs_workers_and_a_workload() -> None:
    with LocalStack(namespace="load") as stack:
        workers = stack.add_workers(machines=2, gpus=2, run_time=0.0, progress_steps=1)
        assert len(workers) == 2
        assert stack.stats()["workers"] == 4
        seen: list[int] = []
        gen = LoadGenerator(
            stack,
            n_jobs=120,
            job_types={"default": 2, "inference": 1},
            priorities={0: 3, 5: 1},
            seed=1,
            on_progress=lambda done, total: seen.append(done),
        )
        rows = asyncio.run(gen.run_rows())
        assert len(rows) == 120
        assert {r["status"] for r in rows} == {"completed"}
        assert seen[-1] == 120
        assert all(r["total_s"] >= r["accept_s"] > 0 for r in rows)
        summary = summarize(rows, gen.finished_at - gen.started_at)  # type: ignore[operator]
        assert summary["completed"] == 120
        assert summary["throughput_per_s"] > 0
        assert set(summary["wait_by_priority_s"]) == {0, 5}
        assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
        job_id = stack.submit("inference", priority=1)
        assert len(job_id) == 32
        assert sum(w.completed for w in workers) >= 120
    assert stack.closed


async def test_async_context_manager() -> None:
    async with LocalStack(namespace="async") as stack, stack.client("c1") as client:
        job_id = await client.submit("default")
        assert (await client.status(job_id))["status"] == "queued"
    assert stack.closed


# ------------------------------------------------------------ scale and the card


def _live_gpus(stack: LocalStack) -> set[str]:
    return set(WorkerMonitor(stack).get_all_workers().index)


def test_scale_adds_and_stops_machines_and_the_hub_requeues_their_jobs() -> None:
    with LocalStack(namespace="scale") as stack:
        stack.add_workers(machines=1, gpus=2, run_time=30.0, progress_steps=1)
        assert _live_gpus(stack) == {"machine1:gpu0", "machine1:gpu1"}
        # up: two more machines with the same GPUs and options
        machines = stack.scale(machines=3)
        assert [w.machine_id for w in machines] == ["machine1", "machine2", "machine3"]
        assert stack.workers == machines and all(w.gpu_count == 2 for w in machines)
        assert len(_live_gpus(stack)) == 6
        # six 30 s jobs: one on every GPU
        job_ids = [stack.submit("default", params={"i": i}) for i in range(6)]
        wait_sync(lambda: stack.stats()["running"] == 6, what="six jobs running")
        on_machine3 = {
            j
            for j in job_ids
            if (JobMonitor(stack).get_job_details(j).get("worker_id") or "").startswith("machine3:")
        }
        assert len(on_machine3) == 2
        # down: the newest machine stops, its GPUs leave, its jobs go back to the queue
        machines = stack.scale(machines=2)
        assert [w.machine_id for w in machines] == ["machine1", "machine2"]
        wait_sync(lambda: len(_live_gpus(stack)) == 4, what="machine3's GPUs gone")
        assert not any(g.startswith("machine3:") for g in _live_gpus(stack))
        wait_sync(lambda: stack.stats()["queued"] == 2, what="machine3's jobs requeued")
        assert {j for j in job_ids if _status(stack, j) == "queued"} == on_machine3
        assert stack.stats()["totals"]["requeued"] == 2
        # another GPU count replaces the machines; zero machines stops them all
        machines = stack.scale(machines=1, gpus=4, run_time=0.01)
        assert [(w.machine_id, w.gpu_count) for w in machines] == [("machine1", 4)]
        wait_sync(lambda: len(_live_gpus(stack)) == 4, what="one machine of four GPUs")
        assert stack.scale(machines=0) == [] and stack.workers == []
        wait_sync(lambda: not _live_gpus(stack), what="no GPU left")
        with pytest.raises(ValueError, match="machines"):
            stack.scale(machines=-1)


def _status(stack: LocalStack, job_id: str) -> str:
    return str(JobMonitor(stack).get_job_details(job_id)["status"])


def test_card_shows_rates_the_breakdown_and_the_dashboard_link() -> None:
    with LocalStack(namespace="card") as stack:
        stack.add_workers(machines=2, gpus=2, run_time=0.0, progress_steps=1)
        job_ids = [stack.submit("default") for _ in range(8)]
        wait_sync(lambda: stack.stats()["totals"]["completed"] == 8, what="eight completed")
        assert stack.dashboard_url == f"http://127.0.0.1:{stack.hub.port}/dashboard"
        with urllib.request.urlopen(stack.dashboard_url, timeout=10) as page:  # the hub's own
            assert page.status == 200 and page.headers.get_content_type() == "text/html"
        link = f"<a href='{stack.dashboard_url}' target='_blank'"
        page = stack._repr_html_()
        for text in ("Throughput now", "jobs/s (last ", "Since start", "(8 in ", link):
            assert text in page, text
        # the breakdown folds open: per machine, then per GPU
        assert "<details><summary>Workers: 2 machines, 4 GPUs</summary>" in page
        details = page[page.index("<details>") :]
        for name in ("machine1", "machine2", "machine1:gpu0", "machine2:gpu1", "By GPU"):
            assert f">{name}<" in details, name
        # the live card: the same rows, the breakdown in a fold that keeps its state
        card = stack.card()
        assert card.task is None  # no running loop here: rendered once
        assert link in card.summary.value and "Since start" in card.summary.value
        assert card.fold.titles == ("Workers: 2 machines, 4 GPUs",)
        assert ">machine2:gpu1<" in card.fold_html.value
        assert card.fold.selected_index is None  # folded until opened
        # outside a kernel, displaying the stack gives the static card
        bundle = stack._repr_mimebundle_()
        assert set(bundle) == {"text/plain", "text/html"} and link in bundle["text/html"]
        assert len(job_ids) == 8
    # closed, the card keeps the figures read as the stack closed
    closed = stack._repr_html_()
    assert "<td style='text-align:left;padding-right:1em'>closed</td>" in closed
    assert "(8 in " in closed and "Workers: 2 machines, 4 GPUs (as the stack closed)" in closed


async def test_card_is_live_in_a_kernel_and_stops_when_the_stack_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = await asyncio.to_thread(LocalStack, namespace="livecard")
    try:
        monkeypatch.setattr("redisq_lab.stack._in_kernel", lambda: True)
        bundle = stack._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle
        assert stack.dashboard_url in bundle["text/html"]  # the static fallback
        card = stack.card(interval=0.1)
        assert card.task is not None and "Workers: none connected" in card.fold.titles
        await asyncio.to_thread(stack.add_workers, machines=1, gpus=3, run_time=0.0)
        await wait_for(
            lambda: _true(card.fold.titles == ("Workers: 1 machine, 3 GPUs",)),
            what="the card to see the new machine",
        )
    finally:
        await asyncio.to_thread(stack.close)
    await asyncio.wait_for(card.task, 5)  # the refresh ended by itself
    assert ">closed<" in card.summary.value
    assert card.fold.titles == ("Workers: 1 machine, 3 GPUs (as the stack closed)",)


async def _true(value: bool) -> bool:
    return value


# ------------------------------------------------------------------- progress


async def test_submit_many_and_results_show_progress_and_keep_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stack = await asyncio.to_thread(LocalStack, namespace="progress")
    try:
        await asyncio.to_thread(stack.add_workers, machines=1, gpus=2, run_time=0.0)
        async with stack.client("bars") as client:
            specs = ({"job_type": "default", "params": {"i": i}} for i in range(40))
            job_ids = await client.submit_many(specs, progress=True)
            results = await client.results(job_ids, timeout=30, progress=True)
            # a cancelled job raises, or stands in its place with return_exceptions
            late = await client.submit("no-gpu-takes-this")  # stays queued
            assert (await client.cancel(late))["status"] == "cancelled"
            with pytest.raises(JobFailed, match="cancelled"):
                await client.results([job_ids[0], late], timeout=30)
            mixed = await client.results([late, job_ids[1]], timeout=30, return_exceptions=True)
        assert len(job_ids) == len(set(job_ids)) == 40
        assert results == [client.traces[j].result for j in job_ids]  # in order
        assert all(r["worker_id"].startswith("machine1:") for r in results)
        assert isinstance(mixed[0], JobFailed) and mixed[1] == results[1]
        gen = LoadGenerator(stack, n_jobs=25, seed=1, progress="a load of 25")
        rows = await gen.run_rows()
        assert {r["status"] for r in rows} == {"completed"}
    finally:
        await asyncio.to_thread(stack.close)
    # tqdm's text bars (outside a notebook they go to stderr): each reached its total
    err = capsys.readouterr().err
    assert "submitted: 100%" in err and "40/40" in err
    assert "finished: 100%" in err and "a load of 25: 100%" in err and "25/25" in err
