"""Configuration: one dataclass, built from the environment and overridable by flags.

Every setting has an environment variable (the seed's ``REDIS_HOST``, ``REDIS_PORT``,
``REDIS_DB``, ``REDIS_PASSWORD``, ``LOG_LEVEL`` are kept; ``REDIS_URL`` wins over them
when set). The README's configuration table is this module's ``ENV`` table.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from redis.cluster import RedisCluster
from redis.connection import Connection, parse_url

__all__ = [
    "ENV",
    "FAIR_SHARE_MODES",
    "MAX_AGING_S",
    "MAX_SHARDS",
    "EngineLimits",
    "RedisURLError",
    "Settings",
    "check_redis_url",
    "environ",
    "hub_url_from_env",
    "redis_url",
    "redis_url_from_env",
    "safe_url",
    "split_shards",
]


def environ() -> Mapping[str, str]:
    """The process environment: every setting of the project is read through here."""
    return os.environ


def redis_url_from_env(env: Mapping[str, str] | None = None) -> str:
    """``REDIS_URL`` if set, else a URL built from ``REDIS_HOST/PORT/DB/PASSWORD``."""
    env = environ() if env is None else env
    if env.get("REDIS_URL"):
        return env["REDIS_URL"]
    return redis_url(env=env)


def redis_url(
    host: str | None = None,
    port: int | None = None,
    db: int | None = None,
    password: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> str:
    """A ``redis://`` URL from the parts given, the others from ``REDIS_HOST``,
    ``REDIS_PORT``, ``REDIS_DB`` and ``REDIS_PASSWORD`` (``REDIS_URL`` is not read:
    explicit parts win over it)."""
    env = environ() if env is None else env
    host = host if host is not None else env.get("REDIS_HOST", "localhost")
    port_s = str(port) if port is not None else env.get("REDIS_PORT", "6379")
    db_s = str(db) if db is not None else env.get("REDIS_DB", "0")
    password = password if password is not None else env.get("REDIS_PASSWORD")
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port_s}/{db_s}"


def hub_url_from_env(env: Mapping[str, str] | None = None) -> str:
    """Where lab tools find a hub: ``HUB_URL``, else ``ws://HUB_HOST:HUB_PORT``
    (default ``ws://127.0.0.1:8000``)."""
    env = environ() if env is None else env
    if env.get("HUB_URL"):
        return env["HUB_URL"].rstrip("/")
    return f"ws://{env.get('HUB_HOST', '127.0.0.1')}:{env.get('HUB_PORT', '8000')}"


class RedisURLError(ValueError):
    """A Redis URL that no client could connect with (its text says why, in one
    line, without the URL's password)."""


#: keywords of the connection pools, accepted as URL options besides the connection's
_POOL_OPTIONS: Final = frozenset({"max_connections", "timeout"})


def _init_parameters(cls: type) -> set[str]:
    """The keyword parameters of ``cls.__init__`` and of its bases' (through ``**kwargs``)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return names - {"self", "kwargs", "args"}


def check_redis_url(url: str) -> str:
    """Return ``url`` if it is a Redis URL the hub can use (scheme, host, port,
    database and options), else raise :class:`RedisURLError`. Connects to nothing."""
    split_shards(url)  # raises for a bad shards=
    cluster = url.startswith(("redis+cluster://", "rediss+cluster://"))
    plain = url.replace("+cluster", "", 1) if cluster else url
    try:
        kwargs: dict[str, Any] = parse_url(plain)  # type: ignore[no-untyped-call]
        parts = urlsplit(plain)
        parts.port  # noqa: B018 - raises ValueError when out of range or not a number
    except ValueError as exc:
        # redis-py's port message quotes the port, which may be a piece of a password
        why = "the port is not a number from 0 to 65535" if "Port" in str(exc) else str(exc)
        raise RedisURLError(f"bad Redis URL: {why}") from None
    if parts.scheme == "unix" and not parts.path:
        raise RedisURLError("bad Redis URL: unix:// needs the socket's path")
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise RedisURLError("bad Redis URL: the database (the path) is not a number")
    allowed = _init_parameters(kwargs.pop("connection_class", Connection)) | _POOL_OPTIONS
    if cluster:
        allowed |= _init_parameters(RedisCluster)
    unknown = sorted(set(kwargs) - allowed)
    unknown = [k for k in unknown if not (cluster and k == "shards")]
    if unknown:
        raise RedisURLError(f"bad Redis URL: unknown option {', '.join(map(repr, unknown))}")
    return url


def split_shards(url: str) -> tuple[str, int | None]:
    """``url`` without its ``shards=S`` query option, and S (None when absent).

    Only a ``redis+cluster://`` / ``rediss+cluster://`` URL may name shards (one
    Redis has one core: shards there would spread nothing); raises
    :class:`RedisURLError` for a bad or misplaced value."""
    if "shards=" not in url:
        return url, None
    try:
        parts = urlsplit(url)
    except ValueError:  # malformed: check_redis_url says why
        return url, None
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    values = [v for k, v in pairs if k == "shards"]
    if not values:
        return url, None
    if not url.startswith(("redis+cluster://", "rediss+cluster://")):
        raise RedisURLError("bad Redis URL: shards= needs a redis+cluster:// URL")
    raw = values[-1]
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_SHARDS:
        raise RedisURLError(f"bad Redis URL: shards={raw!r}: expected 1 to {MAX_SHARDS}")
    query = urlencode([(k, v) for k, v in pairs if k != "shards"])
    return urlunsplit(parts._replace(query=query)), int(raw)


def safe_url(url: str) -> str:
    """``url`` with any password masked, for logs and messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


