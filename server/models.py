"""Protocol v1 and the job model: message types, statuses, validation, encoding.

Pure: nothing here touches a socket or Redis. This module is the single source of
truth for what a valid message, job id or priority is; the hub and the engine both
validate through it, so a bad value is refused the same way everywhere.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Final

__all__ = [
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "PROTOCOL_VERSION",
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "ErrorCode",
    "JobModel",
    "JobStatus",
    "Message",
    "MessageType",
    "ProtocolError",
    "Role",
    "WorkerModel",
    "WorkerStatus",
    "can_transition",
    "check_size",
    "decode_message",
    "decode_score",
    "dumps",
    "encode",
    "error_message",
    "parse_worker_id",
    "queue_score",
    "validate_client_id",
    "validate_job_id",
    "validate_job_type",
    "validate_max_attempts",
    "validate_params",
    "validate_priority",
    "validate_worker_id",
]

PROTOCOL_VERSION: Final = 1

MIN_PRIORITY: Final = -32768
MAX_PRIORITY: Final = 32767
#: Bits of the queue score that hold the submission sequence number. The rest hold
#: the inverted priority; together they stay below 2**53, so a double is exact.
SEQ_BITS: Final = 36
MAX_SEQ: Final = (1 << SEQ_BITS) - 1


class JobStatus(StrEnum):
    """Where a job is in its lifecycle (see TRANSITIONS)."""

    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRYING = "retrying"


TERMINAL_STATUSES: Final = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

#: The job state machine. The Lua scripts are its only writers; this table is what
#: they implement and what the tests check them against.
TRANSITIONS: Final[Mapping[JobStatus | None, frozenset[JobStatus]]] = {
    None: frozenset({JobStatus.QUEUED, JobStatus.ASSIGNED}),  # submit
    JobStatus.QUEUED: frozenset({JobStatus.ASSIGNED, JobStatus.CANCELLED}),
    JobStatus.ASSIGNED: frozenset(
        {
            JobStatus.RUNNING,  # first progress
            JobStatus.COMPLETED,
            JobStatus.FAILED,
            JobStatus.RETRYING,
            JobStatus.CANCELLED,
            JobStatus.QUEUED,  # worker lost: requeued at its old position
            JobStatus.ASSIGNED,  # worker lost, requeued straight onto an idle worker
        }
    ),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.COMPLETED,
            JobStatus.FAILED,
            JobStatus.RETRYING,
            JobStatus.CANCELLED,
            JobStatus.QUEUED,
            JobStatus.ASSIGNED,
        }
    ),
    JobStatus.RETRYING: frozenset({JobStatus.QUEUED, JobStatus.ASSIGNED, JobStatus.CANCELLED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def can_transition(old: JobStatus | None, new: JobStatus) -> bool:
    """Return True when the state machine allows ``old -> new``."""
    return new in TRANSITIONS[old]


class WorkerStatus(StrEnum):
    IDLE = "idle"
    BUSY = "busy"
    OFFLINE = "offline"


class Role(StrEnum):
    CLIENT = "client"
    WORKER = "worker"
    MONITOR = "monitor"


class MessageType(StrEnum):
    """Every protocol v1 message type, both directions."""

    # handshake and generic replies
    WELCOME = "welcome"
    ERROR = "error"
    ACK = "ack"
    # client -> hub
    SUBMIT_JOB = "submit_job"
    GET_JOB_STATUS = "get_job_status"
    SUBSCRIBE_JOB = "subscribe_job"
    CANCEL_JOB = "cancel_job"
    GET_STATS = "get_stats"
    GET_EVENTS = "get_events"
    # hub -> client
    JOB_ACCEPTED = "job_accepted"
    JOB_STATUS = "job_status"
    SUBSCRIBED = "subscribed"
    JOB_UPDATE = "job_update"
    JOB_COMPLETED = "job_completed"
    JOB_FAILED = "job_failed"
    EVENTS = "events"
    STATS = "stats"
    # worker -> hub
    REGISTER_WORKER = "register_worker"
    WORKER_REGISTERED = "worker_registered"
    WORKER_HEARTBEAT = "worker_heartbeat"
    UPDATE_JOB_PROGRESS = "update_job_progress"
    COMPLETE_JOB = "complete_job"
    FAIL_JOB = "fail_job"
    # hub -> worker
    JOB_ASSIGNED = "job_assigned"
    # monitor
    SUBSCRIBE_STATS = "subscribe_stats"
    SUBSCRIBE_EVENTS = "subscribe_events"
    EVENT = "event"


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` message and of every typed exception."""

    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_FIELD = "invalid_field"
    NOT_ALLOWED = "not_allowed"  # message type not allowed for this role / state
    NOT_FOUND = "not_found"
    DUPLICATE = "duplicate"
    STALE_ATTEMPT = "stale_attempt"
    JOB_CANCELLED = "job_cancelled"
    BAD_STATE = "bad_state"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A refused request. Carries the code, a readable message and the request id."""

    def __init__(self, code: ErrorCode, message: str, ref: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref

    def to_message(self) -> dict[str, Any]:
        """The ``error`` frame for this error."""
        return error_message(self.code, self.message, self.ref)


def error_message(code: ErrorCode, message: str, ref: Any = None) -> dict[str, Any]:
    return {"type": MessageType.ERROR.value, "code": code.value, "message": message, "ref": ref}


# --------------------------------------------------------------------------- ids


_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]"
_JOB_ID_RE: Final = re.compile(rf"^{_NAME}{{0,127}}$")
_TYPE_RE: Final = re.compile(rf"^{_NAME}{{0,63}}$")
_CLIENT_RE: Final = re.compile(rf"^{_NAME}{{0,63}}$")
_WORKER_RE: Final = re.compile(rf"^({_NAME}{{0,63}}):([A-Za-z0-9_.\-]{{1,32}})$")


def _invalid(name: str, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_FIELD, f"{name}: {why}")


def _check_name(value: Any, name: str, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str):
        raise _invalid(name, f"expected a string, got {type(value).__name__}")
    if not pattern.match(value):
        raise _invalid(name, f"{value[:80]!r} is not valid ({rule})")
    return value


def validate_job_id(value: Any, name: str = "job_id") -> str:
    """Return ``value`` if it is a valid job id, else raise ProtocolError."""
    return _check_name(value, name, _JOB_ID_RE, "1-128 of A-Z a-z 0-9 _ . -, starting alphanumeric")


def validate_job_type(value: Any, name: str = "job_type") -> str:
    return _check_name(value, name, _TYPE_RE, "1-64 of A-Z a-z 0-9 _ . -, starting alphanumeric")


def validate_client_id(value: Any, name: str = "client_id") -> str:
    return _check_name(value, name, _CLIENT_RE, "1-64 of A-Z a-z 0-9 _ . -, starting alphanumeric")


def validate_worker_id(value: Any, name: str = "worker_id") -> str:
    return _check_name(value, name, _WORKER_RE, "'<machine_id>:<gpu_id>', e.g. 'machine1:gpu0'")


def parse_worker_id(worker_id: str) -> tuple[str, str]:
    """Split ``machine1:gpu0`` into ``("machine1", "gpu0")`` (validating it)."""
    m = _WORKER_RE.match(validate_worker_id(worker_id))
    assert m is not None
    return m.group(1), m.group(2)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_priority(value: Any, name: str = "priority") -> int:
    if not _is_int(value):
        raise _invalid(name, f"expected an integer, got {type(value).__name__}")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise _invalid(name, f"{value} is outside {MIN_PRIORITY}..{MAX_PRIORITY}")
    return int(value)


def validate_max_attempts(value: Any, name: str = "max_attempts") -> int:
    if not _is_int(value) or not 1 <= value <= 100:
        raise _invalid(name, "expected an integer from 1 to 100")
    return int(value)


def validate_params(value: Any, max_bytes: int, name: str = "params") -> str:
    """Return ``value`` (a JSON object) encoded as compact JSON, enforcing ``max_bytes``."""
    if not isinstance(value, dict):
        raise _invalid(name, f"expected an object, got {type(value).__name__}")
    encoded = _dumps(value, name)
    check_size(encoded, max_bytes, name)
    return encoded


def check_size(encoded: str, max_bytes: int, name: str) -> None:
    """Raise ``too_large`` when ``encoded`` is over ``max_bytes`` bytes of UTF-8."""
    size = len(encoded.encode())
    if size > max_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"{name}: {size} bytes is over the limit of {max_bytes}"
        )


def dumps(value: Any, name: str) -> str:
    """Compact UTF-8 JSON of ``value``; ``invalid_field`` (naming ``name``) if it is not JSON."""
    return _dumps(value, name)


def _dumps(value: Any, name: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _invalid(name, f"not JSON-serialisable ({exc})") from None
    except RecursionError:
        raise _invalid(name, "nested too deeply") from None


# ------------------------------------------------------------------ queue score


def queue_score(priority: int, seq: int) -> int:
    """The ZSET score of a queued job: higher priority first, then FIFO by ``seq``.

    Exact as a double: the result is below 2**52. The Lua scripts compute the same.
    """
    validate_priority(priority)
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq {seq} outside 0..{MAX_SEQ}")
    return ((MAX_PRIORITY - priority) << SEQ_BITS) + seq


def decode_score(score: float) -> tuple[int, int]:
    """Inverse of :func:`queue_score`: ``(priority, seq)``."""
    s = int(score)
    return MAX_PRIORITY - (s >> SEQ_BITS), s & MAX_SEQ


# ------------------------------------------------------------------- the models


def _opt_float(v: str | None) -> float | None:
    return float(v) if v not in (None, "") else None


def _opt_str(v: str | None) -> str | None:
    return v if v not in (None, "") else None


def _json_or_none(v: str | None) -> Any:
    return json.loads(v) if v not in (None, "") else None


@dataclass
class JobModel:
    """A job as stored in its Redis hash (times are Unix seconds, server clock)."""

    job_id: str
    job_type: str
    priority: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    client_id: str | None = None
    status: JobStatus = JobStatus.QUEUED
    worker_id: str | None = None
    attempt: int = 0
    max_attempts: int = 3
    lost: int = 0
    failures: int = 0
    progress: float | None = None
    message: str | None = None
    result: Any = None
    error: str | None = None
    position: int | None = None
    created: float | None = None
    queued: float | None = None
    assigned: float | None = None
    started: float | None = None
    finished: float | None = None

    @classmethod
    def from_redis(cls, job_id: str, h: Mapping[str, str], position: int | None = None) -> JobModel:
        """Build job ``job_id`` from its hash (decoded strings); ``position`` comes
        from ZRANK. The hash leaves out what it can derive: the id (its key holds
        it), zero counters, an empty client or worker, and ``queued`` while it
        equals ``created``."""
        created = _opt_float(h.get("created"))
        queued = _opt_float(h.get("queued"))
        return cls(
            job_id=job_id,
            job_type=h["type"],
            priority=int(h.get("priority", 0)),
            params=_json_or_none(h.get("params")) or {},
            client_id=_opt_str(h.get("client")),
            status=JobStatus(h["status"]),
            worker_id=_opt_str(h.get("worker")),
            attempt=int(h.get("attempt") or 0),
            max_attempts=int(h.get("max_attempts") or 1),
            lost=int(h.get("lost") or 0),
            failures=int(h.get("failures") or 0),
            progress=_opt_float(h.get("progress")),
            message=_opt_str(h.get("message")),
            result=_json_or_none(h.get("result")),
            error=_opt_str(h.get("error")),
            position=position,
            created=created,
            queued=created if queued is None else queued,
            assigned=_opt_float(h.get("assigned")),
            started=_opt_float(h.get("started")),
            finished=_opt_float(h.get("finished")),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d


@dataclass
class WorkerModel:
    """A GPU worker as stored in its Redis hash."""

    worker_id: str
    machine_id: str
    status: WorkerStatus
    job_types: list[str]
    capabilities: dict[str, Any] = field(default_factory=dict)
    current_job: str | None = None
    hub_id: str | None = None
    registered: float | None = None
    last_seen: float | None = None
    jobs_done: int = 0
    jobs_failed: int = 0
    busy_s: float = 0.0

    @classmethod
    def from_redis(cls, h: Mapping[str, str]) -> WorkerModel:
        return cls(
            worker_id=h["id"],
            machine_id=h.get("machine", ""),
            status=WorkerStatus(h.get("status", "offline")),
            job_types=[t for t in h.get("types", "").split(",") if t],
            capabilities=_json_or_none(h.get("caps")) or {},
            current_job=_opt_str(h.get("job")),
            hub_id=_opt_str(h.get("hub")),
            registered=_opt_float(h.get("registered")),
            last_seen=_opt_float(h.get("seen")),
            jobs_done=int(h.get("done") or 0),
            jobs_failed=int(h.get("failed") or 0),
            busy_s=float(h.get("busy_s") or 0.0),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d


# ------------------------------------------------------------- message decoding


@dataclass(frozen=True)
class Message:
    """A validated inbound request: its type, optional ``id`` and typed fields."""

    type: MessageType
    id: Any
    fields: dict[str, Any]


_NO_DEFAULT: Final = object()


@dataclass(frozen=True)
class _Field:
    name: str
    check: Any  # Callable[[Any], Any]; typed loosely to keep the table readable
    default: Any = _NO_DEFAULT


def _any_json(value: Any, name: str) -> Any:
    return value


def _string(limit: int) -> Any:
    def check(value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise _invalid(name, f"expected a string, got {type(value).__name__}")
        if len(value) > limit:
            raise _invalid(name, f"longer than {limit} characters")
        return value

    return check


def _progress(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(name, "expected a number from 0 to 100")
    if not 0 <= value <= 100:
        raise _invalid(name, f"{value} is outside 0..100")
    return float(value)


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise _invalid(name, f"expected true or false, got {type(value).__name__}")
    return value


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(name, f"expected an object, got {type(value).__name__}")
    return value


def _job_types(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > 64:
        raise _invalid(name, "expected a list of 1 to 64 job types")
    out = [validate_job_type(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return sorted(set(out))


def _attempt(value: Any, name: str) -> int:
    if not _is_int(value) or value < 1:
        raise _invalid(name, "expected a positive integer")
    return int(value)


def _interval_ms(value: Any, name: str) -> int:
    if not _is_int(value) or not 50 <= value <= 60_000:
        raise _invalid(name, "expected an integer from 50 to 60000")
    return int(value)


def _event_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not re.match(r"^(0|[0-9]{1,20}(-[0-9]{1,20})?)$", value):
        raise _invalid(name, "expected a stream id such as '1732752000000-0' or '0'")
    return value


def _limit(value: Any, name: str) -> int:
    if not _is_int(value) or not 1 <= value <= 10_000:
        raise _invalid(name, "expected an integer from 1 to 10000")
    return int(value)


_ERR_LEN: Final = 8192
_MSG_LEN: Final = 1024

#: Inbound messages: fields, in the order they are checked, per type. The ``params``
#: size limit is applied by the hub, which knows its configuration.
SCHEMAS: Final[dict[MessageType, tuple[_Field, ...]]] = {
    MessageType.SUBMIT_JOB: (
        _Field("job_type", validate_job_type),
        _Field("priority", validate_priority, 0),
        _Field("params", _object, {}),
        _Field("job_id", validate_job_id, None),
        _Field("max_attempts", validate_max_attempts, None),
    ),
    MessageType.GET_JOB_STATUS: (_Field("job_id", validate_job_id),),
    MessageType.SUBSCRIBE_JOB: (_Field("job_id", validate_job_id),),
    MessageType.CANCEL_JOB: (_Field("job_id", validate_job_id),),
    MessageType.GET_STATS: (),
    MessageType.GET_EVENTS: (
        _Field("since", _event_id, "0"),
        _Field("limit", _limit, 1000),
    ),
    MessageType.REGISTER_WORKER: (
        _Field("job_types", _job_types),
        _Field("capabilities", _object, {}),
    ),
    MessageType.WORKER_HEARTBEAT: (),
    MessageType.UPDATE_JOB_PROGRESS: (
        _Field("job_id", validate_job_id),
        _Field("attempt", _attempt),
        _Field("progress", _progress),
        _Field("message", _string(_MSG_LEN), None),
    ),
    MessageType.COMPLETE_JOB: (
        _Field("job_id", validate_job_id),
        _Field("attempt", _attempt),
        _Field("result", _any_json, None),
    ),
    MessageType.FAIL_JOB: (
        _Field("job_id", validate_job_id),
        _Field("attempt", _attempt),
        _Field("error", _string(_ERR_LEN)),
        _Field("retryable", _boolean, True),
    ),
    MessageType.SUBSCRIBE_STATS: (_Field("interval_ms", _interval_ms, 1000),),
    MessageType.SUBSCRIBE_EVENTS: (),
}

#: Which inbound types each role may send.
ROLE_MESSAGES: Final[dict[Role, frozenset[MessageType]]] = {
    Role.CLIENT: frozenset(
        {
            MessageType.SUBMIT_JOB,
            MessageType.GET_JOB_STATUS,
            MessageType.SUBSCRIBE_JOB,
            MessageType.CANCEL_JOB,
            MessageType.GET_STATS,
            MessageType.GET_EVENTS,
        }
    ),
    Role.WORKER: frozenset(
        {
            MessageType.REGISTER_WORKER,
            MessageType.WORKER_HEARTBEAT,
            MessageType.UPDATE_JOB_PROGRESS,
            MessageType.COMPLETE_JOB,
            MessageType.FAIL_JOB,
        }
    ),
    Role.MONITOR: frozenset(
        {
            MessageType.GET_STATS,
            MessageType.SUBSCRIBE_STATS,
            MessageType.SUBSCRIBE_EVENTS,
            MessageType.GET_JOB_STATUS,
            MessageType.GET_EVENTS,
        }
    ),
}


_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _is_text(data: Any) -> bool:
    """True when every string in ``data`` is valid Unicode (no unpaired surrogate)."""
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def decode_message(raw: str | bytes, role: Role) -> Message:
    """Parse and validate one inbound frame for ``role``.

    Raises :class:`ProtocolError` with the request's ``id`` as ``ref`` whenever it
    could be read, so the caller can always answer with ``err.to_message()``.
    """
    try:
        # bytes: strict UTF-8 (json.loads alone would let encoded surrogates through)
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"frame is not valid JSON ({exc})") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_JSON, "frame is nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text) and not _is_text(data):
        # a lone "\ud800" escape: such a string cannot be stored, nor even echoed back
        raise ProtocolError(ErrorCode.BAD_JSON, "frame holds an unpaired surrogate escape")
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message must be a JSON object")
    ref = data.get("id")
    if ref is not None and not (
        (isinstance(ref, str) and len(ref) <= 128) or (_is_int(ref) and abs(ref) < 2**53)
    ):
        raise ProtocolError(ErrorCode.INVALID_FIELD, "id: expected a string (<= 128) or an integer")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "missing string field 'type'", ref)
    try:
        mtype = MessageType(kind)
    except ValueError:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:64]!r}", ref
        ) from None
    if mtype not in ROLE_MESSAGES[role]:
        raise ProtocolError(ErrorCode.NOT_ALLOWED, f"a {role} may not send {kind!r}", ref)
    fields: dict[str, Any] = {}
    for f in SCHEMAS[mtype]:
        if f.name in data and data[f.name] is not None:
            try:
                fields[f.name] = f.check(data[f.name], f.name)
            except ProtocolError as err:
                err.ref = ref
                raise
        elif f.default is _NO_DEFAULT:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"{f.name}: required", ref)
        else:
            fields[f.name] = f.default
    return Message(mtype, ref, fields)


def _encode_std(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def _encode_orjson(message: Mapping[str, Any]) -> str:
    try:
        return str(_orjson.dumps(message).decode())
    except TypeError:  # e.g. an integer over 64 bits: let the standard encoder decide
        return _encode_std(message)


try:  # the `fast` extra: the same JSON, encoded several times faster
    import orjson as _orjson

    encode = _encode_orjson
except ImportError:  # pragma: no cover - depends on the environment
    encode = _encode_std
encode.__doc__ = "Encode an outbound message as a compact JSON text frame."
