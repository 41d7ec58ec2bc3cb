"""What the browser tests share: Debian's Chromium, how to launch it, where shots go."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
#: headless, and quiet: no background requests to hosts this machine cannot reach
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def http_get(url: str) -> tuple[int, str, bytes]:
    """Status, content type and body of ``url`` (an HTTP error is an answer too)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


@dataclass
class HubPage:
    """A page a hub serves, what it requested and its script errors."""

    page: Any
    hub: Any  # redisq_server.main.Hub
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def loc(self, selector: str) -> Any:
        return self.page.locator(selector)

    def listen(self) -> None:
        """Record the page's requests, sockets and script errors from now on."""
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("websocket", lambda ws: self.requests.append(ws.url))
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def strays(self) -> list[str]:
        """The requests that went anywhere but the hub that served the page."""
        origins = {f"http://127.0.0.1:{self.hub.port}/", f"ws://127.0.0.1:{self.hub.port}/"}
        return [u for u in self.requests if not any(u.startswith(o) for o in origins)]


needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (WITH_BROWSER=1 scripts/setup.sh)",
)
