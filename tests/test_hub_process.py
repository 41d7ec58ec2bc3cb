"""The hub as a real process: ``python -m redisq_server``, and SIGTERM during load."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosed

from redisq_server import EngineLimits, JobStatus, RedisService, Settings
from redisq_server.main import Hub

from .helpers import wait_for
from .peers import Peer, open_worker, serve_jobs


class HubProcess:
    """``python -m redisq_server --port 0`` as a child; ``url`` is read from its output."""

    def __init__(self, redis_url: str, namespace: str, *args: str) -> None:
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "REDISQ_NAMESPACE": namespace,
            "LOG_LEVEL": "INFO",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "redisq_server", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        self.lines: list[str] = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on ws://" in line:
                self.url = line.split("listening on ")[1].split()[0]
                break
        else:
            raise AssertionError("hub did not start:\n" + "".join(self.lines))
        # keep reading its log, or the hub blocks once the pipe is full
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def kill(self) -> None:
        """SIGKILL: the hub dies without cleaning anything up."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(30)
        self._reader.join(10)
        return rc


@pytest.fixture
def hub_proc(redis_url: str, namespace: str) -> Iterator[HubProcess]:
    hp = HubProcess(redis_url, namespace)
    yield hp
    if hp.proc.poll() is None:
        hp.proc.kill()
        hp.proc.wait()


def test_cli_help_lists_environment() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "redisq_server", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for var in (
        "REDIS_URL",
        "REDIS_HOST",
        "REDIS_PORT",
        "REDIS_DB",
        "REDIS_PASSWORD",
        "LOG_LEVEL",
        "HUB_PORT",
    ):
        assert var in out


def test_unreachable_redis_is_one_clear_line() -> None:
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0"}
    r = subprocess.run(
        [sys.executable, "-m", "redisq_server", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2
    assert "cannot start" in r.stderr and "Traceback" not in r.stderr


async def test_sigterm_during_load_strands_nothing(
    hub_proc: HubProcess, redis_url: str, limits: EngineLimits
) -> None:
    n_jobs = 200
    client = await Peer.open(f"{hub_proc.url}/ws/client/c1")
    workers = [await open_worker(hub_proc.url, f"m1:gpu{i}", ["t"]) for i in range(4)]
    ids = [
        (await client.request({"type": "submit_job", "job_type": "t"}))["job_id"]
        for _ in range(n_jobs)
    ]
    held = [await w.expect("job_assigned") for w in workers]  # four jobs running, held
    assert len({h["job_id"] for h in held}) == 4

    assert hub_proc.stop() == 0
    for peer in (*workers, client):
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await peer.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

    with RedisService(url=redis_url, limits=limits) as svc:
        stats = svc.get_stats()
        assert stats["running"] == 0 and stats["workers"] == 0
        assert stats["queued"] == n_jobs
        for h in held:
            job = svc.get_job(h["job_id"])
            assert job is not None and job.status == JobStatus.QUEUED and job.lost == 0

    # the workers come back on another hub and everything completes exactly once
    async with Hub(Settings(redis_url=redis_url, hub_port=0, limits=limits)) as hub2:
        done: list[str] = []
        ws = [await open_worker(hub2.url, f"m1:gpu{i}", ["t"]) for i in range(4)]
        tasks = [asyncio.create_task(serve_jobs(w, done)) for w in ws]
        with RedisService(url=redis_url, limits=limits) as svc:

            async def all_done() -> bool:
                return bool(svc.get_stats()["totals"]["completed"] >= n_jobs)

            await wait_for(all_done, timeout=60, what="all jobs completed")
            assert sorted(done) == sorted(ids)
            assert svc.get_stats()["totals"]["completed"] == n_jobs
        for t in tasks:
            t.cancel()


async def test_processes_share_one_port_and_serve_one_queue(
    redis_url: str, namespace: str, limits: EngineLimits
) -> None:
    """``--processes 2``: two hubs on one port; a client on one and a worker on the
    other complete a job; SIGTERM stops both gracefully."""
    hp = HubProcess(redis_url, namespace, "--processes", "2", "--hub-id", "mp")
    try:

        async def both_serve() -> bool:  # the parent says so once each child does
            return any("(2 processes)" in line for line in hp.lines)

        await wait_for(both_serve, timeout=30, what="both hub processes serving")
        client = await Peer.open(f"{hp.url}/ws/client/c1")
        client_hub = client.seen[0]["hub"]
        assert client_hub in ("mp-0", "mp-1")
        worker = None
        for i in range(64):  # the kernel picks the process by the new socket's port
            w = await open_worker(hp.url, f"m{i}:gpu0", ["mp"])
            if w.seen[0]["hub"] != client_hub:
                worker = w
                break
            await w.close()
        assert worker is not None, "every socket landed on one process"
        reply = await client.request({"type": "submit_job", "job_type": "mp", "params": {"x": 1}})
        job_id = reply["job_id"]
        m = await worker.expect("job_assigned")
        assert m["job_id"] == job_id and m["params"] == {"x": 1}
        await worker.send(
            {"type": "complete_job", "job_id": job_id, "attempt": m["attempt"], "result": 7}
        )
        done = await client.expect("job_completed")
        assert done["job_id"] == job_id and done["result"] == 7
        with RedisService(url=redis_url, limits=limits) as svc:
            hubs = {w.hub_id for w in svc.get_workers()}
            assert hubs == {"mp-0", "mp-1"} - {client_hub}
        assert hp.stop() == 0
        stopped = [line for line in list(hp.lines) if "stopped" in line]
        assert any("hub mp-0 stopped" in line for line in stopped)
        assert any("hub mp-1 stopped" in line for line in stopped)
        with pytest.raises(ConnectionClosed):
            while True:
                await client.recv()
    finally:
        if hp.proc.poll() is None:
            hp.proc.kill()
            hp.proc.wait()


def test_processes_must_be_at_least_one() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "redisq_server", "--port", "0", "--processes", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "expected >= 1" in r.stderr


def test_processes_on_a_port_taken_without_reuseport_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "redisq_server", "--port", str(port), "--processes", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 2
    assert "cannot start" in r.stderr and "Traceback" not in r.stderr
