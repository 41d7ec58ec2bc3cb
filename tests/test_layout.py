"""The layout holds: one protocol module that everyone speaks through, a real package
folder for the server, and no module that spells a message name of its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from redisq_server.protocol import EventName, MessageType

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "server" / "redisq_server"
MESSAGE_TYPES = {m.value for m in MessageType}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def spelled_message_types(path: Path) -> list[str]:
    """Message names written out as literals: a ``"type": "..."`` entry of a dict
    literal, or a string compared with ``==``, ``!=`` or ``in``."""
    found: list[str] = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if (
                    isinstance(key, ast.Constant)
                    and key.value == "type"
                    and isinstance(value, ast.Constant)
                ):
                    found.append(str(value.value))
        elif isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                elts = side.elts if isinstance(side, ast.Set | ast.Tuple | ast.List) else [side]
                found += [
                    e.value
                    for e in elts
                    if isinstance(e, ast.Constant) and e.value in MESSAGE_TYPES
                ]
    return found


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("name", ["client.py", "mock_worker.py"])
def test_the_lab_speaks_through_the_protocol_module(name: str) -> None:
    path = ROOT / "redisq_lab" / name
    assert "redisq_server.protocol" in imported_modules(path)
    assert spelled_message_types(path) == []


def test_the_hub_spells_messages_only_in_the_protocol_module() -> None:
    spelled = {
        p.name: spelled_message_types(p)
        for p in sorted(SERVER.glob("*.py"))
        if p.name != "protocol.py"
    }
    assert {name: found for name, found in spelled.items() if found} == {}


def test_the_benchmarks_speak_through_the_protocol_module() -> None:
    spelled = {p.name: spelled_message_types(p) for p in sorted((ROOT / "benchmarks").glob("*.py"))}
    assert {name: found for name, found in spelled.items() if found} == {}


def test_the_checker_sees_a_spelled_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f(m):\n"
        "    send({'type': 'submit_job', 'job_type': 't'})\n"
        "    return m['type'] == 'job_assigned' or m['type'] in {'ack', 'queued'}\n"
    )
    assert spelled_message_types(bad) == ["submit_job", "job_assigned", "ack"]


def test_the_server_is_a_real_package_folder_and_nothing_imports_server_directly() -> None:
    assert SERVER.is_dir() and not SERVER.is_symlink()
    assert not (ROOT / "redisq_server").exists()
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("server", "redisq_lab", "benchmarks", "tests", "notebooks")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if any(m == "server" or m.startswith("server.") for m in imported_modules(p))
    ]
    assert offenders == []


def test_every_event_the_scripts_emit_is_a_protocol_event_name() -> None:
    emitted = {
        m.group(1)
        for p in sorted((SERVER / "lua").glob("*.lua"))
        for m in re.finditer(r"emit\(\w+, '([a-z_]+)'", p.read_text())
    }
    assert emitted, "no emit() calls found: the pattern no longer matches lib.lua"
    assert emitted <= {e.value for e in EventName}
    assert {e.value for e in EventName} <= emitted


def test_every_message_the_debug_page_sends_is_a_protocol_message() -> None:
    page = (SERVER / "static" / "ws_debug.html").read_text()
    sent = set(re.findall(r"""type:\s*["']([a-z_]+)["']""", page))
    assert sent, "no message literals found in the debug page"
    assert sent <= MESSAGE_TYPES


def test_the_two_engine_shells_name_their_shared_calls_alike() -> None:
    """What both shells can do has one name and one signature in both; the seed's
    ``add_job`` and ``get_job_status`` stay on the blocking one."""
    import inspect

    from redisq_server import AsyncRedisService, RedisService

    shared = ["submit_job", "get_job", "cancel_job", "get_stats", "events_since"]
    shared += ["last_event_id", "ping"]
    for name in shared:
        a = inspect.signature(getattr(AsyncRedisService, name))
        s = inspect.signature(getattr(RedisService, name))
        assert list(a.parameters) == list(s.parameters), name
        assert [p.default for p in a.parameters.values()] == [
            p.default for p in s.parameters.values()
        ], name
    assert callable(RedisService.add_job) and callable(RedisService.get_job_status)