#: the longest aging step: one priority step per hour (keeps the aged score exact)
MAX_AGING_S: Final = 3600.0
#: the most shards a namespace may have
MAX_SHARDS: Final = 256
#: values of ``fair_share``
FAIR_SHARE_MODES: Final = ("off", "client")


@dataclass(frozen=True)
class EngineLimits:
    """What the queue engine enforces; shared by every hub on one namespace."""

    namespace: str = "redisq"
    lease_s: float = 30.0
    result_ttl_s: int = 86_400
    events_maxlen: int = 100_000
    max_lost: int = 3
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    default_max_attempts: int = 3
    max_params_bytes: int = 8 * 1024 * 1024
    max_result_bytes: int = 16 * 1024 * 1024
    # scheduling policies (docs/scheduling.md): every hub of a namespace must run the same
    aging_s: float = 0.0  # a queued job gains one priority step per aging_s waited; 0: off
    fair_share: str = "off"  # "client": round-robin over client ids within a priority
    # shards of the namespace (docs/deploy.md): 1 is the unsharded layout
    shards: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"shards={self.shards!r}: expected 1 to {MAX_SHARDS}")
        if not (self.aging_s == 0 or 0.001 <= self.aging_s <= MAX_AGING_S):
            raise ValueError(
                f"aging_s={self.aging_s!r}: expected 0 (off) or 0.001 to {MAX_AGING_S} s"
            )
        if self.fair_share not in FAIR_SHARE_MODES:
            modes = " or ".join(FAIR_SHARE_MODES)
            raise ValueError(f"fair_share={self.fair_share!r}: expected {modes}")

    @property
    def policy(self) -> dict[str, Any]:
        """The scheduling policy, as /health, the card and ``redisq summary`` show it."""
        return {"aging_s": self.aging_s, "fair_share": self.fair_share}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> EngineLimits:
        """The limits the environment sets (see :data:`ENV`), then ``overrides``."""
        return replace(cls(**_read(cls, env)), **overrides)


