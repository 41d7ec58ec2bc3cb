"""The deliberate public surfaces: what a notebook imports, and the core's boundary."""

from __future__ import annotations

import subprocess
import sys

import redisq_lab
import redisq_server

LAB_API = {
    "Dashboard",
    "JobFailed",
    "JobMonitor",
    "JobTrace",
    "LoadGenerator",
    "LocalStack",
    "MockWorker",
    "NotFoundError",
    "QueueClient",
    "RedisMonitor",
    "RedisNotInstalled",
    "RedisProcess",
    "RequestError",
    "WorkerMonitor",
    "__version__",
    "summarize",
}


def test_lab_exports_exactly_its_public_api() -> None:
    assert set(redisq_lab.__all__) == LAB_API
    for name in LAB_API:
        assert getattr(redisq_lab, name) is not None


def test_server_exports_resolve() -> None:
    for name in redisq_server.__all__:
        assert getattr(redisq_server, name) is not None
    assert "RedisService" in redisq_server.__all__ and "JobModel" in redisq_server.__all__


def test_core_never_imports_the_lab_or_its_dependencies() -> None:
    code = (
        "import sys, redisq_server, redisq_server.main, redisq_server.routes, redisq_server.routing; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('redisq_lab', 'pandas', 'plotly', 'ipywidgets', 'numpy')]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
