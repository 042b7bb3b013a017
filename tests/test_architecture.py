"""The dependency rule, checked on the import statements of every module.

Each layer is a subpackage: ``core`` (errors, records, defaults, the policy/prompt data contract)
← ``engine`` (the pure method and checkpoint I/O) ← ``service`` (daemon, registry, settings,
versions) ← ``cli``; ``lab`` (organisms, evaluation studies, baselines, reports) sits beside the
service and uses only core and engine — except the demo, which runs the daemon itself. A module
outside the five subpackages fails the test, so the rule cannot be bypassed by placing one there."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fgsn_daemon"

LAYERS = ("core", "engine", "service", "lab", "cli")
ALLOWED = {
    "core": {"core"},
    "engine": {"core", "engine"},
    "service": {"core", "engine", "service"},
    "lab": {"core", "engine", "lab"},
    "cli": {"core", "engine", "service", "lab", "cli"},
}
EXCEPTIONS = {"lab.demo": {"service"}}  # the demo runs the daemon on a lab trio
# packages that are data, not code, mapped in by pyproject (alembic scripts run by the registry)
DATA_PACKAGES = {"migrations": "service", "policies": "core"}


def layer_of(module: str) -> str:
    top = module.split(".")[0]
    if top in LAYERS:
        return top
    if top in DATA_PACKAGES:
        return DATA_PACKAGES[top]
    raise AssertionError(f"module fgsn_daemon.{module} is in no layer: move it into {', '.join(LAYERS)}")


def imports(path: Path) -> set[str]:
    """fgsn_daemon modules imported anywhere in the file (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; write fgsn_daemon.<layer>.<module>")
        out |= {n.removeprefix("fgsn_daemon.") for n in names if n.startswith("fgsn_daemon.")}
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fgsn_daemon."):
            # `from fgsn_daemon.lab import report` imports the module lab.report (a name that is
            # not a module is cut back to its module by the graph)
            base = node.module.removeprefix("fgsn_daemon.")
            out |= {f"{base}.{a.name}" for a in node.names}
        if any(n == "fgsn_daemon" for n in names) and isinstance(node, ast.ImportFrom):
            out |= {a.name for a in node.names}  # from fgsn_daemon import core
    return out


def test_every_module_sits_in_a_layer_subpackage() -> None:
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the layer subpackages: {loose}"


def test_every_module_respects_the_dependency_rule() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module == "__init__":
            continue
        mine = layer_of(module)
        allowed = ALLOWED[mine] | EXCEPTIONS.get(module, set())
        for dep in sorted(imports(path)):
            theirs = layer_of(dep)
            if theirs not in allowed:
                violations.append(f"{module} ({mine}) imports {dep} ({theirs})")
    assert not violations, "\n".join(violations)


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "engine_like.py"
    bad.write_text("def f():\n    from fgsn_daemon.service.daemon import Daemon\n")
    assert imports(bad) == {"service.daemon", "service.daemon.Daemon"}  # a name or a submodule
    assert layer_of("service.daemon") not in ALLOWED["engine"]
    with_package = tmp_path / "pkg_import.py"
    with_package.write_text("from fgsn_daemon import lab\n")
    assert layer_of(next(iter(imports(with_package)))) == "lab"


def module_graph(package: Path) -> dict[str, set[str]]:
    """Each module's imports of other modules of the package (function-level imports included;
    ``from pkg.mod import name`` counts as an import of ``pkg.mod``)."""
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for dep in imports(path):
            while dep and dep not in modules:
                dep = dep.rpartition(".")[0]
            if dep and dep != name:
                deps.add(dep)
        graph[name] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's strongly
    connected components with more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_two_modules_import_each_other() -> None:
    """Not even through a function-level import (the demo and its report once did)."""
    assert import_cycles(module_graph(PACKAGE)) == []


def test_the_cycle_check_finds_a_lazy_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "lab").mkdir(parents=True)
    (pkg / "lab" / "demo.py").write_text("from fgsn_daemon.lab.report import table\n")
    (pkg / "lab" / "report.py").write_text("def table():\n    from fgsn_daemon.lab.demo import run\n")
    (pkg / "lab" / "plots.py").write_text("import fgsn_daemon.lab.report\n")
    assert import_cycles(module_graph(pkg)) == [["lab.demo", "lab.report"]]
    # the same cycle written as `from package import module`
    (pkg / "lab" / "demo.py").write_text("from fgsn_daemon.lab import report\n")
    (pkg / "lab" / "report.py").write_text("def table():\n    from fgsn_daemon.lab import demo\n")
    assert import_cycles(module_graph(pkg)) == [["lab.demo", "lab.report"]]
