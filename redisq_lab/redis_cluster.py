"""A private Redis Cluster for the lab and the tests: three masters on free loopback ports, no replicas.

    with RedisClusterProcess() as cluster:
        url = cluster.url            # redis+cluster://127.0.0.1:<first port>
        cluster.port_for_slot(42)    # port of the master serving hash slot 42

Each node is ``redis-server --cluster-enabled yes`` in one temporary directory;
``redis-cli --cluster create`` joins them, then every node must report
``cluster_state:ok`` before the cluster is handed out. ``stop()`` stops every node
and removes the directory. Never touches a Redis it did not start.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from .redis_process import free_port

__all__ = ["HOST", "RedisClusterProcess", "cluster_tools_missing"]

HOST = "127.0.0.1"


def cluster_tools_missing() -> str | None:
    """Why a cluster cannot be created here (None: it can). Only ``redis-cli`` is
    checked: without ``redis-server`` nothing in the test suite runs anyway."""
    if shutil.which("redis-cli") is None:
        return "redis-cli is not on PATH (needed to create a local Redis Cluster)"
    return None


class RedisClusterProcess:
    """``masters`` cluster-enabled redis-server processes joined into one cluster."""

    def __init__(self, masters: int = 3) -> None:
        self.masters = masters
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL seeded with the first node."""
        return f"redis+cluster://{HOST}:{self.ports[0]}"

    @property
    def nodes(self) -> list[str]:
        return [f"{HOST}:{p}" for p in self.ports]

    @property
    def dir(self) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name)

    def node_client(self, port: int) -> redis.Redis:
        """A plain client for one node (no redirects: what that node alone holds)."""
        return redis.Redis(host=HOST, port=port, decode_responses=True)

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> RedisClusterProcess:
        self._tmp = tempfile.TemporaryDirectory(prefix="redisq-cluster-")
        try:
            for _ in range(self.masters):
                self._spawn_node(timeout)
            self._create(timeout)
            self._wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn_node(self, timeout: float) -> None:
        for _ in range(5):  # free_port can race with another process: try a few ports
            port = free_port(HOST)
            log = self.dir / f"redis-{port}.log"
            argv = [
                "redis-server",
                "--port", str(port),
                "--bind", HOST,
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "5000",
                "--dir", str(self.dir),
                "--save", "",
                "--appendonly", "no",
                "--protected-mode", "no",
                "--daemonize", "no",
                "--loglevel", "warning",
                "--logfile", str(log),
            ]  # fmt: skip
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._answers(port, proc, timeout):
                self.ports.append(port)
                self.procs.append(proc)
                return
            _terminate(proc)
        raise RuntimeError("a cluster node did not start: " + _tail(self.dir))

    def _answers(self, port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        client = self.node_client(port)
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return True
                time.sleep(0.02)
            return False
        finally:
            client.close()

    def _create(self, timeout: float) -> None:
        argv = ["redis-cli", "--cluster", "create", *self.nodes]
        argv += ["--cluster-replicas", "0", "--cluster-yes"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{r.stdout}\n{r.stderr}")

    def _wait_ok(self, timeout: float) -> None:
        """Every node reports cluster_state:ok and knows all 16384 slots."""
        deadline = time.monotonic() + timeout
        for port in self.ports:
            client = self.node_client(port)
            try:
                while True:
                    info = client.cluster("INFO")
                    if (
                        info.get("cluster_state") == "ok"
                        and int(info.get("cluster_slots_assigned", 0)) == 16384
                        and int(info.get("cluster_known_nodes", 0)) == self.masters
                    ):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"node {port} never reached cluster_state:ok: {info}")
                    time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        """Stop every node and remove the directory. Idempotent."""
        for proc in self.procs:
            _terminate(proc)
        self.procs.clear()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisClusterProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -------------------------------------------------------------- layout

    def slot_owners(self) -> dict[tuple[int, int], int]:
        """(first slot, last slot) -> port of the master serving that range."""
        client = self.node_client(self.ports[0])
        try:
            rows = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        finally:
            client.close()
        return {(int(r[0]), int(r[1])): int(r[2][1]) for r in rows}

    def port_for_slot(self, slot: int) -> int:
        for (lo, hi), port in self.slot_owners().items():
            if lo <= slot <= hi:
                return port
        raise KeyError(slot)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(directory: Path) -> str:
    logs = sorted(directory.glob("redis-*.log"))
    return "\n".join(p.read_text()[-1000:] for p in logs)
