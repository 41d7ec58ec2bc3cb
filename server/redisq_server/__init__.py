"""redisq_server: the production core of redisq-lab.

A Redis-backed priority job queue (:class:`RedisService`, every state change one
Lua script) and the asyncio WebSocket hub that clients, GPU workers and monitors
talk to (``python -m redisq_server``). Protocol v1 lives in
:mod:`redisq_server.protocol`. It never imports the lab.
"""

from .config import EngineLimits, Settings
from .keys import Keys
from .models import JobModel, JobStatus, WorkerModel, WorkerStatus
from .operations import Assignment, CancelResult, Event, FinishResult, SubmitResult
from .protocol import PROTOCOL_VERSION, ErrorCode, EventName, MessageType, ProtocolError, Role
from .redis_service import AsyncRedisService, RedisService
from .version import __version__

__all__ = [
    "PROTOCOL_VERSION",
    "Assignment",
    "AsyncRedisService",
    "CancelResult",
    "EngineLimits",
    "ErrorCode",
    "Event",
    "EventName",
    "FinishResult",
    "JobModel",
    "JobStatus",
    "Keys",
    "MessageType",
    "ProtocolError",
    "RedisService",
    "Role",
    "Settings",
    "SubmitResult",
    "WorkerModel",
    "WorkerStatus",
    "__version__",
]
