"""Protocol v1, in one place: what travels over a hub's sockets.

Pure: nothing here touches a socket or Redis. It holds the message types, the
engine's event names, the close and error codes, the field rules and the decoder
of inbound frames, and a builder for every message either side sends. The hub, the
lab's ``QueueClient`` and ``MockWorker``, the tests and the benchmarks all speak
through it, so a message is spelled once.

Two kinds of builders: *requests* (what clients, workers and monitors send; each
takes an optional ``id`` that the reply echoes as ``ref``) and *replies and
pushes* (what the hub sends). Every builder returns a plain dict; :func:`encode`
turns one into a text frame.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, Final

__all__ = [
    "CAPABILITIES_MAX_BYTES",
    "ERROR_MAX_CHARS",
    "FINAL_EVENTS",
    "FINAL_MESSAGES",
    "MAX_ATTEMPT",
    "MAX_DELAY_S",
    "MAX_PREFETCH",
    "MAX_PRIORITY",
    "MESSAGE_MAX_CHARS",
    "MIN_PRIORITY",
    "PROTOCOL_VERSION",
    "ROLE_MESSAGES",
    "SCHEMAS",
    "UPDATE_EVENTS",
    "CloseCode",
    "ErrorCode",
    "EventName",
    "Message",
    "MessageType",
    "ProtocolError",
    "Role",
    "check_size",
    "decode_message",
    "dumps",
    "encode",
    "encode_bytes",
    "loads",
    "loads_stored",
    "parse_worker_id",
    "validate_attempt",
    "validate_capabilities",
    "validate_client_id",
    "validate_delay",
    "validate_error_text",
    "validate_job_id",
    "validate_job_type",
    "validate_job_types",
    "validate_limit",
    "validate_max_attempts",
    "validate_params",
    "validate_prefetch",
    "validate_priority",
    "validate_progress",
    "validate_run_at",
    "validate_worker_id",
]

PROTOCOL_VERSION: Final = 1

MIN_PRIORITY: Final = -32768
MAX_PRIORITY: Final = 32767
#: longest ``error`` text of ``fail_job`` (characters)
ERROR_MAX_CHARS: Final = 8192
#: longest ``message`` of ``update_job_progress`` (characters)
MESSAGE_MAX_CHARS: Final = 1024
#: largest ``capabilities`` object of ``register_worker`` (bytes of JSON)
CAPABILITIES_MAX_BYTES: Final = 64 * 1024


class Role(StrEnum):
    """Who is on the other end of a socket (the second part of its path)."""

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
    CANCEL_JOB = "cancel_job"  # also hub -> worker: stop the job you hold
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


#: the messages that end a client's view of a job
FINAL_MESSAGES: Final = frozenset({MessageType.JOB_COMPLETED, MessageType.JOB_FAILED})


class EventName(StrEnum):
    """The ``e`` field of an entry of the engine's event stream (``event`` frames)."""

    SUBMITTED = "submitted"
    ASSIGNED = "assigned"
    PROGRESS = "progress"
    COMPLETED = "completed"
    FAILED = "failed"
    RETRYING = "retrying"
    REQUEUED = "requeued"
    PROMOTED = "promoted"
    CANCELLED = "cancelled"
    WORKER_UP = "worker_up"
    WORKER_DOWN = "worker_down"


#: events after which a job changes no more
FINAL_EVENTS: Final = frozenset({EventName.COMPLETED, EventName.FAILED, EventName.CANCELLED})
#: events a job's followers see as ``job_update``
UPDATE_EVENTS: Final = frozenset(
    {
        EventName.ASSIGNED,
        EventName.PROGRESS,
        EventName.RETRYING,
        EventName.REQUEUED,
        EventName.PROMOTED,
        EventName.CANCELLED,
    }
)


