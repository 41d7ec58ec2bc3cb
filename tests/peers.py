"""A raw protocol peer for hub tests: send dicts, await the next frame of a type."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


class Peer:
    """One WebSocket connection speaking raw protocol v1 frames."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []
        self.backlog: list[dict[str, Any]] = []  # received, not yet matched by expect()
        self.registered: dict[str, Any] = {}  # a worker socket's worker_registered
        self._n = 0

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Peer:
        ws = await connect(url, max_size=None, compression=None, **kwargs)
        peer = cls(ws)
        welcome = await peer.recv()
        assert welcome["type"] == "welcome", welcome
        return peer

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def request(self, message: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """Send with a fresh ``id`` and return the reply whose ``ref`` matches."""
        self._n += 1
        rid = f"r{self._n}"
        await self.send({**message, "id": rid})
        return await self.expect(lambda m: m.get("ref") == rid, timeout)

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        msg = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.seen.append(msg)
        return msg  # type: ignore[no-any-return]

    async def expect(self, match: Any, timeout: float = 10) -> dict[str, Any]:
        """The next frame for which ``match(msg)`` is true (a str matches ``type``)."""
        pred = (lambda m: m.get("type") == match) if isinstance(match, str) else match
        for i, msg in enumerate(self.backlog):
            if pred(msg):
                return self.backlog.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            if pred(msg):
                return msg
            self.backlog.append(msg)

    async def close(self) -> None:
        await self.ws.close()


async def open_worker(
    url: str,
    worker_id: str,
    job_types: list[str],
    prefetch: int = 0,
    closed_session: str | None = None,
    **kwargs: Any,
) -> Peer:
    """A registered worker socket (with prefetch window ``prefetch``; naming the
    session of its previous socket closed for an outage, if given)."""
    peer = await Peer.open(f"{url}/ws/worker/{worker_id}", **kwargs)
    register: dict[str, Any] = {"type": "register_worker", "job_types": job_types}
    if prefetch:
        register["prefetch"] = prefetch
    if closed_session is not None:
        register["closed_session"] = closed_session
    reply = await peer.request(register)
    assert reply["type"] == "worker_registered", reply
    peer.registered = reply
    return peer


async def serve_jobs(peer: Peer, done: list[str], result: Any = None) -> None:
    """Complete every pushed job at once until the socket closes."""
    try:
        while True:
            m = await peer.expect("job_assigned", timeout=3600)
            await peer.send(
                {
                    "type": "complete_job",
                    "job_id": m["job_id"],
                    "attempt": m["attempt"],
                    "result": result if result is not None else {"by": "peer"},
                }
            )
            done.append(m["job_id"])
    except Exception:
        return
