"""Shared fixtures: one private redis-server per test session, a fresh namespace per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator

import pytest

from redisq_lab.redis_process import RedisProcess
from redisq_server import AsyncRedisService, EngineLimits, RedisService
from redisq_server.main import Hub

from .cluster import RedisClusterProcess, cluster_tools_missing
from .helpers import hub_settings

_counter = itertools.count()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcess]:
    """A private 3-master cluster for each test module that asks, torn down after it."""
    missing = cluster_tools_missing()
    if missing:
        pytest.skip(missing)
    with RedisClusterProcess(masters=3) as c:
        yield c


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    """A redis-server started for this test session on a free loopback port."""
    with RedisProcess() as proc:
        yield proc


@pytest.fixture(scope="session")
def redis_url(redis_proc: RedisProcess) -> str:
    return redis_proc.url


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses: tests never share keys."""
    return f"t{os.getpid()}x{next(_counter)}"


@pytest.fixture
def limits(namespace: str) -> EngineLimits:
    return EngineLimits(namespace=namespace, backoff_base_s=0.05, backoff_max_s=0.2)


@pytest.fixture
async def svc(redis_url: str, limits: EngineLimits) -> AsyncIterator[AsyncRedisService]:
    service = AsyncRedisService(redis_url, limits=limits)
    yield service
    await service.aclose()


@pytest.fixture
def sync_svc(redis_url: str, limits: EngineLimits) -> Iterator[RedisService]:
    with RedisService(url=redis_url, limits=limits) as service:
        yield service


@pytest.fixture
async def hub(redis_url: str, limits: EngineLimits) -> AsyncIterator[Hub]:
    """A hub in this process on the test's Redis and namespace."""
    async with Hub(hub_settings(redis_url, limits)) as h:
        yield h
