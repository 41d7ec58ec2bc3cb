"""Configuration from the environment (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from redisq_server.config import ENV, EngineLimits, Settings, hub_url_from_env, redis_url_from_env
from redisq_server.main import settings_from_args


def test_seed_variables_build_the_url() -> None:
    env = {
        "REDIS_HOST": "db.local",
        "REDIS_PORT": "6390",
        "REDIS_DB": "2",
        "REDIS_PASSWORD": "p@ss:w",
    }
    assert redis_url_from_env(env) == "redis://:p%40ss%3Aw@db.local:6390/2"
    assert redis_url_from_env({**env, "REDIS_URL": "rediss://x:1/0"}) == "rediss://x:1/0"
    assert redis_url_from_env({}) == "redis://localhost:6379/0"


def test_every_variable_is_read() -> None:
    env = {
        "REDIS_URL": "redis://127.0.0.1:7000/1",
        "LOG_LEVEL": "DEBUG",
        "HUB_HOST": "0.0.0.0",
        "HUB_PORT": "9000",
        "HUB_ID": "hub-a",
        "HUB_PROCESSES": "3",
        "HUB_DEBUG": "1",
        "REDISQ_NAMESPACE": "lab",
        "REDISQ_LEASE_S": "5.5",
        "REDISQ_RESULT_TTL_S": "60",
        "REDISQ_EVENTS_MAXLEN": "1000",
        "REDISQ_MAX_LOST": "7",
        "REDISQ_BACKOFF_BASE_S": "0.5",
        "REDISQ_BACKOFF_MAX_S": "9",
        "REDISQ_MAX_ATTEMPTS": "4",
        "REDISQ_AGING_S": "2.5",
        "REDISQ_FAIR_SHARE": "client",
        "REDISQ_SHARDS": "3",
        "REDISQ_MAX_PARAMS_BYTES": "100",
        "REDISQ_MAX_RESULT_BYTES": "200",
        "HUB_MAX_FRAME_BYTES": "300",
        "HUB_SEND_QUEUE": "10",
        "HUB_SEND_QUEUE_BYTES": "4096",
        "HUB_MAX_SUBSCRIPTIONS": "11",
        "HUB_MAX_CONNECTIONS": "12",
        "REDISQ_CLIENT_TOKEN": "c",
        "REDISQ_WORKER_TOKEN": "w",
        "REDISQ_MONITOR_TOKEN": "m",
        "REDISQ_AUTH_SECRETS": "k1,k2",
    }
    url_parts = {"REDIS_HOST", "REDIS_PORT", "REDIS_DB", "REDIS_PASSWORD", "HUB_URL"}
    assert set(env) | url_parts == set(ENV)
    s = Settings.from_env(env)
    assert s.redis_url == "redis://127.0.0.1:7000/1"
    assert (s.log_level, s.hub_host, s.hub_port, s.hub_id, s.debug) == (
        "DEBUG",
        "0.0.0.0",
        9000,
        "hub-a",
        True,
    )
    lim = s.limits
    assert (lim.namespace, lim.lease_s, lim.result_ttl_s, lim.events_maxlen) == (
        "lab",
        5.5,
        60,
        1000,
    )
    assert (lim.max_lost, lim.backoff_base_s, lim.backoff_max_s, lim.default_max_attempts) == (
        7,
        0.5,
        9.0,
        4,
    )
    assert (lim.max_params_bytes, lim.max_result_bytes) == (100, 200)
    assert lim.policy == {"aging_s": 2.5, "fair_share": "client"}
    assert (s.max_frame_bytes, s.send_queue_frames, s.max_subscriptions, s.max_connections) == (
        300,
        10,
        11,
        12,
    )
    assert (s.client_token, s.worker_token, s.monitor_token) == ("c", "w", "m")
    assert s.send_queue_bytes == 4096
    assert s.processes == 3
    assert s.auth_secrets == "k1,k2"
    assert "k1" not in repr(s) and "'c'" not in repr(s)  # tokens and secrets stay out of repr()


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUB_PORT", "9000")
    monkeypatch.setenv("REDISQ_NAMESPACE", "envns")
    s = settings_from_args(["--port", "0", "--namespace", "flagns", "--debug"])
    assert s.hub_port == 0 and s.limits.namespace == "flagns" and s.debug


def test_policies_default_to_strict_and_refuse_bad_values() -> None:
    assert Settings.from_env({}).limits.policy == {"aging_s": 0.0, "fair_share": "off"}
    with pytest.raises(ValueError, match="aging_s"):
        Settings.from_env({"REDISQ_AGING_S": "-1"})
    with pytest.raises(ValueError, match="aging_s"):
        Settings.from_env({"REDISQ_AGING_S": "3601"})
    with pytest.raises(ValueError, match="fair_share"):
        Settings.from_env({"REDISQ_FAIR_SHARE": "job_type"})


def test_bad_numbers_are_reported() -> None:
    with pytest.raises(ValueError, match="HUB_PORT"):
        Settings.from_env({"HUB_PORT": "eighty"})


def test_readme_documents_every_variable() -> None:
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for var in ENV:
        assert f"| `{var}` |" in readme, var


def test_lab_and_engine_read_the_same_environment() -> None:
    """One reader: the engine's limits and the lab's hub address come from config."""
    env = {"REDISQ_NAMESPACE": "lab", "REDISQ_LEASE_S": "4", "HUB_PORT": "9001"}
    assert EngineLimits.from_env(env) == EngineLimits(namespace="lab", lease_s=4.0)
    assert hub_url_from_env(env) == "ws://127.0.0.1:9001"
    assert hub_url_from_env({**env, "HUB_URL": "ws://h:1/"}) == "ws://h:1"
    assert hub_url_from_env({}) == "ws://127.0.0.1:8000"


def test_only_config_reads_the_environment() -> None:
    root = Path(__file__).resolve().parents[1]
    readers = [
        str(p.relative_to(root))
        for folder in ("server/redisq_server", "redisq_lab")
        for p in sorted((root / folder).rglob("*.py"))
        if "os.environ" in p.read_text() or "os.getenv" in p.read_text()
    ]
    assert readers == ["server/redisq_server/config.py"]
