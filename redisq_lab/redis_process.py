"""A private ``redis-server`` in a temporary directory, on a free loopback port.

Used by the local stack, the tests and the benchmarks: never a user's Redis.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RedisNotInstalled", "RedisProcess", "free_port"]

INSTALL_HINT = (
    "redis-server was not found on PATH. Install it with "
    "'sudo apt-get install redis-server' (Debian/Ubuntu), 'brew install redis' (macOS) "
    "or 'conda install -c conda-forge redis-server'."
)


class RedisNotInstalled(RuntimeError):
    """``redis-server`` is not on PATH; the message says how to install it."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller must still handle a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the thread that started
    us dies, so a killed test run or kernel never leaves a redis-server behind."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _ping(host: str, port: int, password: str | None) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            if password:
                s.sendall(f"AUTH {password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """One ``redis-server`` child process. ``start()`` returns once it answers PING.

    Nothing is persisted unless ``appendonly=True`` (then the AOF lives in the temp
    dir and survives :meth:`restart`). ``wrapper``: a command the server runs under,
    e.g. ``("valgrind", "--tool=callgrind")`` (give :meth:`start` a timeout to match).
    Call :meth:`stop` (or use ``with``) when done; the temp dir is removed then.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        password: str | None = None,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
        executable: str | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        self.host = host
        self.port = port or 0
        self.password = password
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.executable = executable or shutil.which("redis-server")
        self.wrapper = wrapper
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def dir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="redisq-redis-")
        return Path(self._tmp.name)

    def _argv(self) -> list[str]:
        assert self.executable
        argv = [
            *self.wrapper,
            self.executable,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.dir),
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if self.appendonly:
            argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            argv += ["--appendonly", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv + list(self.extra_args)

    def start(self, timeout: float = 10.0) -> RedisProcess:
        """Start the server and wait until it answers; raise if it cannot."""
        if self.executable is None:
            raise RedisNotInstalled(INSTALL_HINT)
        if self.proc is not None and self.proc.poll() is None:
            return self
        fixed = bool(self.port)
        for _ in range(1 if fixed else 5):
            if not fixed:
                self.port = free_port(self.host)
            if self._spawn(timeout):
                return self
        log = self.dir / "redis.log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")

    def _spawn(self, timeout: float) -> bool:
        """Spawn on ``self.port``; wait until it answers PING or exits."""
        self.proc = subprocess.Popen(
            self._argv(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a notebook "Interrupt" (SIGINT) must not reach it
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if _ping(self.host, self.port, self.password):
                return True
            time.sleep(0.02)
        self._kill()
        return False

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Stop the server and remove its directory. Idempotent."""
        self._kill()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same port and directory (AOF is replayed)."""
        self._kill()
        if not self._spawn(timeout):
            raise RuntimeError(f"redis-server did not restart on port {self.port}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
