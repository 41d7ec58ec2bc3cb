"""redisq_lab: the Jupyter-first toolkit for running and studying a redisq queue.

What a notebook imports::

    from redisq_lab import LocalStack, MockWorker, QueueClient, JobMonitor, RedisMonitor

Everything returns data first (pandas DataFrames, dicts) and renders second.
"""

from redisq_server import __version__

from .client import JobFailed, JobTrace, QueueClient, RequestError
from .dashboard import Dashboard
from .load import LoadGenerator, summarize
from .mock_worker import MockWorker
from .monitors import JobMonitor, NotFoundError, RedisMonitor, WorkerMonitor
from .redis_process import RedisNotInstalled, RedisProcess
from .stack import LocalStack

__all__ = [
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
]
