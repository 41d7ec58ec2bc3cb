"""``python -m redisq_server``: run one hub (see ``--help``)."""

from .main import run

run()