@dataclass(frozen=True)
class Settings:
    """Everything a hub needs. Build with :meth:`from_env`, adjust with ``replace``."""

    redis_url: str = "redis://localhost:6379/0"
    hub_host: str = "127.0.0.1"
    hub_port: int = 8000
    hub_id: str = ""  # empty: a random id per process
    processes: int = 1  # hub processes sharing the port (redisq-server only)
    log_level: str = "INFO"
    limits: EngineLimits = field(default_factory=EngineLimits)
    max_frame_bytes: int = 24 * 1024 * 1024
    send_queue_frames: int = 1024
    send_queue_bytes: int = 16 * 1024 * 1024
    max_subscriptions: int = 10_000
    max_connections: int = 50_000
    # tokens and signing secrets: kept out of repr(), so a printed Settings does not show them
    client_token: str | None = field(default=None, repr=False)
    worker_token: str | None = field(default=None, repr=False)
    monitor_token: str | None = field(default=None, repr=False)
    auth_secrets: str | None = field(default=None, repr=False)  # see auth.parse_secrets
    debug: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the environment (see :data:`ENV`), then apply ``overrides`` (fields of
        Settings or of :class:`EngineLimits`)."""
        env = environ() if env is None else env
        limit_over = {k: v for k, v in overrides.items() if k in _fields(EngineLimits)}
        hub_over = {k: v for k, v in overrides.items() if k not in limit_over}
        settings = cls(
            redis_url=redis_url_from_env(env),
            limits=EngineLimits.from_env(env, **limit_over),
            **_read(cls, env),
        )
        return replace(settings, **hub_over)


def _fields(cls: type) -> dict[str, Any]:
    return {f.name: f.type for f in fields(cls)}


def _read(cls: type, env: Mapping[str, str] | None) -> dict[str, Any]:
    """The fields of dataclass ``cls`` that variables in ``env`` set, coerced."""
    env = environ() if env is None else env
    types = _fields(cls)
    out: dict[str, Any] = {}
    for var, (name, _default, _doc) in ENV.items():
        if name in types and name not in _NOT_SETTINGS and env.get(var, "") != "":
            out[name] = _coerce(types[name], env[var], var)
    return out


#: ENV names that are no field of Settings: the Redis URL parts (folded into
#: ``redis_url``) and the lab's hub address
_NOT_SETTINGS: Final = frozenset({"redis_url", "hub_url"})


def _coerce(type_name: Any, raw: str, var: str) -> Any:
    t = str(type_name)
    try:
        if "bool" in t:
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected {t}") from None
    return raw


#: Environment variable -> (setting, default, description). The README table.
ENV: Final[dict[str, tuple[str, str, str]]] = {
    "REDIS_URL": (
        "redis_url",
        "",
        "Redis URL (redis://, rediss://, unix://); wins over the four below",
    ),
    "REDIS_HOST": ("redis_url", "localhost", "Redis host"),
    "REDIS_PORT": ("redis_url", "6379", "Redis port"),
    "REDIS_DB": ("redis_url", "0", "Redis database number"),
    "REDIS_PASSWORD": ("redis_url", "", "Redis password"),
    "LOG_LEVEL": ("log_level", "INFO", "DEBUG, INFO, WARNING, ERROR"),
    "HUB_HOST": ("hub_host", "127.0.0.1", "address the hub listens on"),
    "HUB_PORT": ("hub_port", "8000", "port the hub listens on (0: pick a free one)"),
    "HUB_URL": (
        "hub_url",
        "(from HUB_HOST/HUB_PORT)",
        "where lab tools find a hub (ws://host:port)",
    ),
    "HUB_ID": ("hub_id", "(random)", "this hub's id in worker records and events"),
    "HUB_PROCESSES": (
        "processes",
        "1",
        "hub processes redisq-server runs on one port (SO_REUSEPORT); each its own hub id",
    ),
    "HUB_DEBUG": ("debug", "0", "1 serves the debug page at /debug"),
    "REDISQ_NAMESPACE": ("namespace", "redisq", "key namespace; keys are {ns}:..."),
    "REDISQ_LEASE_S": ("lease_s", "30", "seconds a job/worker lives without a heartbeat"),
    "REDISQ_RESULT_TTL_S": ("result_ttl_s", "86400", "seconds finished jobs are kept"),
    "REDISQ_EVENTS_MAXLEN": ("events_maxlen", "100000", "approximate cap of the event stream"),
    "REDISQ_MAX_LOST": ("max_lost", "3", "lost workers a job survives before it fails"),
    "REDISQ_BACKOFF_BASE_S": ("backoff_base_s", "1", "first retry delay; doubles per failure"),
    "REDISQ_BACKOFF_MAX_S": ("backoff_max_s", "300", "longest retry delay"),
    "REDISQ_MAX_ATTEMPTS": (
        "default_max_attempts",
        "3",
        "failures a job may have (when it names no max_attempts)",
    ),
    "REDISQ_AGING_S": (
        "aging_s",
        "0",
        "aging: a queued job gains one priority step per this many seconds waited "
        "(continuous; 0: off, strict priority; at most 3600)",
    ),
    "REDISQ_FAIR_SHARE": (
        "fair_share",
        "off",
        "client: within a priority, jobs go round-robin across the clients with jobs waiting",
    ),
    "REDISQ_SHARDS": (
        "shards",
        "1",
        "shards of the namespace, each its own hash slot (docs/deploy.md); "
        "shards=S in a redis+cluster:// URL wins",
    ),
    "REDISQ_MAX_PARAMS_BYTES": ("max_params_bytes", "8388608", "largest params JSON"),
    "REDISQ_MAX_RESULT_BYTES": ("max_result_bytes", "16777216", "largest result JSON"),
    "HUB_MAX_FRAME_BYTES": ("max_frame_bytes", "25165824", "largest inbound frame (close 1009)"),
    "HUB_SEND_QUEUE": ("send_queue_frames", "1024", "frames queued per socket before it is closed"),
    "HUB_SEND_QUEUE_BYTES": (
        "send_queue_bytes",
        "16777216",
        "bytes queued per socket before it is closed (1008)",
    ),
    "HUB_MAX_SUBSCRIPTIONS": ("max_subscriptions", "10000", "job subscriptions per client socket"),
    "HUB_MAX_CONNECTIONS": ("max_connections", "50000", "sockets per hub"),
    "REDISQ_CLIENT_TOKEN": ("client_token", "(off)", "bearer token clients must send"),
    "REDISQ_WORKER_TOKEN": ("worker_token", "(off)", "bearer token workers must send"),
    "REDISQ_MONITOR_TOKEN": ("monitor_token", "(off)", "bearer token monitors must send"),
    "REDISQ_AUTH_SECRETS": (
        "auth_secrets",
        "(off)",
        "comma-separated secrets of signed tokens (redisq token); the first signs, all verify",
    ),
}
