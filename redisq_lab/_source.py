"""Where to connect: a URL, or anything that knows one (a local stack)."""

from __future__ import annotations

from typing import Any

from redisq_server.config import hub_url_from_env

__all__ = ["hub_url_of"]


def hub_url_of(source: Any = None, host: str | None = None, port: int | None = None) -> str:
    """The hub's ``ws://host:port`` from ``source`` (a URL string or an object with
    ``hub_url``), else from ``host``/``port``, else from ``HUB_URL`` or
    ``HUB_HOST``/``HUB_PORT`` in the environment (default ``ws://127.0.0.1:8000``)."""
    if isinstance(source, str):
        return source.rstrip("/")
    if source is not None:
        url = getattr(source, "hub_url", None)
        if not isinstance(url, str):
            raise TypeError(f"cannot find a hub URL in {source!r}")
        return url.rstrip("/")
    if host is not None or port is not None:
        return f"ws://{host or '127.0.0.1'}:{port or 8000}"
    return hub_url_from_env()
