"""The dependency rule, checked on the import statements of every module.

Layers: ``core`` (errors, records, defaults, the policy/prompt data contract) ← ``engine`` (the
pure method and checkpoint I/O) ← ``service`` (daemon, registry, settings, versions) ← ``cli``;
``lab`` (organisms, evaluation studies, baselines, reports) sits beside the service and uses only
core and engine — except the demo, which runs the daemon itself. A new module must be placed in
a layer here, so the rule cannot be bypassed by forgetting it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fgsn_daemon"

LAYERS: dict[str, set[str]] = {
    "core": {"durable", "errors", "faults", "records", "defaults", "prompts", "policy", "stats", "precision"},
    "engine": {
        "activations",
        "architectures",
        "attribution",
        "checkpoint",
        "continual",
        "delta_selection",
        "engine",
        "entry_masks",
        "evaluation",
        "localisation",
        "projection",
        "refusal",
        "safetensors_io",
    },
    "service": {"daemon", "integrity", "registry", "reliability", "settings", "versions", "migrations"},
    "lab": {
        "baselines",
        "demo",
        "efficacy",
        "experiments",
        "lab",
        "lab_smollm2",
        "lora_train",
        "plots",
        "policy_sources",
        "report",
        "sweep",
        "synthetic",
    },
    "cli": {"cli", "daemon_cli", "lab_cli", "registry_cli"},
}
ALLOWED = {
    "core": {"core"},
    "engine": {"core", "engine"},
    "service": {"core", "engine", "service"},
    "lab": {"core", "engine", "lab"},
    "cli": {"core", "engine", "service", "lab", "cli"},
}
EXCEPTIONS = {("demo", "service")}  # the demo runs the daemon on a lab trio


def layer_of(module: str) -> str:
    top = module.split(".")[0]
    for layer, names in LAYERS.items():
        if top in names:
            return layer
    raise AssertionError(f"module fgsn_daemon.{module} is in no layer: add it to LAYERS")


def imports(path: Path) -> set[str]:
    """fgsn_daemon modules imported anywhere in the file (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("fgsn_daemon."):
                rest = name.removeprefix("fgsn_daemon.")
                if (PACKAGE / rest.split(".")[0]).with_suffix(".py").exists() or (
                    PACKAGE / rest.split(".")[0]
                ).is_dir():
                    out.add(rest)
    return out


def test_every_module_respects_the_dependency_rule() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module == "__init__":
            continue
        mine = layer_of(module)
        for dep in sorted(imports(path)):
            theirs = layer_of(dep)
            if theirs not in ALLOWED[mine] and (module.split(".")[0], theirs) not in EXCEPTIONS:
                violations.append(f"{module} ({mine}) imports {dep} ({theirs})")
    assert not violations, "\n".join(violations)


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "engine_like.py"
    bad.write_text("def f():\n    from fgsn_daemon.daemon import Daemon\n")
    assert imports(bad) == {"daemon", "daemon.Daemon"}
    assert layer_of("daemon") not in ALLOWED["engine"]
