"""Live notebook widgets: updated from tasks on the kernel's running loop.

Widgets are updated by setting traits (never by printing from a background task),
throttled to a few refreshes a second, and stop with ``.stop()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import ipywidgets

__all__ = ["LiveHTML", "running_loop"]


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop (a Jupyter kernel has one), or None in a plain script."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class LiveHTML(ipywidgets.HTML):  # type: ignore[misc]
    """An HTML widget whose value is ``render()``, refreshed every ``interval`` s.

    Without a running loop it renders once. Call :meth:`stop` to end the refresh
    (it also ends when the render raises).
    """

    def __init__(self, render: Callable[[], str], interval: float = 0.5, **kw: Any) -> None:
        super().__init__(value=render(), **kw)
        self._render = render
        self.interval = max(0.1, interval)
        loop = running_loop()
        self.task: asyncio.Task[None] | None = (
            loop.create_task(self._refresh()) if loop is not None else None
        )

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.value = self._render()
            except Exception:
                return

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