class CloseCode(IntEnum):
    """WebSocket close codes the hub uses."""

    GOING_AWAY = 1001  # the hub is stopping
    SLOW_READER = 1008  # policy: the send queue filled (reader too slow)
    TOO_BIG = 1009  # an inbound frame over max_frame_bytes
    UNAVAILABLE = 1011  # a worker's report or registration met a Redis outage
    REPLACED = 4000  # a newer socket registered the same worker id
    SESSION_EXPIRED = 4001  # the worker's record was reaped; it must reconnect


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
        return error(self.code, self.message, self.ref)


# ------------------------------------------------------------- field rules


# Every rule is applied with ``fullmatch``: ``$`` would also match before a
# trailing newline, letting "job-1\n" pass as a second, different id.
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]"
_JOB_ID_RE: Final = re.compile(rf"{_NAME}{{0,127}}")
_TYPE_RE: Final = re.compile(rf"{_NAME}{{0,63}}")
_CLIENT_RE: Final = re.compile(rf"{_NAME}{{0,63}}")
_WORKER_RE: Final = re.compile(rf"({_NAME}{{0,63}}):([A-Za-z0-9_.\-]{{1,32}})")
_EVENT_ID_RE: Final = re.compile(r"0|([0-9]{1,20})(?:-([0-9]{1,20}))?")
#: the largest part of a Redis stream id (an unsigned 64-bit integer)
_EVENT_ID_PART_MAX: Final = 2**64 - 1
#: the largest ``attempt`` a report may name (the largest integer JSON peers agree on)
MAX_ATTEMPT: Final = 2**53 - 1
#: the largest prefetch window a worker socket may ask for (jobs held ahead)
MAX_PREFETCH: Final = 1


def _invalid(name: str, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_FIELD, f"{name}: {why}")


def _check_name(value: Any, name: str, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str):
        raise _invalid(name, f"expected a string, got {type(value).__name__}")
    if not pattern.fullmatch(value):
        raise _invalid(name, f"{value[:80]!r} is not valid ({rule})")
    return value


def validate_job_id(value: Any, name: str = "job_id") -> str:
    """Return ``value`` if it is a valid job id, else raise ProtocolError."""
    return _check_name(value, name, _JOB_ID_RE, "1-128 of A-Z a-z 0-9 _ . -, starting alphanumeric")


def validate_job_type(value: Any, name: str = "job_type") -> str:
    """Return ``value`` if it is a valid job type, else raise ProtocolError."""
    return _check_name(value, name, _TYPE_RE, "1-64 of A-Z a-z 0-9 _ . -, starting alphanumeric")


def validate_client_id(value: Any, name: str = "client_id") -> str:
    """Return ``value`` if it is a valid client (or monitor) id, else raise ProtocolError."""
    return _check_name(value, name, _CLIENT_RE, "1-64 of A-Z a-z 0-9 _ . -, starting alphanumeric")


def validate_worker_id(value: Any, name: str = "worker_id") -> str:
    """Return ``value`` if it is ``<machine_id>:<gpu_id>``, else raise ProtocolError."""
    return _check_name(value, name, _WORKER_RE, "'<machine_id>:<gpu_id>', e.g. 'machine1:gpu0'")


def parse_worker_id(worker_id: str) -> tuple[str, str]:
    """Split ``machine1:gpu0`` into ``("machine1", "gpu0")`` (validating it)."""
    m = _WORKER_RE.fullmatch(validate_worker_id(worker_id))
    assert m is not None
    return m.group(1), m.group(2)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_priority(value: Any, name: str = "priority") -> int:
    """An integer from :data:`MIN_PRIORITY` to :data:`MAX_PRIORITY` (higher runs first)."""
    if not _is_int(value):
        raise _invalid(name, f"expected an integer, got {type(value).__name__}")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise _invalid(name, f"{value} is outside {MIN_PRIORITY}..{MAX_PRIORITY}")
    return int(value)


def validate_max_attempts(value: Any, name: str = "max_attempts") -> int:
    """An integer from 1 to 100: the failures a job may have."""
    if not _is_int(value) or not 1 <= value <= 100:
        raise _invalid(name, "expected an integer from 1 to 100")
    return int(value)


