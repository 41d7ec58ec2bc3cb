"""Signed, identity-bound tokens and the hub's gate (pure: no sockets, no Redis).

The end-to-end checks (a hub refusing handshakes, the ``redisq token`` command, the
logs) are in tests/test_security.py.
"""

from __future__ import annotations

import base64
import http

import pytest
from hypothesis import given
from hypothesis import strategies as st

from redisq_server.auth import (
    MAX_TTL_S,
    MIN_SECRET_CHARS,
    SKEW_S,
    TOKEN_PATTERN,
    Authenticator,
    Grant,
    TokenError,
    key_id,
    parse_secrets,
    sign,
    verify,
)
from redisq_server.protocol import Role

OLD = "o" * 40
NEW = "n" * 40
NOW = 1_800_000_000.0


def test_a_token_carries_role_id_and_expiry() -> None:
    token = sign([NEW], Role.CLIENT, "alice", ttl_s=60, now=NOW)
    assert verify([NEW], token, now=NOW) == Grant(Role.CLIENT, "alice", int(NOW) + 60)
    assert TOKEN_PATTERN.fullmatch(token)
    assert len(token) < 120  # compact
    assert all(c.isalnum() or c in "-_." for c in token)  # URL-safe as it is


@given(
    st.sampled_from(list(Role)),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True),
    st.integers(1, 10**8),
)
def test_every_valid_identity_round_trips(role: Role, ident: str, ttl: int) -> None:
    token = sign([NEW, OLD], role, ident, ttl_s=ttl, now=NOW)
    assert verify([OLD, NEW], token, now=NOW) == Grant(role, ident, int(NOW) + ttl)


def test_expiry_allows_one_second_of_skew_and_no_more() -> None:
    token = sign([NEW], Role.WORKER, "m1", ttl_s=10, now=NOW)
    expires = int(NOW) + 10
    assert verify([NEW], token, now=expires).expires == expires
    assert verify([NEW], token, now=expires + SKEW_S).expires == expires
    with pytest.raises(TokenError, match="expired"):
        verify([NEW], token, now=expires + SKEW_S + 0.001)


def test_rotation_the_first_secret_signs_every_secret_verifies() -> None:
    old_token = sign([OLD], Role.CLIENT, "alice", now=NOW)
    new_token = sign([NEW, OLD], Role.CLIENT, "alice", now=NOW)
    assert old_token.split(".")[1] != new_token.split(".")[1]  # another key id
    for secrets in ([NEW, OLD], [OLD, NEW]):
        assert verify(secrets, old_token, now=NOW).ident == "alice"
        assert verify(secrets, new_token, now=NOW).ident == "alice"
    with pytest.raises(TokenError):  # the old secret dropped: its tokens stop working
        verify([NEW], old_token, now=NOW)
    assert key_id(OLD) != key_id(NEW) and OLD not in key_id(OLD)


def _payload(token: str) -> str:
    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode()


def _with_payload(token: str, payload: str) -> str:
    prefix, _, sig = token.split(".")
    body = base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode()
    return f"{prefix}.{body}.{sig}"


def test_forged_and_malformed_tokens_are_refused() -> None:
    token = sign([NEW], Role.CLIENT, "alice", ttl_s=60, now=NOW)
    role, ident, expires, kid = _payload(token).split(":")
    forged = [
        _with_payload(token, f"{role}:bob:{expires}:{kid}"),  # another id
        _with_payload(token, f"monitor:{ident}:{expires}:{kid}"),  # another role
        _with_payload(token, f"{role}:{ident}:{int(expires) + 3600}:{kid}"),  # longer life
        token[:-2] + ("AA" if token[-2:] != "AA" else "BB"),  # another signature
        token.rsplit(".", 1)[0] + ".",
        sign(["x" * 40], Role.CLIENT, "alice", now=NOW),  # a key the hub does not have
        "rq1." + token.split(".", 1)[1].replace(".", ""),
        "rq2." + token.split(".", 1)[1],
        "rq1.!!!.???",
        "rq1.a.b.c",
        "",
        "alice",
    ]
    for bad in forged:
        with pytest.raises(TokenError):
            verify([NEW], bad, now=NOW)


