"""The private Redis Cluster of the tests: the lab's (``redisq_lab.redis_cluster``)."""

from __future__ import annotations

from redisq_lab.redis_cluster import HOST, RedisClusterProcess, cluster_tools_missing

__all__ = ["HOST", "RedisClusterProcess", "cluster_tools_missing"]