#: longest delay of a job (``delay_s``, or ``run_at`` ahead of the server's clock): a year
MAX_DELAY_S: Final = 366 * 86_400


def validate_delay(value: Any, name: str = "delay_s") -> float:
    """A finite number of seconds from 0 to :data:`MAX_DELAY_S`: how long a job waits,
    ``scheduled``, before it is queued (0: queued at once)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(name, f"expected a number of seconds from 0 to {MAX_DELAY_S}")
    if not 0 <= value <= MAX_DELAY_S:
        raise _invalid(name, f"{value} is outside 0..{MAX_DELAY_S}")
    return float(value)


def validate_run_at(value: Any, name: str = "run_at") -> float:
    """A finite, positive Unix time in seconds (by the Redis server's clock) when a job
    is due; a time already past queues it at once. The engine refuses one more than
    :data:`MAX_DELAY_S` ahead."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(name, "expected a Unix time in seconds")
    if value <= 0:
        raise _invalid(name, f"{value} is not a Unix time in seconds")
    return float(value)


def validate_attempt(value: Any, name: str = "attempt") -> int:
    """An integer from 1 to :data:`MAX_ATTEMPT`: the attempt a worker's report is about."""
    if not _is_int(value) or not 1 <= value <= MAX_ATTEMPT:
        raise _invalid(name, f"expected an integer from 1 to {MAX_ATTEMPT}")
    return int(value)


def validate_prefetch(value: Any, name: str = "prefetch") -> int:
    """0 or :data:`MAX_PREFETCH`: how many queued jobs a worker socket holds ahead
    while it runs one (its prefetch window; 0, the default, holds none)."""
    if not _is_int(value) or not 0 <= value <= MAX_PREFETCH:
        raise _invalid(name, f"expected an integer from 0 to {MAX_PREFETCH}")
    return int(value)


_SESSION = re.compile(r"[0-9a-f]{16}")


def validate_session(value: Any, name: str = "closed_session") -> str:
    """A worker socket's session, as ``worker_registered`` gave it: 16 hex digits."""
    if not isinstance(value, str) or not _SESSION.fullmatch(value):
        raise _invalid(name, "expected the 16 hex digits worker_registered gave as session")
    return value


def validate_progress(value: Any, name: str = "progress") -> float:
    """A finite number from 0 to 100 (percent done)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(name, "expected a number from 0 to 100")
    if not 0 <= value <= 100:
        raise _invalid(name, f"{value} is outside 0..100")
    return float(value)


def validate_limit(value: Any, name: str = "limit", most: int = 10_000) -> int:
    """An integer from 1 to ``most``."""
    if not _is_int(value) or not 1 <= value <= most:
        raise _invalid(name, f"expected an integer from 1 to {most}")
    return int(value)


def validate_error_text(value: Any, name: str = "error") -> str:
    """A string of at most :data:`ERROR_MAX_CHARS` characters."""
    return _string(ERROR_MAX_CHARS)(value, name)


def validate_job_types(value: Any, name: str = "job_types") -> list[str]:
    """A list of 1 to 64 job types; returned sorted without repeats."""
    if not isinstance(value, list | tuple | set | frozenset) or not value or len(value) > 64:
        raise _invalid(name, "expected a list of 1 to 64 job types")
    out = [validate_job_type(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return sorted(set(out))


def validate_params(value: Any, max_bytes: int, name: str = "params") -> str:
    """Return ``value`` (a JSON object) encoded as compact JSON, enforcing ``max_bytes``."""
    if not isinstance(value, dict):
        raise _invalid(name, f"expected an object, got {type(value).__name__}")
    encoded = dumps(value, name)
    check_size(encoded, max_bytes, name)
    return encoded


def validate_capabilities(value: Any, name: str = "capabilities") -> str:
    """A worker's capabilities (a JSON object) as compact JSON, at most
    :data:`CAPABILITIES_MAX_BYTES`."""
    return validate_params(value, CAPABILITIES_MAX_BYTES, name)


def check_size(encoded: str, max_bytes: int, name: str) -> None:
    """Raise ``too_large`` when ``encoded`` is over ``max_bytes`` bytes of UTF-8."""
    size = len(encoded) if encoded.isascii() else len(encoded.encode())
    if size > max_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"{name}: {size} bytes is over the limit of {max_bytes}"
        )


#: what ``json.dumps`` with these arguments builds on every call, built once (about
#: 1 us of a 2 us encode of a small object)
_STRICT_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_COMPACT_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _strict_encoder() -> Callable[[Any], str]:
    """``_STRICT_JSON.encode`` without what it builds on every call: the C encoder
    itself, made once (a small object's encode takes a quarter of the time). It
    keeps no record of the containers it is in, so a value that holds itself
    recurses until Python's limit (a RecursionError) instead of being named."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - a Python without the json accelerator
        return _STRICT_JSON.encode
    text = json.encoder.encode_basestring
    chunks = make(None, _not_json, text, None, ":", ",", False, False, False)

    def encode(value: Any) -> str:
        if isinstance(value, str):
            return str(text(value))
        return "".join(chunks(value, 0))

    return encode


_strict_encode: Final = _strict_encoder()


def dumps(value: Any, name: str) -> str:
    """Compact UTF-8 JSON of ``value``; ``invalid_field`` (naming ``name``) if it is not JSON."""
    try:
        return _strict_encode(value)
    except (TypeError, ValueError) as exc:
        raise _invalid(name, f"not JSON-serialisable ({exc})") from None
    except RecursionError:
        raise _invalid(name, "nested too deeply") from None


def _any_json(value: Any, name: str) -> Any:
    return value


def _string(limit: int) -> Callable[[Any, str], str]:
    def check(value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise _invalid(name, f"expected a string, got {type(value).__name__}")
        if len(value) > limit:
            raise _invalid(name, f"longer than {limit} characters")
        return value

    return check


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise _invalid(name, f"expected true or false, got {type(value).__name__}")
    return value


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(name, f"expected an object, got {type(value).__name__}")
    return value


def _job_types(value: Any, name: str) -> list[str]:
    if not isinstance(value, list):
        raise _invalid(name, "expected a list of 1 to 64 job types")
    return validate_job_types(value, name)


def _interval_ms(value: Any, name: str) -> int:
    if not _is_int(value) or not 50 <= value <= 60_000:
        raise _invalid(name, "expected an integer from 50 to 60000")
    return int(value)


def _event_id(value: Any, name: str) -> str:
    """A Redis stream id: ``0``, ``<ms>`` or ``<ms>-<seq>``, each part at most 2^64 - 1."""
    m = _EVENT_ID_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None or any(int(p) > _EVENT_ID_PART_MAX for p in m.groups() if p is not None):
        raise _invalid(name, "expected a stream id such as '1732752000000-0' or '0'")
    return m.string


# ------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class Message:
    """A validated inbound request: its type, optional ``id`` and typed fields."""

    type: MessageType
    id: Any
    fields: dict[str, Any]


_NO_DEFAULT: Final = object()
#: the default of an optional field left out of ``Message.fields`` when absent
_ABSENT: Final = object()


@dataclass(frozen=True)
class _Field:
    name: str
    check: Callable[[Any, str], Any]
    default: Any = _NO_DEFAULT


#: Inbound messages: fields, in the order they are checked, per type. The ``params``
#: size limit is applied by the engine, which knows its configuration.
SCHEMAS: Final[dict[MessageType, tuple[_Field, ...]]] = {
    MessageType.SUBMIT_JOB: (
        _Field("job_type", validate_job_type),
        _Field("priority", validate_priority, 0),
        _Field("params", _object, {}),
        _Field("job_id", validate_job_id, None),
        _Field("max_attempts", validate_max_attempts, None),
        # optional, absent from the fields when not sent; at most one of the two
        _Field("delay_s", validate_delay, _ABSENT),
        _Field("run_at", validate_run_at, _ABSENT),
    ),
    MessageType.GET_JOB_STATUS: (_Field("job_id", validate_job_id),),
    MessageType.SUBSCRIBE_JOB: (_Field("job_id", validate_job_id),),
    MessageType.CANCEL_JOB: (_Field("job_id", validate_job_id),),
    MessageType.GET_STATS: (),
    MessageType.GET_EVENTS: (
        _Field("since", _event_id, "0"),
        _Field("limit", validate_limit, 1000),
    ),
    MessageType.REGISTER_WORKER: (
        _Field("job_types", _job_types),
        _Field("capabilities", _object, {}),
        _Field("prefetch", validate_prefetch, 0),
        _Field("closed_session", validate_session, None),
    ),
    MessageType.WORKER_HEARTBEAT: (),
    MessageType.UPDATE_JOB_PROGRESS: (
        _Field("job_id", validate_job_id),
        _Field("attempt", validate_attempt),
        _Field("progress", validate_progress),
        _Field("message", _string(MESSAGE_MAX_CHARS), None),
    ),
    MessageType.COMPLETE_JOB: (
        _Field("job_id", validate_job_id),
        _Field("attempt", validate_attempt),
        _Field("result", _any_json, None),
    ),
    MessageType.FAIL_JOB: (
        _Field("job_id", validate_job_id),
        _Field("attempt", validate_attempt),
        _Field("error", validate_error_text),
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


#: message types by their wire name (a dict lookup: a third of ``MessageType(name)``)
_MESSAGE_TYPES: Final = {t.value: t for t in MessageType}

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
        data = loads(text)
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
    mtype = _MESSAGE_TYPES.get(kind)
    if mtype is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:64]!r}", ref)
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
        elif f.default is not _ABSENT:
            fields[f.name] = f.default
    return Message(mtype, ref, fields)


# ------------------------------------------------------------------ encoding


def _encode_std(message: Mapping[str, Any]) -> str:
    return _COMPACT_JSON.encode(message)


def _encode_orjson(message: Mapping[str, Any]) -> str:
    try:
        return str(_orjson.dumps(message).decode())
    except TypeError:  # e.g. an integer over 64 bits: let the standard encoder decide
        return _encode_std(message)


def _encode_bytes_std(message: Mapping[str, Any]) -> bytes:
    return _encode_std(message).encode()


def _encode_bytes_orjson(message: Mapping[str, Any]) -> bytes:
    try:
        return bytes(_orjson.dumps(message))
    except TypeError:  # e.g. an integer over 64 bits: let the standard encoder decide
        return _encode_bytes_std(message)


def _loads_std(text: str | bytes) -> Any:
    return json.loads(text)


#: orjson reads an integer beyond 64 bits as a float this large or larger
_BIG: Final = 9.2e18
_NESTED: Final = frozenset({float, dict, list})


def _holds_big_float(value: Any) -> bool:
    kind = type(value)
    if kind is float:
        return not -_BIG < value < _BIG
    for v in value.values() if kind is dict else value:
        if type(v) in _NESTED and _holds_big_float(v):
            return True
    return False


def _loads_orjson(text: str | bytes) -> Any:
    try:
        value = _orjson.loads(text)
        if type(value) not in _NESTED or not _holds_big_float(value):
            return value
    except (_orjson.JSONDecodeError, RecursionError):
        pass  # the standard parser decides (it reads NaN, say) and words the error
    # a float this large may have been an integer: read it as one
    return json.loads(text)


try:  # the `fast` extra: the same JSON, encoded and parsed several times faster
    import orjson as _orjson

    encode = _encode_orjson
    encode_bytes = _encode_bytes_orjson
    loads = _loads_orjson
except ImportError:  # pragma: no cover - depends on the environment
    encode = _encode_std
    encode_bytes = _encode_bytes_std
    loads = _loads_std
encode.__doc__ = "Encode an outbound message as a compact JSON text frame."
encode_bytes.__doc__ = ":func:`encode` as UTF-8 bytes, what a socket sends (no str in between)."
loads.__doc__ = (
    "Parse JSON (text or UTF-8 bytes) into what ``json.loads`` gives (raises ValueError)."
)


def loads_stored(text: str | None) -> Any:
    """A JSON value as Redis stores it (params, a result, capabilities): parsed, or
    None when the field is missing or empty."""
    return loads(text) if text else None


# --------------------------------------------------- requests (peers -> hub)


def _request(kind: MessageType, id: Any, fields: Mapping[str, Any]) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": kind.value, **fields}
    if id is not None:
        msg["id"] = id
    return msg


def submit_job(
    job_type: str,
    priority: int = 0,
    params: Mapping[str, Any] | None = None,
    *,
    job_id: str | None = None,
    max_attempts: int | None = None,
    delay_s: float | None = None,
    run_at: float | None = None,
    id: Any = None,
) -> dict[str, Any]:
    """A client's ``submit_job``. Answered by ``job_accepted`` (or ``error``).

    ``delay_s`` (seconds from now) or ``run_at`` (Unix seconds, the server's clock),
    not both: the job is ``scheduled`` until then, then queued with its priority."""
    fields: dict[str, Any] = {"job_type": job_type, "priority": priority}
    fields["params"] = dict(params or {})
    if job_id is not None:
        fields["job_id"] = job_id
    if max_attempts is not None:
        fields["max_attempts"] = max_attempts
    if delay_s is not None:
        fields["delay_s"] = delay_s
    if run_at is not None:
        fields["run_at"] = run_at
    return _request(MessageType.SUBMIT_JOB, id, fields)


def get_job_status(job_id: str, *, id: Any = None) -> dict[str, Any]:
    """Answered by ``job_status`` (a client's own jobs only)."""
    return _request(MessageType.GET_JOB_STATUS, id, {"job_id": job_id})


def subscribe_job(job_id: str, *, id: Any = None) -> dict[str, Any]:
    """Answered by ``subscribed``; the job's updates follow."""
    return _request(MessageType.SUBSCRIBE_JOB, id, {"job_id": job_id})


def cancel_job(job_id: str, *, id: Any = None) -> dict[str, Any]:
    """A client's cancel. Answered by ``job_status``."""
    return _request(MessageType.CANCEL_JOB, id, {"job_id": job_id})


def get_stats(*, id: Any = None) -> dict[str, Any]:
    """Answered by ``stats``."""
    return _request(MessageType.GET_STATS, id, {})


def get_events(since: str = "0", limit: int = 1000, *, id: Any = None) -> dict[str, Any]:
    """Answered by ``events`` (a client sees its own jobs' events only)."""
    return _request(MessageType.GET_EVENTS, id, {"since": since, "limit": limit})


def register_worker(
    job_types: list[str],
    capabilities: Mapping[str, Any] | None = None,
    *,
    prefetch: int = 0,
    closed_session: str | None = None,
    id: Any = None,
) -> dict[str, Any]:
    """A worker socket's first request. Answered by ``worker_registered``; jobs follow.
    ``prefetch=1``: while it runs a job, the socket may be sent one more to hold ahead
    (it must run its jobs in the order they were sent). ``closed_session``: the
    session of this worker's previous socket when its hub closed it with 1011 (the
    queue unavailable): the job it held is requeued without counting a loss."""
    fields: dict[str, Any] = {
        "job_types": list(job_types),
        "capabilities": dict(capabilities or {}),
    }
    if prefetch:
        fields["prefetch"] = prefetch
    if closed_session is not None:
        fields["closed_session"] = closed_session
    return _request(MessageType.REGISTER_WORKER, id, fields)


def worker_heartbeat(*, id: Any = None) -> dict[str, Any]:
    """Extends the worker's lease; answered by ``ack`` when sent with an ``id``."""
    return _request(MessageType.WORKER_HEARTBEAT, id, {})


def update_job_progress(
    job_id: str, attempt: int, progress: float, message: str | None = None, *, id: Any = None
) -> dict[str, Any]:
    """Progress 0-100 of the job a worker holds; the first one marks it running."""
    fields: dict[str, Any] = {"job_id": job_id, "attempt": attempt, "progress": progress}
    if message is not None:
        fields["message"] = message
    return _request(MessageType.UPDATE_JOB_PROGRESS, id, fields)


def complete_job(
    job_id: str, attempt: int, result: Any = None, *, id: Any = None
) -> dict[str, Any]:
    """A worker's result. Answered by ``ack`` (with ``outcome``, ``has_next``) when
    sent with an ``id``; the worker's next job is pushed at once."""
    return _request(
        MessageType.COMPLETE_JOB, id, {"job_id": job_id, "attempt": attempt, "result": result}
    )


def fail_job(
    job_id: str, attempt: int, error: str, retryable: bool = True, *, id: Any = None
) -> dict[str, Any]:
    """A worker's failure report; like :func:`complete_job`."""
    fields = {"job_id": job_id, "attempt": attempt, "error": error, "retryable": retryable}
    return _request(MessageType.FAIL_JOB, id, fields)


def subscribe_stats(interval_ms: int = 1000, *, id: Any = None) -> dict[str, Any]:
    """A monitor's request for ``stats`` every ``interval_ms``."""
    return _request(MessageType.SUBSCRIBE_STATS, id, {"interval_ms": interval_ms})


def subscribe_events(*, id: Any = None) -> dict[str, Any]:
    """A monitor's request for an ``event`` frame per engine event."""
    return _request(MessageType.SUBSCRIBE_EVENTS, id, {})


# ------------------------------------------------ replies and pushes (hub ->)


def welcome(role: Role, ident: str, hub_id: str, max_frame_bytes: int) -> dict[str, Any]:
    """The first frame on every socket."""
    return {
        "type": MessageType.WELCOME.value,
        "protocol": PROTOCOL_VERSION,
        "role": role.value,
        "id": ident,
        "hub": hub_id,
        "max_frame_bytes": max_frame_bytes,
    }


def error(code: ErrorCode, message: str, ref: Any = None) -> dict[str, Any]:
    """A refused request."""
    return {"type": MessageType.ERROR.value, "code": code.value, "message": message, "ref": ref}


def ack(ref: Any, **fields: Any) -> dict[str, Any]:
    """A worker request's acknowledgement (``outcome`` and ``has_next`` after a report)."""
    return {"type": MessageType.ACK.value, "ref": ref, **fields}


def job_accepted(ref: Any, job_id: str, status: str, position: int | None) -> dict[str, Any]:
    """The reply to ``submit_job``: the job's id, status and place in its queue."""
    return {
        "type": MessageType.JOB_ACCEPTED.value,
        "ref": ref,
        "job_id": job_id,
        "status": status,
        "position": position,
    }


def job_status(ref: Any, job: Mapping[str, Any]) -> dict[str, Any]:
    """A job's stored fields (``JobModel.to_dict()``) less its params."""
    fields = {k: v for k, v in job.items() if k != "params"}
    return {"type": MessageType.JOB_STATUS.value, "ref": ref, **fields}


def subscribed_job(ref: Any, job_id: str, status: str) -> dict[str, Any]:
    """The reply to ``subscribe_job``."""
    return {"type": MessageType.SUBSCRIBED.value, "ref": ref, "job_id": job_id, "status": status}


def subscribed_events(ref: Any, last_id: str) -> dict[str, Any]:
    """The reply to ``subscribe_events``: events after ``last_id`` follow."""
    return {"type": MessageType.SUBSCRIBED.value, "ref": ref, "events": True, "last_id": last_id}


def events(ref: Any, frames: list[dict[str, Any]], last_id: str, more: bool) -> dict[str, Any]:
    """The reply to ``get_events``: ``event`` frames, oldest first."""
    return {
        "type": MessageType.EVENTS.value,
        "ref": ref,
        "events": frames,
        "last_id": last_id,
        "more": more,
    }


def stats(ref: Any, snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """Queue statistics (the reply to ``get_stats`` and each ``subscribe_stats`` tick)."""
    return {"type": MessageType.STATS.value, "ref": ref, **snapshot}


def worker_registered(
    ref: Any, worker_id: str, job_types: list[str], lease_s: float, has_next: bool, session: str
) -> dict[str, Any]:
    """The reply to ``register_worker``; ``has_next``: a ``job_assigned`` follows;
    ``session``: this socket's (for ``closed_session`` after a 1011 close)."""
    return {
        "type": MessageType.WORKER_REGISTERED.value,
        "ref": ref,
        "worker_id": worker_id,
        "job_types": job_types,
        "lease_s": lease_s,
        "has_next": has_next,
        "session": session,
    }


def job_assigned(
    job_id: str, attempt: int, job_type: str, priority: int, params: Mapping[str, Any]
) -> dict[str, Any]:
    """A job pushed to a worker; its reports must carry ``attempt``."""
    return {
        "type": MessageType.JOB_ASSIGNED.value,
        "job_id": job_id,
        "attempt": attempt,
        "job_type": job_type,
        "priority": priority,
        "params": params,
    }


def cancel_running(job_id: str, attempt: int) -> dict[str, Any]:
    """Tells a worker to stop the job it holds (its client cancelled it)."""
    return {"type": MessageType.CANCEL_JOB.value, "job_id": job_id, "attempt": attempt}


def event(event_id: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """One engine event, as monitors (and ``get_events``) see it."""
    return {"type": MessageType.EVENT.value, "event_id": event_id, **fields}


def job_completed(job_id: str, result: Any, attempt: int, worker_id: str | None) -> dict[str, Any]:
    """A job's followers learn its result (final)."""
    return {
        "type": MessageType.JOB_COMPLETED.value,
        "job_id": job_id,
        "result": result,
        "attempt": attempt,
        "worker_id": worker_id,
    }


def job_failed(job_id: str, error: str | None, attempt: int) -> dict[str, Any]:
    """A job's followers learn that it failed for good (final)."""
    return {
        "type": MessageType.JOB_FAILED.value,
        "job_id": job_id,
        "error": error,
        "attempt": attempt,
    }


def job_update(job_id: str, event_name: str, f: Mapping[str, str]) -> dict[str, Any]:
    """A job's followers learn of a step (``event``) that is not its end; ``f`` are
    the event's fields (``status``, and ``worker``, ``message``, ``progress``,
    ``attempt`` when present)."""
    m: dict[str, Any] = {
        "type": MessageType.JOB_UPDATE.value,
        "job_id": job_id,
        "status": f.get("status"),
        "event": event_name,
    }
    for src, dst in (("worker", "worker_id"), ("message", "message")):
        if f.get(src):
            m[dst] = f[src]
    if "progress" in f:
        m["progress"] = float(f["progress"])
    if "attempt" in f:
        m["attempt"] = int(f["attempt"])
    return m


def client_frame(
    name: str, job: str, f: Mapping[str, str], result: Any = None, error: str | None = None
) -> dict[str, Any] | None:
    """The frame a follower of ``job`` gets for engine event ``name`` with fields ``f``
    (None: clients do not see that event). ``result`` and ``error`` are the job's,
    for ``completed`` and ``failed``."""
    attempt = int(f.get("attempt", 0))
    if name == EventName.COMPLETED:
        return job_completed(job, result, attempt, f.get("worker") or None)
    if name == EventName.FAILED:
        return job_failed(job, error, attempt)
    if name not in UPDATE_EVENTS:
        return None
    return job_update(job, name, f)
