"""How the lab's readers connect to a redisq namespace, and who closes the connection.

Monitors and dashboards accept the same arguments: a Redis URL, an object with
``redis_url`` and ``namespace`` attributes (a local stack), ``host``/``port``/
``db``/``password``, nothing (the environment decides: ``REDIS_URL`` or
``REDIS_HOST``/``REDIS_PORT``/``REDIS_DB``/``REDIS_PASSWORD``, and
``REDISQ_NAMESPACE``), or ``service=`` to share one
:class:`~redisq_server.RedisService`. :func:`open_service` turns them into a service
and says whether the caller owns it; :class:`NamespaceReader` holds the result and
closes what it owns.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self

from redisq_server import RedisService
from redisq_server.config import environ

__all__ = ["NamespaceReader", "RedisTarget", "open_service"]


class RedisTarget(Protocol):
    """Anything that names a Redis and a namespace, e.g. a local stack."""

    @property
    def redis_url(self) -> str: ...

    @property
    def namespace(self) -> str: ...


def open_service(
    source: str | RedisTarget | None = None,
    *,
    url: str | None = None,
    host: str | None = None,
    port: int | None = None,
    db: int | None = None,
    password: str | None = None,
    namespace: str | None = None,
    service: RedisService | None = None,
) -> tuple[RedisService, bool]:
    """The service to read through, and whether the caller owns it: when True the
    caller must close the service when done; when False (``service=`` was given) it
    must leave it open for its owner.

    ``source`` is a URL or an object with ``redis_url`` and ``namespace``; an explicit
    ``namespace`` wins over the source's. ``service`` excludes every other argument
    (TypeError), and so does ``url`` with a ``source``. Nothing connects until the
    first read.
    """
    if service is not None:
        given = (source, url, host, port, db, password, namespace)
        if any(v is not None for v in given):
            raise TypeError("pass either service= or connection arguments, not both")
        return service, False
    if source is not None:
        if url is not None:
            raise TypeError("pass the Redis URL once: as source or as url=")
        if isinstance(source, str):
            url = source
        else:
            url = source.redis_url
            namespace = source.namespace if namespace is None else namespace
    env = environ()
    if "shards=" in (url or env.get("REDIS_URL", "")) or env.get("REDISQ_SHARDS"):
        return _sharded(url, host, port, db, password, namespace), True
    return RedisService(host, port, db, password, url=url, namespace=namespace), True


def _sharded(
    url: str | None,
    host: str | None,
    port: int | None,
    db: int | None,
    password: str | None,
    namespace: str | None,
) -> RedisService:
    """The service for a namespace that may be sharded (``REDISQ_SHARDS`` or
    ``shards=`` in the URL): a ShardedRedisService when it has more than one shard."""
    from dataclasses import replace

    from redisq_server import EngineLimits
    from redisq_server.redis_client import connect_sync, resolve_url
    from redisq_server.sharding import ShardedRedisService, shards_for

    limits = EngineLimits.from_env()
    limits = replace(limits, namespace=namespace) if namespace is not None else limits
    resolved, extra = resolve_url(url, host, port, db, password)
    limits = shards_for(resolved, limits)
    if limits.shards == 1:
        return RedisService(host, port, db, password, url=url, namespace=namespace)
    return ShardedRedisService(client=connect_sync(resolved, **extra), limits=limits)


class NamespaceReader:
    """A reader of one namespace through a :class:`~redisq_server.RedisService`
    (``self.service``), the base of the monitors and the dashboard.

    Pass a Redis URL or an object with ``redis_url`` and ``namespace`` as ``source``
    (or ``url=``), or ``host``/``port``/``db``/``password``; with none of them the
    environment decides. ``namespace`` overrides the source's and the environment's.
    Or pass ``service=`` to share one :class:`~redisq_server.RedisService` (then no
    other argument). Nothing connects until the first read. Call :meth:`close`, or
    use the reader in a ``with`` block, when done.
    """

    def __init__(
        self,
        source: str | RedisTarget | None = None,
        *,
        url: str | None = None,
        host: str | None = None,
        port: int | None = None,
        db: int | None = None,
        password: str | None = None,
        namespace: str | None = None,
        service: RedisService | None = None,
    ) -> None:
        self.service, self._owns_service = open_service(
            source,
            url=url,
            host=host,
            port=port,
            db=db,
            password=password,
            namespace=namespace,
            service=service,
        )

    @property
    def namespace(self) -> str:
        """The key namespace this reader reads."""
        return self.service.limits.namespace

    def close(self) -> None:
        """Close the connection, unless it was passed in with ``service=``. Idempotent."""
        if self._owns_service:
            self._owns_service = False
            self.service.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
