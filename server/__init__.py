"""redisq_server: the production core of redisq-lab.

A Redis-backed priority job queue (:class:`RedisService`, every state change one
Lua script) and the asyncio WebSocket hub that clients, GPU workers and monitors
talk to (``python -m redisq_server``). It never imports the lab.
"""

from .config import EngineLimits, Settings
from .keys import Keys
from .models import (
    PROTOCOL_VERSION,
    ErrorCode,
    JobModel,
    JobStatus,
    MessageType,
    ProtocolError,
    Role,
    WorkerModel,
    WorkerStatus,
)
from .redis_service import (
    Assignment,
    AsyncRedisService,
    CancelResult,
    Event,
    FinishResult,
    RedisService,
    SubmitResult,
)

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "Assignment",
    "AsyncRedisService",
    "CancelResult",
    "EngineLimits",
    "ErrorCode",
    "Event",
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
