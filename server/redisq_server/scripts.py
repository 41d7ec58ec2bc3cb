"""The engine's Lua: one Redis function per state change, in one library from ``lua/``.

The library is the generated key names (:mod:`.keys`), the helpers of ``lib.lua``
and one function per body file. Redis compiles it once (``FUNCTION LOAD``) and each
call is an ``FCALL``: the helpers are not defined again on every call, as they
would be in a script sent with ``EVALSHA`` (about 12-17 us per call on the
reference machine, docs/benchmarks.md). Each function's reply comes back as
``{reply, events for the calling hub}``, or ``{reply}`` when there are none (an
error reply as it is).

The library's name, and so every function's, carries a hash of its source: hubs of
two versions (a rolling upgrade) each call their own library on the same Redis, and
a changed script can never be run under an old name. Reading the files is the only
I/O.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from typing import Final

from .keys import lua_prelude

__all__ = ["SCRIPT_NAMES", "function_name", "library_name", "library_source"]

SCRIPT_NAMES: Final = (
    "submit",
    "register",
    "complete",
    "fail",
    "progress",
    "touch",
    "lost",
    "reap",
    "promote",
    "cancel",
    "status",
    "stats",
    "hub",
    "leave",
    "arrive",
)

_NAME: Final = "@LIBRARY@"


@cache
def _template() -> str:
    lua = resources.files(__package__).joinpath("lua")
    parts = [
        f"#!lua name={_NAME}\n",
        "local P\n",
        lua_prelude(),
        lua.joinpath("lib.lua").read_text(),
    ]
    parts.append(
        "\nlocal function reply(r)\n"
        "  if type(r) == 'table' and r.err then return r end\n"
        "  if r == nil then r = false end\n"
        "  if #LOCAL == 0 then return {r} end\n"
        "  return {r, LOCAL}\n"
        "end\n"
    )
    for name in SCRIPT_NAMES:
        body = lua.joinpath(f"{name}.lua").read_text()
        parts.append(
            f"\nlocal function {name}_body()\n{body}\nend\n"
            f"redis.register_function('{_NAME}_{name}', "
            f"function(_, args) setup(args) return reply({name}_body()) end)\n"
        )
    return "".join(parts)


@cache
def library_name() -> str:
    """``redisq_`` and the first 12 hex digits of the SHA-1 of the library's source."""
    return "redisq_" + hashlib.sha1(_template().encode()).hexdigest()[:12]


@cache
def library_source() -> str:
    """The library's Lua source, ready for ``FUNCTION LOAD``."""
    return _template().replace(_NAME, library_name())


def function_name(script: str) -> str:
    """The library's function for state change ``script`` (one of SCRIPT_NAMES)."""
    return f"{library_name()}_{script}"
