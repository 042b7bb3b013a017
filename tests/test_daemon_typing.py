"""The daemon is one class made of parts (lifecycle, scanner, jobs, publisher, resources,
recovery) that call each other through ``self``; ``DaemonState`` declares those calls for type
checkers. mypy checks the parts, so a call to a method no part declares, or with the wrong
arguments, fails here rather than at run time in a long-running daemon. The whole package is
checked the same way, so a type error anywhere (engine, service, CLI, lab) fails the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two cold mypy runs (run in CI with the other slow tests)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fgsn_daemon"
DAEMON = PACKAGE / "service" / "daemon"


def mypy(target: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports"]
    cmd += ["--no-incremental", "--cache-dir=/dev/null", str(target)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_package_type_checks() -> None:
    """The daemon's parts included: one cold mypy run over every module of the package."""
    result = mypy(PACKAGE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_an_undeclared_cross_part_call_is_caught(tmp_path: Path) -> None:
    copy = tmp_path / "fgsn_daemon" / "service" / "daemon"
    shutil.copytree(DAEMON, copy)
    scanner = copy / "scanner.py"
    text = scanner.read_text(encoding="utf-8")
    marker = "        reg = self.open_registry()\n"
    assert marker in text
    scanner.write_text(
        text.replace(marker, marker + "        self.publish_everything()\n", 1), encoding="utf-8"
    )
    result = mypy(copy / "scanner.py")
    assert result.returncode != 0
    assert "publish_everything" in result.stdout
