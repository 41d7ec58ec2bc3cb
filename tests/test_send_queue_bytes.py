"""A socket that never reads cannot grow a hub's memory: its send queue is bounded in
bytes as well as in frames.

The probe runs the hub as its own process and reads its resident memory from
``/proc``: a client pipelines ``get_job_status`` for its own job, whose result is
1 MiB, and never reads a reply. Each reply is a 1 MiB frame; without a byte bound
the hub held up to ``HUB_SEND_QUEUE`` (1,024) of them, about 1 GiB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from .helpers import wait_for
from .peers import Peer, open_worker
from .test_faults import LiveHub

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the hub's memory from /proc"
)

MIB = 1024 * 1024
RESULT_BYTES = 1 * MIB
REQUESTS = 600  # replies worth 600 MiB if nothing bounded them
QUEUE_BYTES = 8 * MIB


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (``VmRSS``) or its peak so far (``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def test_a_socket_that_never_reads_is_closed_before_the_hub_grows(
    redis_url: str, namespace: str
) -> None:
    hub = LiveHub(redis_url, namespace, env={"HUB_SEND_QUEUE_BYTES": str(QUEUE_BYTES)})
    try:
        owner = await Peer.open(f"{hub.url}/ws/client/c1")
        worker = await open_worker(hub.url, "m1:gpu0", ["t"])
        await owner.request({"type": "submit_job", "job_type": "t", "job_id": "big-1"})
        job = await worker.expect("job_assigned")
        result = {"blob": "x" * RESULT_BYTES}
        await worker.send(
            {"type": "complete_job", "job_id": "big-1", "attempt": job["attempt"], "result": result}
        )
        assert (await owner.expect("job_completed"))["result"] == result
        reply = await owner.request({"type": "get_job_status", "job_id": "big-1"})
        assert len(json.dumps(reply)) > RESULT_BYTES  # each reply is a 1 MiB frame
        before = rss_mib(hub.pid)

        slow = await Peer.open(f"{hub.url}/ws/client/c1")
        slow.ws.transport.pause_reading()  # never reads a reply
        request = json.dumps({"type": "get_job_status", "job_id": "big-1"})
        sent = 0
        try:
            for _ in range(REQUESTS):
                await slow.ws.send(request)
                sent += 1
        except ConnectionClosed:
            pass

        async def closed() -> bool:
            return "send queue full" in hub.output()

        await wait_for(closed, 60, "the hub to close the slow socket")
        peak = rss_mib(hub.pid, "VmHWM")
        grown = peak - before
        print(f"hub RSS {before:.0f} MiB before, peak {peak:.0f} MiB ({sent} requests sent)")
        assert grown < 100, f"the hub grew by {grown:.0f} MiB for one slow socket"

        slow.ws.transport.resume_reading()
        with pytest.raises(ConnectionClosed) as err:
            while True:
                await slow.recv(timeout=30)
        rcvd = err.value.rcvd  # None: the close frame was stuck behind replies; aborted
        assert rcvd is None or (
            rcvd.code == 1008 and rcvd.reason == "send queue full: reader too slow"
        )
        # the owner's other socket and the worker are unaffected
        again = await owner.request({"type": "get_job_status", "job_id": "big-1"})
        assert again["status"] == "completed"
        await owner.close()
        await worker.close()
    finally:
        assert hub.stop() == 0
