"""Who may open a socket: static role tokens and signed, identity-bound tokens.

Two kinds of bearer token, checked before the WebSocket opens:

- **Static role tokens** (``REDISQ_CLIENT_TOKEN``, ``REDISQ_WORKER_TOKEN``,
  ``REDISQ_MONITOR_TOKEN``): one shared string per role; it opens that role's
  endpoint under any id.
- **Signed tokens** (with ``REDISQ_AUTH_SECRETS``): an HMAC-SHA256 over a role, an
  id, an expiry time and the signing key's id, made by :func:`sign` (``redisq
  token``). A client token opens ``/ws/client/<its id>`` only, a monitor token
  ``/ws/monitor/<its id>`` only, a worker token ``/ws/worker/<its machine>:<any gpu>``.

A token looks like ``rq1.<payload>.<signature>``, both parts unpadded URL-safe
base64; the payload is ``<role>:<id>:<expiry>:<key id>`` (ids never contain ``:``).
The first secret signs; every secret verifies (a token names its key id, so a hub
finds the right secret without trying them all). Rotation: add the new secret
first on every hub, then drop the old one once the tokens it signed have expired.

Pure: no sockets, no logging. The hub calls :meth:`Authenticator.check` with the
bearer string it received; the answer is ``None`` (let it in) or a :class:`Refusal`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .protocol import ProtocolError, Role, parse_worker_id, validate_client_id

__all__ = [
    "DEFAULT_TTL_S",
    "MAX_TTL_S",
    "MIN_SECRET_CHARS",
    "SKEW_S",
    "TOKEN_PATTERN",
    "Authenticator",
    "Grant",
    "Refusal",
    "TokenError",
    "key_id",
    "parse_secrets",
    "sign",
    "verify",
]

#: the first part of every signed token (the format's version)
PREFIX: Final = "rq1"
#: how long a token lives unless ``--ttl`` says otherwise (seconds)
DEFAULT_TTL_S: Final = 86_400
#: the longest life a token may be given (seconds): ten years
MAX_TTL_S: Final = 10 * 365 * 86_400
#: the clock skew between the signer and a hub that expiry tolerates (seconds)
SKEW_S: Final = 1
#: the shortest secret accepted (characters)
MIN_SECRET_CHARS: Final = 32
#: a signed token anywhere in a text (for masking logs)
TOKEN_PATTERN: Final = re.compile(rf"{PREFIX}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")

_KEY_ID_CHARS: Final = 8
_PAYLOAD_RE: Final = re.compile(r"(client|worker|monitor):([^:]+):([0-9]{1,12}):([0-9a-f]{8})")


class TokenError(ValueError):
    """A token that is malformed, forged, signed by an unknown key, or expired."""


@dataclass(frozen=True)
class Grant:
    """What a valid signed token proves: ``role`` and ``ident`` (a client or monitor
    id, or a worker's machine id) until ``expires`` (Unix seconds)."""

    role: Role
    ident: str
    expires: int


@dataclass(frozen=True)
class Refusal:
    """Why a handshake is refused: HTTP 401 (no valid credential) or 403 (a valid
    token that does not open this endpoint), and the response body's text."""

    status: http.HTTPStatus
    error: str


def parse_secrets(raw: str | None) -> tuple[str, ...]:
    """``REDISQ_AUTH_SECRETS`` (comma-separated) as a tuple, the signing secret
    first; empty when unset. Raises ValueError for a secret shorter than
    :data:`MIN_SECRET_CHARS` (the message does not contain it)."""
    secrets = tuple(s.strip() for s in (raw or "").split(",") if s.strip())
    for i, secret in enumerate(secrets):
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(
                f"REDISQ_AUTH_SECRETS: secret {i + 1} has {len(secret)} characters; "
                f"use at least {MIN_SECRET_CHARS} (e.g. openssl rand -base64 32)"
            )
    return secrets


def key_id(secret: str) -> str:
    """The public id of ``secret`` that tokens carry (it reveals nothing of it)."""
    return hashlib.sha256(b"redisq key id\x00" + secret.encode()).hexdigest()[:_KEY_ID_CHARS]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, signed: str) -> bytes:
    return hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()


