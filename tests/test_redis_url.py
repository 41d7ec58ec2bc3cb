"""A malformed Redis URL is one line on stderr and exit code 2, from ``redisq-server``
and from ``redisq``, before anything connects; never a traceback, never the password."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from redisq_lab import cli
from redisq_server.config import RedisURLError, check_redis_url

PASSWORD = "pa/ss"  # unencoded: a "/" ends the netloc early, the rest lands in port/path

BAD = {
    "port": "redis://localhost:notaport/0",
    "port range": "redis://localhost:99999/0",
    "scheme": "http://localhost:6379/0",
    "ipv6": "redis://[::1:6379/0",
    "option": "redis://localhost:6379/0?bogus_option=1",
    "option value": "redis://localhost:6379/0?socket_timeout=soon",
    "database": "redis://localhost:6379/zero",
    "unix without path": "unix://",
    "password in the port": f"redis://:{PASSWORD}@localhost:6379/0",
}
GOOD = [
    "redis://localhost:6379/0",
    "redis://localhost",
    "redis://:p%40ss@127.0.0.1:6379/2?socket_timeout=5&max_connections=10",
    "redis://[::1]:6379/0",
    "rediss://:pw@redis.internal:6380/0?ssl_ca_certs=/ca.crt&ssl_cert_reqs=required&ssl_check_hostname=true",
    "unix:///run/redis.sock?db=1",
    "redis+cluster://node1:7000",
    "rediss+cluster://node1:7000?read_from_replicas=true",
]


@pytest.mark.parametrize("url", GOOD)
def test_usable_urls_pass(url: str) -> None:
    assert check_redis_url(url) == url


@pytest.mark.parametrize("url", BAD.values(), ids=BAD.keys())
def test_malformed_urls_are_one_line_errors(url: str) -> None:
    with pytest.raises(RedisURLError, match=r"^bad Redis URL: ") as err:
        check_redis_url(url)
    text = str(err.value)
    assert "\n" not in text and "ss@" not in text and PASSWORD not in text


@pytest.mark.parametrize("url", BAD.values(), ids=BAD.keys())
def test_redisq_server_says_one_line_and_exits_2(url: str) -> None:
    env = {**os.environ, "REDIS_URL": url}
    proc = subprocess.run(
        [sys.executable, "-m", "redisq_server", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("redisq-server: bad Redis URL: "), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "ss@" not in proc.stderr


@pytest.mark.parametrize("url", BAD.values(), ids=BAD.keys())
def test_redisq_says_one_line_and_exits_2(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    assert cli.main(["summary"]) == 2
    assert cli.main(["--redis-url", url, "jobs", "--status", "queued"]) == 2
    assert cli.main(["--redis-url", url, "serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("redisq: bad Redis URL: ") for line in lines)
    assert "Traceback" not in err and "ss@" not in err
