"""pytest runs these notebooks under nbval (see addopts in pyproject.toml).

The sanitize file is named relative to the repository root there; resolve it against
the root too, so that ``pytest`` also works when started from this directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    name = getattr(config.option, "nbval_sanitize_with", None)
    if name and not Path(name).exists() and (config.rootpath / name).exists():
        config.option.nbval_sanitize_with = str(config.rootpath / name)
