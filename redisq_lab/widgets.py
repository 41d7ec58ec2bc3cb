"""Live notebook widgets: updated from tasks on the kernel's running loop.

Widgets are updated by setting traits (never by printing from a background task),
throttled to a few refreshes a second, and stop with ``.stop()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import ipywidgets

__all__ = ["LiveCard", "LiveHTML", "running_loop"]


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


class LiveCard(ipywidgets.VBox):  # type: ignore[misc]
    """A card that refreshes itself: a summary above a section that folds open.

    ``render()`` returns ``(summary_html, fold_title, fold_html)``; it runs in a
    worker thread every ``interval`` s (so a blocking read never stalls the loop)
    and the widgets are updated on the loop. The fold is an ``Accordion``, so it
    stays open or closed across refreshes (an HTML ``<details>`` would snap shut
    each time). The refresh ends after the render that finds ``done()`` true, when
    the render raises, or on :meth:`stop`. Without a running loop it renders once.
    """

    def __init__(
        self,
        render: Callable[[], tuple[str, str, str]],
        interval: float = 0.5,
        *,
        done: Callable[[], bool] | None = None,
        **kw: Any,
    ) -> None:
        summary, title, fold = render()
        self.summary = ipywidgets.HTML(value=summary)
        self.fold_html = ipywidgets.HTML(value=fold)
        self.fold = ipywidgets.Accordion(children=[self.fold_html], titles=(title,))
        self.fold.selected_index = None
        super().__init__(children=[self.summary, self.fold], **kw)
        self._render = render
        self._done = done
        self.interval = max(0.1, interval)
        loop = running_loop()
        self.task: asyncio.Task[None] | None = (
            loop.create_task(self._refresh()) if loop is not None and not self.finished else None
        )

    @property
    def finished(self) -> bool:
        """True once ``done()`` holds: the card shows its last state."""
        return self._done is not None and self._done()

    def _show(self, parts: tuple[str, str, str]) -> None:
        summary, title, fold = parts
        self.summary.value = summary
        self.fold_html.value = fold
        if tuple(self.fold.titles) != (title,):
            self.fold.titles = (title,)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            last = self.finished  # checked first: this render then shows the end state
            try:
                parts = await asyncio.to_thread(self._render)
            except Exception:
                return
            self._show(parts)
            if last:
                return

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
