"""The pure parts: score encoding, the state machine, validation. No Redis, no sockets."""

from __future__ import annotations

import contextlib
import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from redisq_server.keys import Keys, lua_prelude, validate_namespace
from redisq_server.models import (
    AGED_TIE_BITS,
    AGED_TIME_BITS,
    AGING_EPOCH_MS,
    MAX_AGING_MS,
    MAX_SEQ,
    TERMINAL_STATUSES,
    TRANSITIONS,
    JobStatus,
    aged_score,
    can_transition,
    decode_score,
    entered_ms,
    queue_score,
)
from redisq_server.protocol import (
    MAX_ATTEMPT,
    MAX_PRIORITY,
    MIN_PRIORITY,
    ErrorCode,
    MessageType,
    ProtocolError,
    Role,
    decode_message,
    parse_worker_id,
    validate_attempt,
    validate_client_id,
    validate_job_id,
    validate_job_type,
    validate_params,
    validate_priority,
    validate_worker_id,
)


@given(
    st.integers(MIN_PRIORITY, MAX_PRIORITY),
    st.integers(0, MAX_SEQ),
    st.integers(MIN_PRIORITY, MAX_PRIORITY),
    st.integers(0, MAX_SEQ),
)
def test_score_orders_by_priority_then_fifo(p1: int, s1: int, p2: int, s2: int) -> None:
    a, b = queue_score(p1, s1), queue_score(p2, s2)
    assert (a < b) == ((-p1, s1) < (-p2, s2))
    assert float(a) == a  # exact as a double
    assert decode_score(a) == (p1, s1)


def test_score_rejects_out_of_range() -> None:
    with pytest.raises(ProtocolError):
        queue_score(MAX_PRIORITY + 1, 0)
    with pytest.raises(ValueError, match="seq"):
        queue_score(0, MAX_SEQ + 1)


_entered = st.integers(0, (1 << AGED_TIME_BITS) - 1)
_aging = st.integers(1, MAX_AGING_MS)
_prio = st.integers(MIN_PRIORITY, MAX_PRIORITY)
_seq = st.integers(0, MAX_SEQ)


@given(_prio, _entered, _seq, _prio, _entered, _seq, _aging)
def test_aged_score_is_exact_and_orders_by_aged_priority_then_seq(
    p1: int, t1: int, s1: int, p2: int, t2: int, s2: int, a: int
) -> None:
    x, y = aged_score(p1, t1, a, s1), aged_score(p2, t2, a, s2)
    assert 0 <= x < 2**53 and float(x) == x  # exact as a double
    # job 1 runs first iff it has the larger aged priority A*p - t, then by seq mod 4096
    tie = (1 << AGED_TIE_BITS) - 1
    assert (x < y) == ((t1 - a * p1, s1 & tie) < (t2 - a * p2, s2 & tie))


@given(_prio, _entered, _seq, _aging, st.integers(1, 10_000))
def test_aging_is_continuous_one_step_per_aging_ms(
    p: int, t: int, s: int, a: int, waited: int
) -> None:
    # a job that entered `a * k` ms earlier ranks as one of k more priority steps
    k = 1 + waited % 50
    if t - a * k < 0 or p + k > MAX_PRIORITY:
        return
    earlier = aged_score(p, t - a * k, a, s)
    assert earlier >> AGED_TIE_BITS == aged_score(p + k, t, a, s) >> AGED_TIE_BITS
    # and one ms less waited ranks below it
    assert aged_score(p, t - a * k + 1, a, s) > earlier


def test_aging_example_of_the_issue() -> None:
    # A = 1 s: a priority-0 job queued 3 s before a priority-2 job runs first ...
    t = entered_ms(1_800_000_000.0)
    assert aged_score(0, t, 1000, 1) < aged_score(2, t + 3000, 1000, 2)
    # ... but not one queued 1 s before it (2 steps of difference, 1 s of waiting)
    assert aged_score(0, t, 1000, 1) > aged_score(2, t + 1000, 1000, 2)
    # and FIFO by seq on an exact tie
    assert aged_score(0, t, 1000, 7) < aged_score(2, t + 2000, 1000, 8)


def test_entered_ms_and_aged_score_bounds() -> None:
    assert entered_ms(AGING_EPOCH_MS / 1000) == 0
    assert entered_ms(AGING_EPOCH_MS / 1000 + 1.2345) == 1234
    assert entered_ms(0.0) == 0  # before the epoch: clamped
    assert entered_ms(1e12) == (1 << AGED_TIME_BITS) - 1  # far future: clamped
    worst = aged_score(MIN_PRIORITY, (1 << AGED_TIME_BITS) - 1, MAX_AGING_MS, MAX_SEQ)
    assert worst < 2**53
    with pytest.raises(ValueError, match="aging_ms"):
        aged_score(0, 0, 0, 0)
    with pytest.raises(ValueError, match="entered"):
        aged_score(0, 1 << AGED_TIME_BITS, 1, 0)


