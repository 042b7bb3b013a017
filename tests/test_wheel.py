"""The daemon runs from an installed wheel, outside the source checkout.

The wheel is built from this checkout and installed (without dependencies) into a fresh virtual
environment in a temporary folder; the dependencies come from the test's own environment through a
path file, so nothing is downloaded. ``fgsn run --once`` then runs from a folder outside the
checkout, so the bundled policies, benign prompts, architecture specs and migrations can only come
from the installed package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import make_trio

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _venv_site_packages(venv: Path) -> Path:
    found = list(venv.glob("lib/python3*/site-packages"))
    assert len(found) == 1, found
    return found[0]


def test_installed_wheel_runs_the_daemon_outside_the_checkout(tmp_path: Path) -> None:
    # build from a copy without build outputs: a stale build/ folder would leak files into the wheel
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            ".git",
            "__pycache__",
            ".*_cache",
            ".hypothesis",
            "benchmarks",
        ),
    )
    wheels = tmp_path / "wheels"
    built = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("fgsn_daemon-*.whl")

    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    site = _venv_site_packages(venv)
    # dependencies from this environment: a plain path line, so the checkout's editable-install
    # hook (a .pth file in that folder) is not processed and cannot leak the checkout in
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    installed = _run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    where = _run([str(python), "-c", "import fgsn_daemon; print(fgsn_daemon.__file__)"], cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr

    trio = make_trio(tmp_path / "trio", "llama")
    policy, state = tmp_path / "policies", tmp_path / "state"
    (policy / "cyber").mkdir(parents=True)
    (policy / "cyber" / "policy.toml").write_text('description = "d"\nsource = "tests"\nlicense = "MIT"\n')
    (policy / "cyber" / "harmful.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["hack wifi", "phish bank account", "hack bank"])
    )
    cfg = tmp_path / "fgsn.toml"
    cfg.write_text(
        f'base = "{trio["base"]}"\naligned = "{trio["aligned"]}"\nfinetuned = "{trio["finetuned"]}"\n'
        f'policy_dir = "{policy}"\nstate_dir = "{state}"\ndevice = "cpu"\nsettle_s = 0\n'
        '[params]\npreset = "activation"\nq = 50\np = 10\nbatch_size = 8\nmax_length = 32\n'
    )
    run = _run([str(venv / "bin" / "fgsn"), "run", "--once", "--config", str(cfg)], cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (state / "current").is_dir()
    assert list((state / "current").glob("*.safetensors"))
    listed = _run([str(venv / "bin" / "fgsn"), "history", "--config", str(cfg), "--json"], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert "cyber" in listed.stdout
