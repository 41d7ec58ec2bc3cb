"""docs/protocol.md stays in step with the code: every message type and error code is
documented, and every JSON example parses. Pure: no Redis, no sockets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from redisq_server.models import JobStatus
from redisq_server.protocol import ErrorCode, MessageType

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"

# A fenced block tagged exactly ``json``: its body up to the closing fence.
_JSON_BLOCK = re.compile(r"^```json[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def doc() -> str:
    assert DOC.is_file(), f"{DOC} is missing"
    return DOC.read_text(encoding="utf-8")


def _json_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of every ```json block."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _JSON_BLOCK.finditer(text)]


@pytest.mark.parametrize("mtype", list(MessageType), ids=str)
def test_every_message_type_is_documented(doc: str, mtype: MessageType) -> None:
    assert f"`{mtype.value}`" in doc, f"message type `{mtype.value}` is not in {DOC.name}"
    heading = re.compile(rf"^#+ `{re.escape(mtype.value)}`\s*$", re.MULTILINE)
    assert heading.search(doc), f"message type `{mtype.value}` has no section of its own"


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_every_error_code_is_documented(doc: str, code: ErrorCode) -> None:
    assert f"`{code.value}`" in doc, f"error code `{code.value}` is not in {DOC.name}"


@pytest.mark.parametrize("status", list(JobStatus), ids=str)
def test_every_job_status_is_documented(doc: str, status: JobStatus) -> None:
    assert f"`{status.value}`" in doc, f"job status `{status.value}` is not in {DOC.name}"


def test_json_examples_parse(doc: str) -> None:
    blocks = _json_blocks(doc)
    assert blocks, "no ```json blocks found"
    bad = []
    for line, body in blocks:
        try:
            json.loads(body)
        except ValueError as exc:
            bad.append(f"line {line}: {exc}")
    assert not bad, "invalid JSON examples:\n" + "\n".join(bad)


def test_json_examples_use_known_types(doc: str) -> None:
    known = {t.value for t in MessageType}
    for line, body in _json_blocks(doc):
        value = json.loads(body)
        if isinstance(value, dict) and "type" in value:
            assert value["type"] in known, f"line {line}: unknown type {value['type']!r}"
        if isinstance(value, dict) and value.get("type") == "error":
            codes = {c.value for c in ErrorCode}
            assert value.get("code") in codes, f"line {line}: unknown code {value.get('code')!r}"


def test_block_pattern_finds_only_json_fences() -> None:
    sample = '```json\n{"a": 1}\n```\n\n```text\nnot json\n```\n\n```json\n[1, 2]\n```\n'
    assert [body for _, body in _json_blocks(sample)] == ['{"a": 1}\n', "[1, 2]\n"]
