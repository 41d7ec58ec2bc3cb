"""What every ``redisq`` subcommand is built from: the registry, the errors, the
monitors, the output and the argument types.

A command module (:mod:`redisq_lab.cli_read`, :mod:`redisq_lab.cli_run`,
:mod:`redisq_lab.cli_top`) registers its subcommands with :func:`command`;
:mod:`redisq_lab.cli` imports those modules, builds the parser from :data:`COMMANDS`
and maps the errors to exit codes. Nothing here imports a command module.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import numpy as np
import pandas as pd

from redisq_server.config import check_redis_url, redis_url_from_env

from .monitors import JobMonitor, RedisMonitor, WorkerMonitor

__all__ = [
    "COMMANDS",
    "PROG",
    "Command",
    "Handler",
    "Monitors",
    "NotFinished",
    "UsageError",
    "cell",
    "command",
    "emit",
    "frame_records",
    "frame_table",
    "jsonable",
    "mapping_table",
    "open_monitors",
    "positive_float",
    "positive_int",
]

PROG: Final = "redisq"

#: a subcommand's function: the parsed arguments in, the exit code out
Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """One subcommand: ``run(args)`` returns the exit code; ``configure(parser)``
    adds its arguments; ``formats`` adds ``--format table|json``."""

    name: str
    help: str
    run: Handler
    configure: Callable[[argparse.ArgumentParser], None] | None = None
    formats: bool = True


#: Every subcommand by name, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    help: str,
    *,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    formats: bool = True,
    registry: dict[str, Command] | None = None,
) -> Callable[[Handler], Handler]:
    """Register the decorated function as subcommand ``name`` in ``registry``
    (default: :data:`COMMANDS`); ``configure`` and ``formats`` as in :class:`Command`."""

    def register(run: Handler) -> Handler:
        into = COMMANDS if registry is None else registry
        into[name] = Command(name, help, run, configure, formats)
        return run

    return register


class UsageError(Exception):
    """A mistake by the user (bad namespace, ...): printed as one line, exit code 2."""


class NotFinished(Exception):
    """``submit --wait`` gave up before its jobs finished: one line, exit code 1."""


# ----------------------------------------------------------------- monitors


@dataclass(frozen=True)
class Monitors:
    """The three monitors, sharing one connection."""

    jobs: JobMonitor
    workers: WorkerMonitor
    redis: RedisMonitor


@contextmanager
def open_monitors(args: argparse.Namespace) -> Iterator[Monitors]:
    """Monitors for ``--redis-url`` and ``--namespace`` (the environment when not
    given); the connection closes when the block ends."""
    check_redis_url(args.redis_url or redis_url_from_env())
    try:
        jobs = JobMonitor(args.redis_url, namespace=args.namespace)
    except ValueError as exc:  # e.g. a namespace that cannot be a key prefix
        raise UsageError(str(exc)) from None
    try:
        yield Monitors(
            jobs, WorkerMonitor(service=jobs.service), RedisMonitor(service=jobs.service)
        )
    finally:
        jobs.close()


# ------------------------------------------------------------------- output


def jsonable(value: Any) -> Any:
    """``value`` with Timestamps as ISO strings, NaN/NA/NaT as None, numpy scalars
    as Python numbers, and mapping keys as strings: ready for :func:`json.dumps`."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def frame_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A frame as JSON-ready records, its index as the first field."""
    return [jsonable(r) for r in frame.reset_index().to_dict(orient="records")]


def cell(value: Any, width: int = 60) -> str:
    """One value for a table: times to the second (``Z``: UTC), 3-decimal floats,
    ``-`` when missing, texts on one line and cut at ``width``."""
    if isinstance(value, datetime) and value is not pd.NaT:
        return value.strftime("%Y-%m-%d %H:%M:%SZ")
    value = jsonable(value)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict | list):
        value = json.dumps(value, ensure_ascii=False)
    text = " ".join(str(value).splitlines())
    return text if len(text) <= width else text[: width - 1] + "…"


def frame_table(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """``frame`` (optionally only ``columns``) as an aligned text table."""
    if frame.empty:
        return "(none)"
    shown = frame if columns is None else frame[[c for c in columns if c in frame.columns]]
    cells = shown.reset_index().astype(object).map(cell)
    return str(cells.to_string(index=False))


def mapping_table(data: Mapping[str, Any]) -> str:
    """A dict as ``key  value`` lines."""
    width = max((len(k) for k in data), default=0)
    return "\n".join(f"{k:<{width}}  {cell(v, 200)}" for k, v in data.items())


def emit(args: argparse.Namespace, data: Any, table: Callable[[], str]) -> int:
    """Print ``data`` as JSON or ``table()`` as text, per ``--format``; return 0."""
    if getattr(args, "format", "table") == "json":
        if isinstance(data, pd.DataFrame):
            data = frame_records(data)
        print(json.dumps(jsonable(data), indent=2, ensure_ascii=False))
    else:
        print(table())
    return 0


# ---------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    """An argparse ``type=``: ``text`` as an integer >= 1, else argparse's usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type=``: ``text`` as a finite number of seconds > 0, else
    argparse's usage error."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value