def test_state_machine_shape() -> None:
    for status in TERMINAL_STATUSES:
        assert TRANSITIONS[status] == frozenset()
    assert can_transition(None, JobStatus.QUEUED)
    assert can_transition(JobStatus.QUEUED, JobStatus.ASSIGNED)
    assert can_transition(JobStatus.RUNNING, JobStatus.QUEUED)  # requeue after a lost worker
    assert not can_transition(JobStatus.QUEUED, JobStatus.COMPLETED)
    assert not can_transition(JobStatus.COMPLETED, JobStatus.QUEUED)
    assert set(TRANSITIONS) == {None, *JobStatus}


@pytest.mark.parametrize("bad", ["", " x", "a/b", "x" * 129, "é", 5, None, "-lead"])
def test_job_id_validation(bad: object) -> None:
    with pytest.raises(ProtocolError) as err:
        validate_job_id(bad)
    assert err.value.code == ErrorCode.INVALID_FIELD


@pytest.mark.parametrize("bad", [True, 1.5, "3", MAX_PRIORITY + 1, MIN_PRIORITY - 1])
def test_priority_validation(bad: object) -> None:
    with pytest.raises(ProtocolError):
        validate_priority(bad)


def test_params_validation() -> None:
    assert validate_params({"a": 1}, 100) == '{"a":1}'
    with pytest.raises(ProtocolError) as err:
        validate_params({"a": "x" * 200}, 100)
    assert err.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError):
        validate_params([1, 2], 100)
    with pytest.raises(ProtocolError):
        validate_params({"a": float("nan")}, 100)


def test_worker_id() -> None:
    assert parse_worker_id("machine1:gpu0") == ("machine1", "gpu0")
    for bad in ["machine1", "m:", ":gpu0", "m:g:x", "m m:gpu0"]:
        with pytest.raises(ProtocolError):
            parse_worker_id(bad)


def test_decode_message_ok_and_defaults() -> None:
    msg = decode_message(json.dumps({"type": "submit_job", "id": 7, "job_type": "t"}), Role.CLIENT)
    assert msg.type is MessageType.SUBMIT_JOB
    assert msg.id == 7
    assert msg.fields == {
        "job_type": "t",
        "priority": 0,
        "params": {},
        "job_id": None,
        "max_attempts": None,
    }


@pytest.mark.parametrize(
    ("frame", "role", "code"),
    [
        ("not json", Role.CLIENT, ErrorCode.BAD_JSON),
        ("[1,2]", Role.CLIENT, ErrorCode.BAD_MESSAGE),
        ('{"id": 1}', Role.CLIENT, ErrorCode.BAD_MESSAGE),
        ('{"type": "nope", "id": 1}', Role.CLIENT, ErrorCode.UNKNOWN_TYPE),
        ('{"type": "complete_job", "id": 1}', Role.CLIENT, ErrorCode.NOT_ALLOWED),
        ('{"type": "submit_job", "id": 1}', Role.CLIENT, ErrorCode.INVALID_FIELD),
        ('{"type": "submit_job", "job_type": 3}', Role.CLIENT, ErrorCode.INVALID_FIELD),
        (
            '{"type": "submit_job", "job_type": "t", "priority": "hi"}',
            Role.CLIENT,
            ErrorCode.INVALID_FIELD,
        ),
        (
            '{"type": "submit_job", "job_type": "t", "params": []}',
            Role.CLIENT,
            ErrorCode.INVALID_FIELD,
        ),
        ('{"type": "register_worker", "job_types": []}', Role.WORKER, ErrorCode.INVALID_FIELD),
        (
            '{"type": "update_job_progress", "job_id": "j", "attempt": 1, "progress": 101}',
            Role.WORKER,
            ErrorCode.INVALID_FIELD,
        ),
        (
            '{"type": "complete_job", "job_id": "j", "attempt": 0}',
            Role.WORKER,
            ErrorCode.INVALID_FIELD,
        ),
        (
            '{"type": "submit_job", "job_type": "t", "id": {"x": 1}}',
            Role.CLIENT,
            ErrorCode.INVALID_FIELD,
        ),
        ('{"type": "submit_job", "job_type": "t"}', Role.MONITOR, ErrorCode.NOT_ALLOWED),
    ],
)
def test_decode_message_errors(frame: str, role: Role, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_message(frame, role)
    assert err.value.code == code
    assert err.value.message
    reply = err.value.to_message()
    assert reply["type"] == "error"
    assert reply["code"] == code.value


def test_error_keeps_request_id() -> None:
    with pytest.raises(ProtocolError) as err:
        decode_message('{"type": "get_job_status", "id": "r1", "job_id": "bad id"}', Role.CLIENT)
    assert err.value.ref == "r1"


def test_keys_are_hash_tagged_and_prelude_matches() -> None:
    k = Keys("ns1")
    assert k.job("a") == "{ns1}:job:a"
    assert k.queue("t") == "{ns1}:queue:t"
    assert k.events == "{ns1}:events"
    prelude = lua_prelude()
    assert "K.job = function(x) return P .. 'job:' .. x end" in prelude
    assert "K.events = function() return P .. 'events' end" in prelude
    with pytest.raises(ValueError, match="namespace"):
        Keys("bad{ns}")


def test_random_messages_never_crash_the_decoder() -> None:
    rng = random.Random(1)
    alphabet = '{}[]":,0123456789abcdefghijklmnopqrstuvwxyz_ \\'
    for _ in range(2000):
        frame = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        for role in Role:
            with contextlib.suppress(ProtocolError):
                decode_message(frame, role)


def test_fast_and_standard_encoders_agree() -> None:
    from redisq_server import protocol

    messages = [
        {"type": "job_completed", "job_id": "j", "result": {"a": [1, 2.5, None, True, "é✓"]}},
        {"type": "stats", "queued": 0, "by_priority": {"5": 1}, "x": -3, "f": 0.1},
        {"type": "error", "code": "bad_json", "message": 'quote " and \\ backslash', "ref": None},
        {"big": 2**70},
    ]
    for m in messages:
        assert json.loads(protocol._encode_std(m)) == m
        assert json.loads(protocol.encode(m)) == m
        # what sockets send: the same text as UTF-8 bytes
        assert protocol.encode_bytes(m) == protocol.encode(m).encode()
        assert protocol._encode_bytes_std(m) == protocol._encode_std(m).encode()


# ---------------------------------------------- ids: the whole string must match

#: whitespace and control characters, the trailing newline that ``$`` lets through first
_JUNK = st.sampled_from(
    ["\n", "\r\n", "\r", " ", "\t", "\x00", "\x0b", "\x0c", "\x7f"]
) | st.characters(categories=["Cc", "Zs", "Zl", "Zp"])
_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,30}", fullmatch=True)
_ID_RULES = [validate_job_id, validate_job_type, validate_client_id]


