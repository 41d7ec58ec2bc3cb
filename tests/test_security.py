"""Security: role tokens, isolation between clients, read-only monitors, the debug
page, a Redis password and TLS end to end, and secrets kept out of the logs.

See docs/security.md for the threat model these tests pin down.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from redisq_lab import cli
from redisq_lab.client import QueueClient
from redisq_lab.mock_worker import MockWorker
from redisq_lab.redis_process import RedisProcess, free_port
from redisq_server import AsyncRedisService, EngineLimits, RedisService
from redisq_server.auth import sign
from redisq_server.main import Hub

from .helpers import hub_settings, namespace_keys, wait_for
from .peers import Peer, open_worker
from .test_faults import LiveHub

TOKENS = {"client": "cl-7Hq2xN9s", "worker": "wk-Lr4pZ8mV", "monitor": "mo-Bt6yK1cE"}
PATHS = {"client": "/ws/client/c1", "worker": "/ws/worker/m1:gpu0", "monitor": "/ws/monitor/m1"}


def http_get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


async def aget(url: str) -> tuple[int, bytes, str]:
    return await asyncio.get_running_loop().run_in_executor(None, http_get, url)


@pytest.fixture
async def locked_hub(redis_url: str, limits: EngineLimits) -> AsyncIterator[Hub]:
    settings = hub_settings(
        redis_url,
        limits,
        client_token=TOKENS["client"],
        worker_token=TOKENS["worker"],
        monitor_token=TOKENS["monitor"],
    )
    async with Hub(settings) as hub:
        yield hub


# ------------------------------------------------------------------------ tokens


@pytest.mark.parametrize("role", ["client", "worker", "monitor"])
async def test_each_role_needs_its_own_token(locked_hub: Hub, role: str) -> None:
    url = locked_hub.url + PATHS[role]
    token = TOKENS[role]
    refused = [
        {},  # none
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {token[:-1]}"},  # a prefix
        {"Authorization": f"Bearer {token}x"},  # longer
        {"Authorization": f"Basic {token}"},  # not a bearer token, and no query token
        *({"Authorization": f"Bearer {TOKENS[other]}"} for other in TOKENS if other != role),
    ]
    for headers in refused:
        with pytest.raises(InvalidStatus) as err:
            await connect(url, additional_headers=headers)
        assert err.value.response.status_code == 401, headers
        body = json.loads(err.value.response.body)
        assert body == {"error": f"{role} token required"}
    for other in TOKENS:
        if other != role:
            with pytest.raises(InvalidStatus):
                await connect(f"{url}?token={TOKENS[other]}")
    # accepted: the header, or the query string
    a = await Peer.open(url, additional_headers={"Authorization": f"Bearer {token}"})
    b = await Peer.open(f"{url}?token={quote(token)}")
    assert a.seen[0]["role"] == b.seen[0]["role"] == role
    await a.close()
    await b.close()


async def test_refusals_and_health_reveal_nothing(locked_hub: Hub, redis_url: str) -> None:
    status, body, kind = await aget(f"http://127.0.0.1:{locked_hub.port}/health")
    assert status == 200 and kind == "application/json"
    health = json.loads(body)
    fields = {"status", "redis", "hub", "version", "protocol", "policy", "connections"}
    assert set(health) == fields  # the scheduling policy is no secret: two settings
    assert set(health["policy"]) == {"aging_s", "fair_share"}
    text = body.decode()
    assert not any(t in text for t in TOKENS.values())
    assert redis_url not in text and str(locked_hub.settings.redis_url) not in text
    with pytest.raises(InvalidStatus) as err:
        await connect(locked_hub.url + PATHS["client"])
    assert not any(t in err.value.response.body.decode() for t in TOKENS.values())


async def test_token_identifies_the_role_not_the_client(locked_hub: Hub) -> None:
    """Plainly: whoever holds the client token may connect as any client id, and
    so see and cancel that id's jobs (docs/security.md: put an authenticating proxy
    in front, or give tenants separate namespaces)."""
    auth = {"Authorization": f"Bearer {TOKENS['client']}"}
    alice = await Peer.open(f"{locked_hub.url}/ws/client/alice", additional_headers=auth)
    job = (await alice.request({"type": "submit_job", "job_type": "t"}))["job_id"]
    mallory = await Peer.open(f"{locked_hub.url}/ws/client/alice", additional_headers=auth)
    st = await mallory.request({"type": "cancel_job", "job_id": job})
    assert st["status"] == "cancelled"
    await alice.close()
    await mallory.close()


# ----------------------------------------------------------------- signed tokens

SECRET = "s3cret-for-signing-tokens-0123456789abcdef"
OLD_SECRET = "an-older-secret-still-verifying-0123456789"


@pytest.fixture
async def signing_hub(redis_url: str, limits: EngineLimits) -> AsyncIterator[Hub]:
    """A hub with signing secrets (the new one first) and no static worker or monitor
    token, but a static client token."""
    settings = hub_settings(
        redis_url,
        limits,
        client_token=TOKENS["client"],
        auth_secrets=f"{SECRET},{OLD_SECRET}",
    )
    async with Hub(settings) as hub:
        yield hub


async def _refused(url: str, token: str | None, how: str = "header") -> int:
    """The HTTP status a handshake to ``url`` with ``token`` gets (it must be refused)."""
    headers = {"Authorization": f"Bearer {token}"} if token and how == "header" else {}
    target = f"{url}?token={quote(token, safe='')}" if token and how == "query" else url
    with pytest.raises(InvalidStatus) as err:
        await connect(target, additional_headers=headers)
    body = err.value.response.body.decode()
    assert token is None or token not in body
    return int(err.value.response.status_code)


@pytest.mark.parametrize("how", ["header", "query"])
async def test_a_signed_token_opens_only_its_own_endpoint(signing_hub: Hub, how: str) -> None:
    url = signing_hub.url
    alice = sign([SECRET], "client", "alice")
    m1 = sign([OLD_SECRET], "worker", "m1")  # signed with the older secret: still valid
    wall = sign([SECRET], "monitor", "wall")
    opened = {
        "/ws/client/alice": alice,
        "/ws/worker/m1:gpu0": m1,
        "/ws/worker/m1:gpu3": m1,
        "/ws/monitor/wall": wall,
    }
    for path, token in opened.items():
        kw: dict[str, Any] = {}
        target = url + path
        if how == "header":
            kw["additional_headers"] = {"Authorization": f"Bearer {token}"}
        else:
            target += f"?token={token}"
        peer = await Peer.open(target, **kw)
        assert peer.seen[0]["id"] == path.rsplit("/", 1)[1]
        await peer.close()
    forbidden = {  # a valid token, for another id or role: 403
        "/ws/client/bob": alice,
        "/ws/client/alice2": alice,
        "/ws/monitor/alice": alice,
        "/ws/worker/alice:gpu0": alice,
        "/ws/worker/m2:gpu0": m1,
        "/ws/worker/m10:gpu0": m1,
        "/ws/client/m1": m1,
        "/ws/monitor/other": wall,
        "/ws/client/wall": wall,
    }
    for path, token in forbidden.items():
        assert await _refused(url + path, token, how) == 403, path
    now = time.time()
    unauthorized = {  # no valid credential: 401
        "missing": None,
        "expired": sign([SECRET], "client", "alice", ttl_s=1, now=now - 3),
        "forged": alice[:-3] + ("AAA" if not alice.endswith("AAA") else "BBB"),
        "unknown key": sign(["a-secret-this-hub-does-not-have-0123456789"], "client", "alice"),
        "static token of another role": TOKENS["client"],
    }
    for why, token in unauthorized.items():
        path = "/ws/worker/m1:gpu0" if why.startswith("static") else "/ws/client/alice"
        assert await _refused(url + path, token, how) == 401, why
    # the worker and monitor endpoints, with no static token, are closed too
    assert await _refused(url + "/ws/worker/m1:gpu0", None) == 401
    assert await _refused(url + "/ws/monitor/wall", None) == 401


async def test_static_tokens_keep_working_beside_signed_ones(signing_hub: Hub) -> None:
    """The static client token still opens any client id; a signed client token
    opens only its own. Jobs flow through the lab's tools with either."""
    url = signing_hub.url
    worker_token = sign([SECRET], "worker", "lab-m")
    async with (
        MockWorker("lab-m", 2, hub=url, job_types=["t"], run_time=0.0, token=worker_token),
        QueueClient(url, "carol", token=TOKENS["client"]) as static_client,
        QueueClient(url, "dave", token=sign([SECRET], "client", "dave")) as signed_client,
    ):
        for qc in (static_client, signed_client):
            result = await qc.result(await qc.submit("t", params={"x": 1}), timeout=30)
            assert result["worker_id"].startswith("lab-m:gpu")
    assert await _refused(url + "/ws/client/carol", sign([SECRET], "client", "dave")) == 403