def _check_ident(role: Role, ident: str) -> str:
    """A token's id: a client or monitor id, or (for a worker) a machine id."""
    return validate_client_id(ident, "machine_id" if role is Role.WORKER else f"{role}_id")


def sign(
    secrets: Sequence[str],
    role: Role | str,
    ident: str,
    ttl_s: int = DEFAULT_TTL_S,
    now: float | None = None,
) -> str:
    """A token for ``role`` and ``ident`` (for a worker: its machine id), valid for
    ``ttl_s`` seconds from ``now``, signed with the first of ``secrets``. Raises
    ValueError without a secret, for an unknown role, an invalid id or a ttl outside
    1..:data:`MAX_TTL_S`."""
    if not secrets:
        raise ValueError("REDISQ_AUTH_SECRETS is not set: there is no secret to sign with")
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl must be from 1 to {MAX_TTL_S} seconds (ten years), got {ttl_s}")
    role = Role(role)
    if role is Role.WORKER and ":" in ident:
        raise ValueError(f"a worker token names a machine ({ident.split(':')[0]!r}), not a GPU")
    try:
        _check_ident(role, ident)
    except ProtocolError as err:
        raise ValueError(err.message) from None
    expires = int((time.time() if now is None else now) + ttl_s)
    payload = _b64(f"{role.value}:{ident}:{expires}:{key_id(secrets[0])}".encode())
    signed = f"{PREFIX}.{payload}"
    return f"{signed}.{_b64(_mac(secrets[0], signed))}"


def verify(secrets: Sequence[str], token: str, now: float | None = None) -> Grant:
    """The :class:`Grant` of ``token`` if one of ``secrets`` signed it and it has not
    expired (allowing :data:`SKEW_S`); else raises TokenError."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenError("not a signed token")
    try:
        payload = _unb64(parts[1]).decode()
        signature = _unb64(parts[2])
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise TokenError("malformed token") from None
    m = _PAYLOAD_RE.fullmatch(payload)
    if m is None:
        raise TokenError("malformed token")
    role, ident, expires, kid = Role(m[1]), m[2], int(m[3]), m[4]
    signed = f"{PREFIX}.{parts[1]}"
    keys = [s for s in secrets if hmac.compare_digest(key_id(s), kid)]
    if not any(hmac.compare_digest(_mac(s, signed), signature) for s in keys):
        raise TokenError("bad signature or unknown key")
    try:
        _check_ident(role, ident)
    except ProtocolError:
        raise TokenError("malformed token") from None
    if (time.time() if now is None else now) > expires + SKEW_S:
        raise TokenError("expired")
    return Grant(role, ident, expires)


def _bearer_ident(role: Role, ident: str) -> str:
    """The id a signed token must name to open ``/ws/<role>/<ident>``."""
    return parse_worker_id(ident)[0] if role is Role.WORKER else ident


class Authenticator:
    """The hub's gate. ``static`` maps each role to its static token (None: unset);
    ``secrets`` verify signed tokens (:func:`parse_secrets`).

    A role is open only when it has no static token and there are no secrets;
    otherwise its endpoint needs its static token or a signed token for its id.
    """

    def __init__(self, static: Mapping[Role, str | None], secrets: Sequence[str] = ()) -> None:
        self.static = {role: token for role, token in static.items() if token}
        self.secrets = tuple(secrets)

    def check(
        self, role: Role, ident: str, bearer: str, now: float | None = None
    ) -> Refusal | None:
        """May a handshake carrying ``bearer`` ("" for none) open ``/ws/<role>/<ident>``
        (``ident`` already validated)? None: yes; else why not."""
        static = self.static.get(role)
        if static is None and not self.secrets:
            return None
        if static is not None and hmac.compare_digest(bearer.encode(), static.encode()):
            return None
        required = Refusal(http.HTTPStatus.UNAUTHORIZED, f"{role} token required")
        if not self.secrets or not bearer.startswith(PREFIX + "."):
            return required
        try:
            grant = verify(self.secrets, bearer, now)
        except TokenError:
            return required
        if grant.role is not role or grant.ident != _bearer_ident(role, ident):
            return Refusal(http.HTTPStatus.FORBIDDEN, "this token does not open this endpoint")
        return None