@given(_NAMES, _JUNK, st.sampled_from(["end", "start", "middle"]))
def test_ids_with_whitespace_or_control_characters_are_refused(
    name: str, junk: str, where: str
) -> None:
    """A valid name stays valid; with a newline, whitespace or a control character
    added anywhere (the end included) it is refused by every id rule, the path ids
    and the namespace."""
    for rule in _ID_RULES:
        assert rule(name) == name
    bad = {"end": name + junk, "start": junk + name, "middle": name[:1] + junk + name[1:]}[where]
    for rule in _ID_RULES:
        with pytest.raises(ProtocolError) as err:
            rule(bad)
        assert err.value.code == ErrorCode.INVALID_FIELD
    assert validate_worker_id(f"{name}:gpu0") == f"{name}:gpu0"
    for worker_id in (f"{bad}:gpu0", f"{name}:gpu0{junk}", f"{name}:{junk}gpu0"):
        with pytest.raises(ProtocolError):
            validate_worker_id(worker_id)
    assert validate_namespace(name) == name
    with pytest.raises(ValueError, match="namespace"):
        validate_namespace(bad)


@pytest.mark.parametrize(
    "frame",
    [
        '{"type": "submit_job", "job_type": "t", "job_id": "j1\\n"}',
        '{"type": "submit_job", "job_type": "t\\n"}',
        '{"type": "get_job_status", "job_id": "j1\\n"}',
        '{"type": "get_events", "since": "0\\n"}',
        '{"type": "get_events", "since": "1-0\\n"}',
    ],
)
def test_a_trailing_newline_is_an_invalid_field(frame: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_message(frame, Role.CLIENT)
    assert err.value.code == ErrorCode.INVALID_FIELD


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_event_ids_up_to_64_bits_are_accepted(ms: int, seq: int) -> None:
    for since in (str(ms), f"{ms}-{seq}"):
        msg = decode_message(json.dumps({"type": "get_events", "since": since}), Role.MONITOR)
        assert msg.fields["since"] == since


@pytest.mark.parametrize(
    "since",
    ["99999999999999999999-0", "18446744073709551616", "0-18446744073709551616", "$", "-1", ""],
)
def test_event_ids_out_of_range_are_invalid(since: str) -> None:
    """Redis refuses stream ids over 2^64 - 1: the hub must refuse them first, as
    ``invalid_field``, not pass them on and answer ``unavailable``."""
    with pytest.raises(ProtocolError) as err:
        decode_message(json.dumps({"type": "get_events", "since": since}), Role.CLIENT)
    assert err.value.code == ErrorCode.INVALID_FIELD


def test_attempt_is_bounded() -> None:
    assert validate_attempt(1) == 1
    assert validate_attempt(MAX_ATTEMPT) == MAX_ATTEMPT
    for bad in (0, -1, MAX_ATTEMPT + 1, 10**30, True, 1.0, "1"):
        with pytest.raises(ProtocolError) as err:
            validate_attempt(bad)
        assert err.value.code == ErrorCode.INVALID_FIELD, bad