async def test_a_stolen_client_token_cannot_reach_another_clients_jobs(
    signing_hub: Hub,
) -> None:
    """What ``test_token_identifies_the_role_not_the_client`` shows for the static
    token does not hold for signed tokens: mallory's token opens only mallory."""
    url = signing_hub.url
    alice = await Peer.open(
        f"{url}/ws/client/alice",
        additional_headers={"Authorization": f"Bearer {sign([SECRET], 'client', 'alice')}"},
    )
    job = (await alice.request({"type": "submit_job", "job_type": "t"}))["job_id"]
    mallory = sign([SECRET], "client", "mallory")
    assert await _refused(f"{url}/ws/client/alice", mallory) == 403
    other = await Peer.open(
        f"{url}/ws/client/mallory", additional_headers={"Authorization": f"Bearer {mallory}"}
    )
    err = await other.request({"type": "cancel_job", "job_id": job})
    assert err["code"] == "not_found"
    assert (await alice.request({"type": "get_job_status", "job_id": job}))["status"] == "queued"
    await alice.close()
    await other.close()


async def test_rotation_drops_the_old_secret_s_tokens(redis_url: str, limits: EngineLimits) -> None:
    """Rotate: every hub runs ``new,old`` (both kinds of token open), then ``new``
    alone (the old secret's tokens are refused; the new ones keep working)."""
    old_token = sign([OLD_SECRET], "client", "alice")
    new_token = sign([SECRET, OLD_SECRET], "client", "alice")
    for secrets, opens in ((f"{SECRET},{OLD_SECRET}", True), (SECRET, False)):
        async with Hub(hub_settings(redis_url, limits, auth_secrets=secrets)) as hub:
            url = f"{hub.url}/ws/client/alice"
            peer = await Peer.open(url, additional_headers={"Authorization": f"Bearer {new_token}"})
            await peer.close()
            if opens:
                peer = await Peer.open(f"{url}?token={old_token}")
                await peer.close()
            else:
                assert await _refused(url, old_token) == 401


