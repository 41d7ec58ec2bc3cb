"""The ``redisq`` command: look at a running queue from a terminal, and run one.

``summary``, ``jobs``, ``job``, ``workers`` and ``worker`` read the queue; ``serve``
runs a hub (on a private redis-server unless ``--redis-url`` is given),
``mock-workers`` runs simulated GPU machines, ``submit`` sends jobs through a hub and
``demo`` runs the whole thing end to end.

Every subcommand reads through :mod:`redisq_lab.monitors` and prints a table for
people or, with ``--format json``, plain JSON for ``jq`` (times as ISO 8601 strings,
missing values as ``null``)::

    redisq summary --redis-url redis://127.0.0.1:6390/0
    redisq jobs --status failed --limit 5 --format json | jq '.[].error'

``--redis-url`` and ``--namespace`` may come before or after the subcommand.

Exit codes: 0 success; 1 not found (an unknown job or worker) or not finished
(``submit --wait --timeout`` gave up); 2 a usage error (bad arguments, ``--params``
that is not a JSON object, a job the hub refuses) or Redis or the hub unreachable;
130 interrupted (Ctrl-C); 141 the reader of a pipe stopped early (``| head``), quietly,
like other Unix tools. Errors are one line on stderr, without a traceback.

This module holds the parser and :func:`main`; the subcommands live in
:mod:`redisq_lab.cli_read` (summary, jobs, job, workers, worker, token),
:mod:`redisq_lab.cli_run` (serve, mock-workers, submit, demo) and
:mod:`redisq_lab.cli_top` (top), and what they share in :mod:`redisq_lab.cli_base`.

Adding a subcommand takes a function and a decorator, in one of those modules (or in
a new one, imported here and listed in :data:`COMMAND_MODULES`), with ``command`` and
``open_monitors`` from :mod:`redisq_lab.cli_base`::

    @command("ping", "check that Redis answers", formats=False)
    def _ping(args: argparse.Namespace) -> int:
        with open_monitors(args) as m:
            m.redis.service.ping()
        return 0

``configure`` (optional) adds the subcommand's own arguments to its parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

import redis
from websockets.exceptions import InvalidHandshake

from redisq_server.config import RedisURLError, redis_url_from_env, safe_url
from redisq_server.protocol import ProtocolError

from . import cli_base, cli_read, cli_run, cli_top
from .cli_base import (
    COMMANDS,
    PROG,
    Command,
    Handler,
    Monitors,
    NotFinished,
    UsageError,
    emit,
    frame_records,
    frame_table,
    jsonable,
    mapping_table,
    open_monitors,
)
from .monitors import NotFoundError
from .redis_process import RedisNotInstalled

__all__ = [
    "COMMANDS",
    "Command",
    "Monitors",
    "UsageError",
    "build_parser",
    "command",
    "emit",
    "frame_records",
    "frame_table",
    "jsonable",
    "main",
    "mapping_table",
    "open_monitors",
]

#: the modules whose subcommands :data:`COMMANDS` holds: importing one registers them
COMMAND_MODULES: Final[tuple[ModuleType, ...]] = (cli_read, cli_run, cli_top)


def command(
    name: str,
    help: str,
    *,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    formats: bool = True,
) -> Callable[[Handler], Handler]:
    """:func:`redisq_lab.cli_base.command` into this module's :data:`COMMANDS`, the
    registry :func:`build_parser` reads, looked up when the decorator runs."""
    return cli_base.command(name, help, configure=configure, formats=formats, registry=COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    """The parser for every registered subcommand (see :data:`COMMANDS`)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Watch and run a redisq job queue: jobs, workers, queue stats, hubs and mock GPUs.",
    )
    _queue_options(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        # the same options after the subcommand; given there, they win
        _queue_options(p, argparse.SUPPRESS)
        if cmd.configure is not None:
            cmd.configure(p)
        if cmd.formats:
            p.add_argument(
                "--format", choices=("table", "json"), default="table", help="default: table"
            )
        p.set_defaults(run=cmd.run)
    return parser


def _queue_options(p: argparse.ArgumentParser, default: Any) -> None:
    """``--redis-url`` and ``--namespace``, on the main parser and on each subcommand's."""
    p.add_argument(
        "--redis-url",
        default=default,
        help="Redis URL (default: $REDIS_URL, else built from $REDIS_HOST, $REDIS_PORT, "
        "$REDIS_DB, $REDIS_PASSWORD, else redis://localhost:6379/0)",
    )
    p.add_argument(
        "--namespace",
        default=default,
        help="key namespace (default: $REDISQ_NAMESPACE, else redisq)",
    )


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run ``redisq`` with ``argv`` (default: the command line); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    try:
        run: Handler = args.run
        code = run(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below
        return code
    except BrokenPipeError:  # `redisq ... | head`: the reader has all it wanted
        _silence_stdout()
        return 141
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        url = safe_url(args.redis_url or redis_url_from_env())
        return _fail(f"cannot reach Redis at {url}: {exc}", 2)
    except RedisURLError as exc:
        return _fail(str(exc), 2)
    except (NotFoundError, NotFinished) as exc:
        return _fail(str(exc), 1)
    except (UsageError, ProtocolError) as exc:
        return _fail(str(exc), 2)
    except (OSError, InvalidHandshake) as exc:  # the hub (or redis-server) is not there
        return _fail(f"cannot connect: {exc}", 2)
    except RedisNotInstalled as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush of what is left in
    its buffer does not fail once more with "Broken pipe"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured): nothing to silence
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    raise SystemExit(main())