def test_secrets_must_be_long() -> None:
    assert parse_secrets(None) == ()
    assert parse_secrets(f" {NEW} , {OLD},") == (NEW, OLD)
    with pytest.raises(ValueError, match=f"at least {MIN_SECRET_CHARS}") as err:
        parse_secrets(f"{NEW},short-secret")
    assert "short-secret" not in str(err.value)


def test_sign_refuses_what_it_cannot_bind() -> None:
    with pytest.raises(ValueError, match="not set"):
        sign([], Role.CLIENT, "alice")
    with pytest.raises(ValueError, match="not a GPU"):
        sign([NEW], Role.WORKER, "m1:gpu0")
    for bad in ("", "a b", "a\n", "x" * 65, "-lead"):
        with pytest.raises(ValueError, match="is not valid"):
            sign([NEW], Role.CLIENT, bad)
    with pytest.raises(ValueError, match="admin"):
        sign([NEW], "admin", "alice")
    for ttl in (0, -1, MAX_TTL_S + 1):
        with pytest.raises(ValueError, match="ttl"):
            sign([NEW], Role.CLIENT, "alice", ttl_s=ttl)
    longest = sign([NEW], Role.CLIENT, "alice", ttl_s=MAX_TTL_S, now=NOW)
    assert verify([NEW], longest, now=NOW + MAX_TTL_S).expires == int(NOW) + MAX_TTL_S


# ------------------------------------------------------------------ the gate

STATIC = {Role.CLIENT: "static-client", Role.WORKER: None, Role.MONITOR: None}


def _check(gate: Authenticator, role: Role, ident: str, bearer: str) -> int:
    refusal = gate.check(role, ident, bearer, now=NOW)
    return 0 if refusal is None else int(refusal.status)


def test_the_gate_binds_each_token_to_its_endpoint() -> None:
    gate = Authenticator(STATIC, [NEW, OLD])
    alice = sign([NEW], Role.CLIENT, "alice", now=NOW)
    machine = sign([OLD], Role.WORKER, "m1", now=NOW)
    mon = sign([NEW], Role.MONITOR, "wall", now=NOW)
    expired = sign([NEW], Role.CLIENT, "alice", ttl_s=1, now=NOW - 10)
    cases = [
        (Role.CLIENT, "alice", alice, 0),
        (Role.CLIENT, "bob", alice, 403),  # another id
        (Role.MONITOR, "alice", alice, 403),  # another role
        (Role.WORKER, "alice:gpu0", alice, 403),
        (Role.WORKER, "m1:gpu0", machine, 0),
        (Role.WORKER, "m1:gpu7", machine, 0),  # any GPU of its machine
        (Role.WORKER, "m2:gpu0", machine, 403),
        (Role.WORKER, "m10:gpu0", machine, 403),
        (Role.CLIENT, "m1", machine, 403),
        (Role.MONITOR, "wall", mon, 0),
        (Role.MONITOR, "other", mon, 403),
        (Role.CLIENT, "alice", expired, 401),
        (Role.CLIENT, "alice", alice[:-1], 401),
        (Role.CLIENT, "alice", "", 401),  # missing
        (Role.WORKER, "m1:gpu0", "", 401),
        (Role.CLIENT, "anyone", "static-client", 0),  # the static token where set
        (Role.WORKER, "m1:gpu0", "static-client", 401),  # only for its role
        (Role.MONITOR, "wall", "static-client", 401),
    ]
    for role, ident, bearer, status in cases:
        assert _check(gate, role, ident, bearer) == status, (role, ident, bearer[:12])


def test_without_secrets_only_static_tokens_count() -> None:
    gate = Authenticator(STATIC)
    signed = sign([NEW], Role.WORKER, "m1", now=NOW)
    assert _check(gate, Role.WORKER, "m1:gpu0", "") == 0  # unset and no secrets: open
    assert _check(gate, Role.CLIENT, "alice", sign([NEW], Role.CLIENT, "alice", now=NOW)) == 401
    assert _check(gate, Role.CLIENT, "alice", "static-client") == 0
    assert _check(Authenticator({}), Role.WORKER, "m1:gpu0", signed) == 0
    refusal = Authenticator(STATIC, [NEW]).check(Role.CLIENT, "bob", "nope", now=NOW)
    assert refusal is not None and refusal.status is http.HTTPStatus.UNAUTHORIZED
    assert refusal.error == "client token required"
