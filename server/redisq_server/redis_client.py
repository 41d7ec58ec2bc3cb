"""Connecting to Redis: plain, TLS, unix socket or Redis Cluster, by URL.

Every client the project makes comes from :func:`connect_async` or
:func:`connect_sync`, so they behave alike: strings decoded, stale pooled
connections retried, Redis Cluster chosen by the URL's scheme.
"""

from __future__ import annotations

from typing import Any, Final

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry as SyncRetry

from .config import redis_url, redis_url_from_env, split_shards

__all__ = ["CALL_TIMEOUT_S", "CLUSTER_SCHEMES", "connect_async", "connect_sync", "resolve_url"]


def resolve_url(
    url: str | None = None,
    host: str | None = None,
    port: int | None = None,
    db: int | None = None,
    password: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The URL to connect to and the client keywords for these arguments: ``url``
    as given; else a URL from ``host``/``port``/``db`` (the environment filling the
    rest); else, with none of them, the environment's ``REDIS_URL`` or parts.
    ``password`` is passed to the client as its own keyword."""
    if url is None:
        given = (host, port, db)
        url = redis_url_from_env() if all(v is None for v in given) else redis_url(host, port, db)
    extra: dict[str, Any] = {"decode_responses": True}
    if password is not None:
        extra["password"] = password
    return url, extra


CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")


def _cluster_url(url: str) -> str | None:
    """``redis+cluster://host:port`` -> ``redis://host:port`` (None: not a cluster URL);
    a ``shards=`` option is the engine's, not the client's: it is dropped."""
    url = split_shards(url)[0]
    for scheme in CLUSTER_SCHEMES:
        if url.startswith(scheme):
            return scheme.replace("+cluster", "") + url[len(scheme) :]
    return None


def _retry_stale_connections(kwargs: dict[str, Any], retry_class: Any) -> None:
    """Retry a command (twice, quickly) when its connection turns out to be closed,
    as pooled connections are after a Redis restart. Only connection errors are
    retried, not timeouts. A script whose reply was lost with its connection may run
    twice: fencing turns the second run into a refused report (``bad_state``,
    ``stale_attempt``, ``duplicate``), or for a registration into one extra requeue;
    never into a job completed twice."""
    kwargs.setdefault("retry", retry_class(ExponentialBackoff(cap=0.5, base=0.02), 2))
    kwargs.setdefault("retry_on_error", [RedisConnectionError])


#: how long one engine call may take before it fails with a Redis TimeoutError
CALL_TIMEOUT_S: Final = 5.0


def connect_async(url: str, **kwargs: Any) -> Any:
    """An asyncio client for ``url`` with strings decoded: a Redis Cluster client for
    ``redis+cluster://`` / ``rediss+cluster://`` (any node as the seed), else a
    plain one (``redis://``, ``rediss://`` for TLS, ``unix://``).

    The plain client has no socket timeout of its own: redis-py would wrap every
    send in ``asyncio.wait_for``, a task per command on Python 3.11 (about a tenth of
    a hub's time per request). :class:`AsyncRedisService` bounds each engine call by
    ``CALL_TIMEOUT_S`` instead; callers of ``.redis`` directly must bound theirs."""
    kwargs.setdefault("decode_responses", True)
    plain = _cluster_url(url)
    if plain is not None:
        return aredis.RedisCluster.from_url(plain, **kwargs)
    _retry_stale_connections(kwargs, AsyncRetry)
    kwargs.setdefault("socket_timeout", None)
    # a blocking pool: many concurrent calls wait for a connection instead of failing
    kwargs.setdefault("max_connections", 256)
    pool = aredis.BlockingConnectionPool.from_url(url, **kwargs)
    client = aredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # aclose() closes the pool too
    return client


def connect_sync(url: str, **kwargs: Any) -> Any:
    """A blocking client for ``url``; see :func:`connect_async`."""
    kwargs.setdefault("decode_responses", True)
    plain = _cluster_url(url)
    if plain is not None:
        return redis.RedisCluster.from_url(plain, **kwargs)
    _retry_stale_connections(kwargs, SyncRetry)
    return redis.Redis.from_url(url, **kwargs)
