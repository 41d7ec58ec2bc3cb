"""The Redis key schema: every key the queue uses, in one place.

All keys of a namespace share the hash tag ``{ns}`` so that multi-key scripts are
valid on Redis Cluster (one namespace lives in one hash slot; more namespaces spread
over more shards). A namespace split into shards (``REDISQ_SHARDS``) has one hash
tag per shard, :func:`shard_tag`: shard 0 keeps ``{ns}``, so one shard is the
unsharded layout key for key. The Lua scripts get the same names from
:func:`lua_prelude` (relative to the prefix each call passes), generated from the
table below, so Python and Lua cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Final

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

__all__ = ["KEY_TEMPLATES", "Keys", "lua_prelude", "shard_tag", "validate_namespace"]

#: name -> template relative to the namespace prefix; ``{}`` takes one argument.
KEY_TEMPLATES: Final[dict[str, str]] = {
    "job": "job:{}",  # HASH, one job (expires result_ttl after it finishes)
    "queue": "queue:{}",  # ZSET per job type: queued ids by queue_score
    "depth": "depth:{}",  # HASH per job type: priority -> queued count
    # fair share per client: per type and client (arg "type:client") a ZSET of that
    # client's queued jobs by queue score; the type's queue then holds each one's head
    "sub": "sub:{}",
    "subs": "subs:{}",  # SET per job type: client ids with a non-empty sub-queue
    "worker": "worker:{}",  # HASH, one worker (GPU socket)
    "idle": "idle:{}",  # ZSET per job type: idle workers by idle-since time
    "done": "done:{}",  # ZSET per terminal status: job ids by finish time (trimmed to TTL)
    "workers": "workers",  # ZSET: live workers by liveness deadline
    "leases": "leases",  # ZSET: assigned/running job ids by lease deadline
    "delayed": "delayed",  # ZSET: retrying and scheduled job ids by due time
    "scheduled": "scheduled",  # ZSET: the scheduled (delayed-start) ones among them
    "events": "events",  # STREAM: every lifecycle event, capped
    # HASH: O(1) counters: submitted/completed/failed/cancelled per job type ("completed:T";
    # their totals are sums, operations.stats), retried and requeued as totals
    "stats": "stats",
    "policy": "policy",  # HASH: the scheduling policy the hubs run (written at hub start)
    "seq": "seq",  # STRING: submission sequence (FIFO within a priority)
    "types": "types",  # SET: every job type seen (submitted or accepted)
    "hubs": "hubs",  # ZSET: live hubs by liveness deadline
    "clients": "clients:{}",  # SET per hub: client ids with a socket on that hub
    "inbox": "inbox:{}",  # STREAM per hub: events for its sockets from others' calls
    "avoid": "avoid",  # ZSET: requeued jobs avoiding the machine that lost them, by end time
    "avoided": "avoided:{}",  # SET per machine: the jobs avoiding it (while any do)
}

_NS_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if usable inside a hash tag, else raise ValueError."""
    if not _NS_RE.fullmatch(namespace):
        raise ValueError(f"namespace {namespace!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    return namespace


#: the thirds of the slot space a standard 3-master cluster gives each master
_THIRDS: Final = 3


def _third(tag: str) -> int:
    """Which third of the 16384 slots the slot of ``tag`` lies in (0, 1 or 2)."""
    return key_slot(tag.encode()) * _THIRDS // REDIS_CLUSTER_HASH_SLOTS


def _inner(tag: str) -> bool:
    """True if the slot of ``tag`` lies in the middle half of its third: far from
    the edges, so a split that is not exactly even still puts it on that third's
    master."""
    size = REDIS_CLUSTER_HASH_SLOTS / _THIRDS
    offset = key_slot(tag.encode()) - _third(tag) * size
    return size / 4 <= offset < 3 * size / 4


@cache
def _tags(namespace: str, count: int) -> tuple[str, ...]:
    """The hash tags of shards 0 .. count-1 (see :func:`shard_tag`)."""
    tags = [validate_namespace(namespace)]
    base = _third(namespace)
    n = 0
    while len(tags) < count:
        want = (base + len(tags)) % _THIRDS
        while True:
            tag = f"{namespace}:{n}"
            n += 1
            if _third(tag) == want and _inner(tag):
                tags.append(tag)
                break
    return tuple(tags)


def shard_tag(namespace: str, shard: int) -> str:
    """The hash tag of shard ``shard`` of ``namespace`` (its keys are ``{tag}:...``).

    Shard 0's tag is ``namespace`` itself (one shard is today's layout). Shard
    ``i >= 1`` takes the next ``namespace:n`` (n = 0, 1, 2, ... in turn, none used
    twice) whose slot lies in the middle half of third ``(t0 + i) mod 3`` of the
    16384 slots, ``t0`` being the third of shard 0's slot. A 3-master cluster split
    by ``redis-cli --cluster create`` gives each master one third, so consecutive
    shards sit on different masters (and any three consecutive shards on all three).
    A shard's tag does not depend on how many shards there are. ``:`` is not allowed
    in a namespace, so no shard's tag is another namespace's."""
    if shard < 0:
        raise ValueError(f"shard {shard}: expected 0 or more")
    return _tags(namespace, shard + 1)[shard]


@dataclass(frozen=True)
class Keys:
    """Key names for one namespace (one shard of it), e.g.
    ``Keys("redisq").job("j1") == "{redisq}:job:j1"``; ``Keys("redisq", shard=1)``
    names the same keys under shard 1's tag (:func:`shard_tag`)."""

    namespace: str = "redisq"
    shard: int = 0

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)
        if self.shard < 0:
            raise ValueError(f"shard {self.shard}: expected 0 or more")

    @property
    def tag(self) -> str:
        """The hash tag of this shard's keys (the namespace itself for shard 0)."""
        return shard_tag(self.namespace, self.shard) if self.shard else self.namespace

    @property
    def prefix(self) -> str:
        return "{" + self.tag + "}:"

    def job(self, job_id: str) -> str:
        return self.prefix + KEY_TEMPLATES["job"].format(job_id)

    def queue(self, job_type: str) -> str:
        return self.prefix + KEY_TEMPLATES["queue"].format(job_type)

    def depth(self, job_type: str) -> str:
        return self.prefix + KEY_TEMPLATES["depth"].format(job_type)

    def sub(self, job_type: str, client_id: str) -> str:
        """The fair-share sub-queue of ``client_id``'s jobs of ``job_type`` ('' for
        jobs submitted with no client id)."""
        return self.prefix + KEY_TEMPLATES["sub"].format(f"{job_type}:{client_id}")

    def subs(self, job_type: str) -> str:
        return self.prefix + KEY_TEMPLATES["subs"].format(job_type)

    def worker(self, worker_id: str) -> str:
        return self.prefix + KEY_TEMPLATES["worker"].format(worker_id)

    def idle(self, job_type: str) -> str:
        return self.prefix + KEY_TEMPLATES["idle"].format(job_type)

    def done(self, status: str) -> str:
        return self.prefix + KEY_TEMPLATES["done"].format(status)

    @property
    def workers(self) -> str:
        return self.prefix + KEY_TEMPLATES["workers"]

    @property
    def leases(self) -> str:
        return self.prefix + KEY_TEMPLATES["leases"]

    @property
    def delayed(self) -> str:
        return self.prefix + KEY_TEMPLATES["delayed"]

    @property
    def scheduled(self) -> str:
        return self.prefix + KEY_TEMPLATES["scheduled"]

    @property
    def events(self) -> str:
        return self.prefix + KEY_TEMPLATES["events"]

    @property
    def stats(self) -> str:
        return self.prefix + KEY_TEMPLATES["stats"]

    @property
    def policy(self) -> str:
        return self.prefix + KEY_TEMPLATES["policy"]

    @property
    def seq(self) -> str:
        return self.prefix + KEY_TEMPLATES["seq"]

    @property
    def types(self) -> str:
        return self.prefix + KEY_TEMPLATES["types"]

    @property
    def hubs(self) -> str:
        return self.prefix + KEY_TEMPLATES["hubs"]

    def clients(self, hub_id: str) -> str:
        return self.prefix + KEY_TEMPLATES["clients"].format(hub_id)

    def inbox(self, hub_id: str) -> str:
        return self.prefix + KEY_TEMPLATES["inbox"].format(hub_id)

    @property
    def avoid(self) -> str:
        return self.prefix + KEY_TEMPLATES["avoid"]

    def avoided(self, machine_id: str) -> str:
        return self.prefix + KEY_TEMPLATES["avoided"].format(machine_id)


def lua_prelude() -> str:
    """Lua that defines ``K.<name>(arg)`` for every template, relative to ``P``.

    Every script starts with ``local P = ARGV[1]`` (the namespace prefix).
    """
    lines = ["local K = {}"]
    for name, template in KEY_TEMPLATES.items():
        if "{}" in template:
            head, tail = template.split("{}")
            tail_expr = f" .. '{tail}'" if tail else ""
            lines.append(f"K.{name} = function(x) return P .. '{head}' .. x{tail_expr} end")
        else:
            lines.append(f"K.{name} = function() return P .. '{template}' end")
    return "\n".join(lines) + "\n"
