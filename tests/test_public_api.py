"""The deliberate public surfaces: what a notebook imports, and the core's boundary."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import redisq_lab
import redisq_server

LAB_API = {
    "Dashboard",
    "JobFailed",
    "JobMonitor",
    "JobTrace",
    "LoadGenerator",
    "LocalStack",
    "MockWorker",
    "NotFoundError",
    "QueueClient",
    "RedisMonitor",
    "RedisNotInstalled",
    "RedisProcess",
    "RequestError",
    "WorkerMonitor",
    "__version__",
    "summarize",
}


def test_lab_exports_exactly_its_public_api() -> None:
    assert set(redisq_lab.__all__) == LAB_API
    for name in LAB_API:
        assert getattr(redisq_lab, name) is not None


def test_server_exports_resolve() -> None:
    for name in redisq_server.__all__:
        assert getattr(redisq_server, name) is not None
    assert "RedisService" in redisq_server.__all__ and "JobModel" in redisq_server.__all__


def test_core_never_imports_the_lab_or_its_dependencies() -> None:
    code = (
        "import sys, redisq_server, redisq_server.main, redisq_server.routes, redisq_server.routing; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('redisq_lab', 'pandas', 'plotly', 'ipywidgets', 'numpy')]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ------------------------------------------------------------- import graphs


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same flat package it imports, from every Import and
    ImportFrom node anywhere in its source (inside functions and ``if TYPE_CHECKING:``
    too). ``from .x import y`` and ``from package.x import y`` name module ``x``;
    ``from . import x`` names ``x`` when it is a module, else ``__init__``."""
    modules = {p.stem for p in package_dir.glob("*.py")}

    def resolve(dotted: str | None, names: list[str]) -> set[str]:
        if dotted:
            head = dotted.split(".")[0]
            return {head} if head in modules else set()
        return {n if n in modules else "__init__" for n in names}

    graph: dict[str, set[str]] = {}
    for module in sorted(modules):
        tree = ast.parse((package_dir / f"{module}.py").read_text(), f"{module}.py")
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    first, _, rest = alias.name.partition(".")
                    if first == package:
                        found |= resolve(rest, []) if rest else {"__init__"}
            elif isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
                if node.level == 1:
                    found |= resolve(node.module, names)
                elif node.level == 0 and node.module is not None:
                    first, _, rest = node.module.partition(".")
                    if first == package:
                        found |= resolve(rest, names)
        graph[module] = found
    return graph


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None when there is none."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_import_graph_finds_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text("from .a import A\n")
    (tmp_path / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\nA = 1\n"
    )
    (tmp_path / "b.py").write_text("def f():\n    from pkg import c\n")
    (tmp_path / "c.py").write_text("import pkg.a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"__init__": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert cycle_in(graph) is not None


def test_the_lab_modules_import_each_other_without_cycles() -> None:
    graph = import_graph(Path(redisq_lab.__file__).parent, "redisq_lab")
    assert {"frames", "connect", "monitors", "dashboard"} <= set(graph)
    assert "monitors" not in graph["dashboard"]
    assert cycle_in(graph) is None, f"import cycle: {' -> '.join(cycle_in(graph) or [])}"


def test_the_server_modules_import_each_other_without_cycles() -> None:
    graph = import_graph(Path(redisq_server.__file__).parent, "redisq_server")
    assert "protocol" in graph["operations"]  # ``from . import protocol``
    assert cycle_in(graph) is None, f"import cycle: {' -> '.join(cycle_in(graph) or [])}"
