"""``protocol.loads`` (orjson with the `fast` extra) reads every text exactly as
``json.loads`` does: the same values of the same types, and an error wherever
``json.loads`` raises one."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from redisq_server import AsyncRedisService, protocol

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: orjson alone reads 19+ digits as a float
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types, all the way down (1 and 1.0 differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@given(JSON_VALUES)
def test_loads_reads_what_json_reads(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False)
    assert _same(protocol.loads(text), json.loads(text))


@pytest.mark.parametrize(
    "text",
    [
        "9999999999999999999",
        "-9999999999999999999",
        "18446744073709551616",
        '{"n": 123456789012345678901234567890}',
        '{"s": "19 digits 1234567890123456789 in a string"}',
        '{"a": "\\ud800"}',  # a lone surrogate escape: json reads it, decode_message refuses
        "NaN",
        "1e400",
    ],
)
def test_edge_texts_read_as_json_reads_them(text: str) -> None:
    got, want = protocol.loads(text), json.loads(text)
    if isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got)
    else:
        assert _same(got, want)


@pytest.mark.parametrize("text", ["{", "[1,]", "01", '"a\x01b"', "\ufeff{}", "{} {}"])
def test_what_json_refuses_loads_refuses(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        protocol.loads(text)


async def test_large_integers_in_params_reach_the_worker_exactly(svc: AsyncRedisService) -> None:
    params = {"seed": 2**70, "neg": -(10**19), "ok": 2**53 + 1}
    r = await svc.submit_job("t", params=params)
    a = await svc.register_worker("m1:gpu0", ["t"], session="s")
    assert a is not None and a.job_id == r.job_id
    assert a.params == params and all(type(v) is int for v in a.params.values())
    job = await svc.get_job(r.job_id)
    assert job is not None and job.params == params


def test_utf8_bytes_read_as_text() -> None:
    raw = '{"name": "ü", "n": 123456789012345678901}'
    assert _same(protocol.loads(raw.encode()), json.loads(raw))


_STRICT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@given(JSON_VALUES | st.dictionaries(st.integers() | st.booleans() | st.none(), st.integers()))
def test_dumps_writes_what_the_strict_json_encoder_writes(value: Any) -> None:
    """``protocol.dumps`` (the C encoder made once) gives the text the standard
    encoder with the same settings gives, non-string keys included."""
    assert protocol.dumps(value, "v") == _STRICT.encode(value)


@pytest.mark.parametrize(
    "value",
    [math.nan, {"a": [math.inf]}, {1.5j: 1}, {"a": {1, 2}}, object(), b"bytes"],
)
def test_dumps_refuses_what_json_refuses(value: Any) -> None:
    with pytest.raises(protocol.ProtocolError, match="v: not JSON-serialisable"):
        protocol.dumps(value, "v")


def test_dumps_refuses_a_value_that_holds_itself() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(protocol.ProtocolError, match="v: nested too deeply"):
        protocol.dumps(loop, "v")