async def test_the_token_command_signs_with_the_hubs_secret(
    signing_hub: Hub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDISQ_AUTH_SECRETS", f"{SECRET},{OLD_SECRET}")
    assert cli.main(["token", "--role", "worker", "--id", "cli-m", "--ttl", "60"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    token = out.strip()
    peer = await Peer.open(
        f"{signing_hub.url}/ws/worker/cli-m:gpu0",
        additional_headers={"Authorization": f"Bearer {token}"},
    )
    await peer.close()
    assert await _refused(f"{signing_hub.url}/ws/worker/other:gpu0", token) == 403
    # usage errors: one line, exit 2, no token printed
    for argv, env in (
        (["token", "--role", "client", "--id", "alice"], ""),
        (["token", "--role", "worker", "--id", "m1:gpu0"], SECRET),
        (["token", "--role", "client", "--id", "bad id"], SECRET),
        (["token", "--role", "client", "--id", "alice"], "too-short"),
    ):
        monkeypatch.setenv("REDISQ_AUTH_SECRETS", env)
        assert cli.main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1, captured
        assert "too-short" not in captured.err
    monkeypatch.setenv("REDISQ_AUTH_SECRETS", SECRET)
    assert cli.main(["token", "--role", "admin", "--id", "alice"]) == 2  # argparse
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------- isolation


async def test_clients_cannot_see_or_touch_each_others_jobs(
    redis_url: str, limits: EngineLimits
) -> None:
    async with Hub(hub_settings(redis_url, limits)) as hub:
        alice = await Peer.open(f"{hub.url}/ws/client/alice")
        bob = await Peer.open(f"{hub.url}/ws/client/bob")
        secret = {"prompt": "alice's private prompt"}
        acc = await alice.request(
            {"type": "submit_job", "job_type": "t", "params": secret, "job_id": "alice-job-1"}
        )
        job = acc["job_id"]
        sync = redis.Redis.from_url(redis_url, decode_responses=True)
        before = namespace_keys(sync, hub.svc.keys)
        unknown: list[dict[str, Any]] = []
        for kind in ("get_job_status", "subscribe_job", "cancel_job"):
            theirs = await bob.request({"type": kind, "job_id": job})
            nothing = await bob.request({"type": kind, "job_id": "no-such-job"})
            # the same answer as for a job that does not exist: no oracle, no details
            assert theirs["code"] == nothing["code"] == "not_found"
            assert theirs["message"].replace(job, "X") == nothing["message"].replace(
                "no-such-job", "X"
            )
            unknown.append(theirs)
        assert namespace_keys(sync, hub.svc.keys) == before  # nothing changed
        # a job id is unique per namespace: reusing alice's id is refused, and that
        # tells bob only that the id is taken (job ids are random by default)
        dup = await bob.request({"type": "submit_job", "job_type": "t", "job_id": job})
        assert dup["code"] == "duplicate"
        assert namespace_keys(sync, hub.svc.keys) == before

        # run it to the end with a worker: bob hears nothing of it, in pushes or events
        w = await open_worker(hub.url, "m1:gpu0", ["t"])
        a = await w.expect("job_assigned")
        await w.send({"type": "update_job_progress", "job_id": job, "attempt": 1, "progress": 50})
        await w.send({"type": "complete_job", "job_id": job, "attempt": 1, "result": "r"})
        done = await alice.expect("job_completed")
        assert done["job_id"] == job == a["job_id"]
        page = await bob.request({"type": "get_events", "since": "0", "limit": 10_000})
        assert page["events"] == []
        await bob.request({"type": "get_stats"})  # flush bob's socket
        assert not any(job in json.dumps(m) for m in bob.seen if m.get("type") != "error")
        assert not any("private prompt" in json.dumps(m) for m in bob.seen)
        # a worker may report on its own attempt only, and cannot read jobs at all
        w2 = await open_worker(hub.url, "m2:gpu0", ["other"])
        stale = await w2.request({"type": "complete_job", "job_id": job, "attempt": 1})
        assert stale["code"] in ("stale_attempt", "bad_state")
        read = await w2.request({"type": "get_job_status", "job_id": job})
        assert read["code"] == "not_allowed"
        for p in (alice, bob, w, w2):
            await p.close()
        sync.close()


async def test_monitors_are_read_only(redis_url: str, limits: EngineLimits) -> None:
    async with Hub(hub_settings(redis_url, limits)) as hub:
        c = await Peer.open(f"{hub.url}/ws/client/c1")
        job = (await c.request({"type": "submit_job", "job_type": "t"}))["job_id"]
        m = await Peer.open(f"{hub.url}/ws/monitor/dash")
        sync = redis.Redis.from_url(redis_url, decode_responses=True)
        before = namespace_keys(sync, hub.svc.keys)
        writes: list[dict[str, Any]] = [
            {"type": "submit_job", "job_type": "t"},
            {"type": "cancel_job", "job_id": job},
            {"type": "subscribe_job", "job_id": job},
            {"type": "register_worker", "job_types": ["t"]},
            {"type": "worker_heartbeat"},
            {"type": "update_job_progress", "job_id": job, "attempt": 1, "progress": 1},
            {"type": "complete_job", "job_id": job, "attempt": 1},
            {"type": "fail_job", "job_id": job, "attempt": 1, "error": "x"},
        ]
        for msg in writes:
            err = await m.request(msg)
            assert err["type"] == "error" and err["code"] == "not_allowed", (msg, err)
        # what a monitor may do: read (any job, stats, events), and nothing changes
        st = await m.request({"type": "get_job_status", "job_id": job})
        assert st["type"] == "job_status" and st["status"] == "queued"
        assert (await m.request({"type": "get_stats"}))["type"] == "stats"
        assert (await m.request({"type": "get_events", "since": "0"}))["events"]
        assert (await m.request({"type": "subscribe_events"}))["type"] == "subscribed"
        assert (await m.request({"type": "subscribe_stats", "interval_ms": 1000}))["type"] == (
            "stats"
        )
        assert namespace_keys(sync, hub.svc.keys) == before
        await m.close()
        await c.close()
        sync.close()


# ------------------------------------------------------------------- debug page


async def test_debug_page_is_off_unless_enabled(
    locked_hub: Hub, redis_url: str, limits: EngineLimits
) -> None:
    for path in ("/debug", "/debug/", "/debug?x=1", "/static/ws_debug.html", "/ws_debug.html"):
        status, _, _ = await aget(f"http://127.0.0.1:{locked_hub.port}{path}")
        assert status == 404, path
    settings = hub_settings(
        redis_url,
        limits,
        debug=True,
        client_token=TOKENS["client"],
        monitor_token=TOKENS["monitor"],
    )
    async with Hub(settings) as hub:
        status, body, kind = await aget(f"http://127.0.0.1:{hub.port}/debug")
        assert status == 200 and kind.startswith("text/html")
        page = body.decode()
        # a static page: it holds no token, no Redis address and no job data; what it
        # shows it reads over the normal endpoints, with the token its user types in
        assert not any(t in page for t in TOKENS.values())
        assert redis_url not in page and hub.hub_id not in page
        with pytest.raises(InvalidStatus) as err:
            await connect(f"{hub.url}/ws/client/c1")
        assert err.value.response.status_code == 401  # debug does not open the endpoints


# ---------------------------------------------------------------- Redis password


PASSWORD = "p@ss:w/rd#%q9"  # characters that must be percent-encoded in a URL


@pytest.fixture(scope="module")
def redis_with_password() -> Iterator[RedisProcess]:
    with RedisProcess(password=PASSWORD) as rp:
        yield rp


def password_url(rp: RedisProcess, password: str = PASSWORD) -> str:
    return f"redis://:{quote(password, safe='')}@127.0.0.1:{rp.port}/0"


async def _run_one_job(hub_url: str, token: str | None = None) -> Any:
    async with (
        MockWorker("pw-m", 1, hub=hub_url, job_types=["t"], run_time=0.0, token=token),
        QueueClient(hub_url, "pw-c") as qc,
    ):
        return await qc.result(await qc.submit("t", params={"x": 1}), timeout=30)


async def test_redis_password_end_to_end(redis_with_password: RedisProcess, namespace: str) -> None:
    rp = redis_with_password
    url = password_url(rp)
    # the hub process, from REDIS_URL
    hub = LiveHub(url, namespace)
    try:
        result = await _run_one_job(hub.url)
        assert result["worker_id"] == "pw-m:gpu0"
    finally:
        assert hub.stop() == 0
    # the hub process, from the seed's REDIS_HOST / REDIS_PORT / REDIS_PASSWORD
    seed_env = {
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(rp.port),
        "REDIS_PASSWORD": PASSWORD,
    }
    hub = LiveHub("", f"{namespace}b", env=seed_env)
    try:
        assert (await _run_one_job(hub.url))["worker_id"] == "pw-m:gpu0"
    finally:
        assert hub.stop() == 0
    # the engine's own shells
    limits = EngineLimits(namespace=f"{namespace}c")
    with RedisService(host="127.0.0.1", port=rp.port, password=PASSWORD, limits=limits) as svc:
        assert svc.add_job(job_type="t").status.value == "queued"
    asvc = AsyncRedisService(url, limits=limits)
    assert (await asvc.get_stats())["totals"]["submitted"] == 1
    await asvc.aclose()


@pytest.mark.parametrize(
    "how", ["no password", "wrong password"], ids=["no-password", "wrong-password"]
)
def test_hub_refuses_to_start_without_the_right_password(
    redis_with_password: RedisProcess, how: str
) -> None:
    wrong = "not-the-Pa55word"
    url = (
        f"redis://127.0.0.1:{redis_with_password.port}/0"
        if how == "no password"
        else password_url(redis_with_password, wrong)
    )
    r = start_hub(url)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "cannot start" in r.stderr and "Traceback" not in out
    assert wrong not in out and quote(wrong) not in out and PASSWORD not in out


def start_hub(redis_url: str) -> subprocess.CompletedProcess[str]:
    """``python -m redisq_server`` against ``redis_url``, expected to exit at once."""
    return subprocess.run(
        [sys.executable, "-m", "redisq_server", "--port", "0", "--redis-url", redis_url],
        capture_output=True,
        text=True,
        timeout=60,
    )


# -------------------------------------------------------------------------- TLS


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "1", "-subj", f"/CN=redisq test {ca}", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, cn in (("server", "localhost"), ("client", "redisq-hub")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
                 "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return Certs(
        d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
        d / "other-ca.crt",
    )  # fmt: skip


def tls_redis(certs: Certs, auth_clients: str) -> tuple[RedisProcess, int]:
    """A private redis-server with a TLS port (its plain port, on loopback, is only
    used to see that it is up). Skips when this redis-server was built without TLS."""
    tls_port = free_port()
    rp = RedisProcess(
        password=PASSWORD,
        extra_args=(
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(certs.server_cert),
            "--tls-key-file", str(certs.server_key),
            "--tls-ca-cert-file", str(certs.ca),
            "--tls-auth-clients", auth_clients,
        ),
    )  # fmt: skip
    try:
        rp.start()
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"redis-server without TLS support: {exc}")
        raise
    return rp, tls_port


def tls_url(port: int, ca: Path, **extra: str) -> str:
    query = "&".join(
        f"{k}={quote(str(v), safe='/')}"
        for k, v in {
            "ssl_ca_certs": ca,
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": "true",
            **extra,
        }.items()
    )
    return f"rediss://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0?{query}"


async def test_tls_to_redis_end_to_end(certs: Certs, namespace: str) -> None:
    """``rediss://`` with the server's certificate checked against our CA (and its
    name, 127.0.0.1): the hub runs jobs over it. A plain connection to the TLS port
    gets nowhere, and a certificate from another CA is refused."""
    rp, tls_port = tls_redis(certs, "no")
    try:
        hub = LiveHub(tls_url(tls_port, certs.ca), namespace)
        try:
            assert (await _run_one_job(hub.url))["worker_id"] == "pw-m:gpu0"
        finally:
            assert hub.stop() == 0
        plain = redis.Redis(host="127.0.0.1", port=tls_port, password=PASSWORD, socket_timeout=2)
        with pytest.raises(redis.RedisError):
            plain.ping()
        plain.close()
        r = await asyncio.to_thread(start_hub, tls_url(tls_port, certs.other_ca))
        assert r.returncode == 2 and "cannot start" in r.stderr
        assert "certificate verify failed" in r.stderr and "Traceback" not in r.stderr
        assert PASSWORD not in r.stdout + r.stderr
    finally:
        rp.stop()


async def test_mutual_tls_to_redis(certs: Certs, namespace: str) -> None:
    """Redis that demands a client certificate (``--tls-auth-clients yes``): the hub
    presents one from ``ssl_certfile``/``ssl_keyfile`` in the URL; without it, Redis
    refuses the connection."""
    rp, tls_port = tls_redis(certs, "yes")
    try:
        url = tls_url(
            tls_port,
            certs.ca,
            ssl_certfile=str(certs.client_cert),
            ssl_keyfile=str(certs.client_key),
        )
        hub = LiveHub(url, namespace)
        try:
            assert (await _run_one_job(hub.url))["worker_id"] == "pw-m:gpu0"
        finally:
            assert hub.stop() == 0
        svc = AsyncRedisService(tls_url(tls_port, certs.ca), limits=EngineLimits(namespace="x"))
        with pytest.raises((redis.RedisError, OSError)):
            await svc.ping()
        await svc.aclose()
    finally:
        rp.stop()


# ---------------------------------------------------------------------- secrets


async def test_secrets_never_reach_the_logs(
    redis_with_password: RedisProcess, namespace: str
) -> None:
    """A hub at DEBUG (the WebSocket library then dumps every handshake, path and
    headers included), with a Redis password and all three tokens, under traffic
    that carries the tokens in headers and in query strings, and through a Redis
    outage (connection errors logged): neither the password nor any token appears
    in its output, raw or percent-encoded. Signed tokens (which no hub knows in
    advance) and the signing secret do not either, nor a token sent in another
    valid percent-encoding of its value or of the parameter's name."""
    rp = redis_with_password
    env = {
        "REDISQ_CLIENT_TOKEN": TOKENS["client"],
        "REDISQ_WORKER_TOKEN": TOKENS["worker"],
        "REDISQ_MONITOR_TOKEN": TOKENS["monitor"],
        "REDISQ_AUTH_SECRETS": f"{SECRET},{OLD_SECRET}",
    }
    signed_client = sign([SECRET], "client", "c9")
    signed_monitor = sign([OLD_SECRET], "monitor", "m9")
    worker = TOKENS["worker"]
    every_byte = "".join(f"%{b:02X}" for b in worker.encode())  # -> the same token
    lower_hex = "".join(f"%{b:02x}" for b in worker.encode())
    odd_forms = [every_byte, lower_hex, every_byte[:9] + worker[3:]]
    hub = LiveHub(password_url(rp), namespace, "--log-level", "DEBUG", env=env)
    try:
        auth = {"Authorization": f"Bearer {TOKENS['client']}"}
        c = await Peer.open(f"{hub.url}/ws/client/c1", additional_headers=auth)
        m = await Peer.open(f"{hub.url}/ws/monitor/m1?token={quote(TOKENS['monitor'])}")
        w = await open_worker(
            f"{hub.url}", f"m1:gpu0?token={TOKENS['worker']}", ["t"]
        )  # the worker id comes before the query string
        await c.request({"type": "submit_job", "job_type": "t"})
        a = await w.expect("job_assigned")
        await w.send({"type": "complete_job", "job_id": a["job_id"], "attempt": 1})
        await c.expect("job_completed")
        with pytest.raises(InvalidStatus):
            await connect(f"{hub.url}/ws/client/c2?token={TOKENS['worker']}")
        signed = [
            await Peer.open(
                f"{hub.url}/ws/client/c9",
                additional_headers={"Authorization": f"Bearer {signed_client}"},
            ),
            await Peer.open(f"{hub.url}/ws/monitor/m9?token={signed_monitor}"),
            await Peer.open(f"{hub.url}/ws/monitor/m9?x=1&token={signed_monitor}&y=2"),
            *[
                await Peer.open(f"{hub.url}/ws/worker/m2:gpu{i}?token={t}")
                for i, t in enumerate(odd_forms)
            ],
            await Peer.open(f"{hub.url}/ws/worker/m3:gpu0?%74oken={worker}"),
            await Peer.open(f"{hub.url}/ws/worker/m3:gpu1?t%6Fken={lower_hex}"),
        ]
        with pytest.raises(InvalidStatus):  # refused (another id): logged all the same
            await connect(f"{hub.url}/ws/client/c2?token={signed_client}")
        for peer in signed:
            await peer.close()
        # a short Redis outage: the hub logs its connection errors
        assert rp.proc is not None
        rp.proc.terminate()
        rp.proc.wait(10)
        err = await c.request({"type": "get_stats"})
        assert err["code"] == "unavailable"
        rp.restart()

        async def back() -> bool:
            return bool((await c.request({"type": "get_stats"}))["type"] == "stats")

        await wait_for(back, 10, "the hub to reach Redis again")
        for p in (c, m, w):
            await p.close()
    finally:
        assert hub.stop() == 0
    out = hub.output()
    assert "DEBUG websockets" in out and "Redis error" in out  # the logs were there
    assert "Bearer ***" in out and "token=***" in out  # and were masked
    for secret in (PASSWORD, *TOKENS.values(), SECRET, OLD_SECRET, signed_client, signed_monitor):
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            assert form not in out, f"{form!r} appears in the hub's output"
    for form in (*odd_forms, worker[3:]):
        assert form not in out, f"{form!r} appears in the hub's output"
    assert "%74oken=***" in out and "t%6Fken=***" in out
