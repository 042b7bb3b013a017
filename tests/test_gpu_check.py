"""The one-command GPU check: its dry run (CPU, a 4-layer model) goes through every step and phase,
and without a CUDA device the real run stops with a clear error instead of measuring the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
PHASES = [
    "plain forward",
    "band statistics",
    "layer curve",
    "attribution (neurons)",
    "attribution (entries)",
    "dimension 1",
    "dimension 2",
    "edit + publish",
]


def run(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args, "--work", str(tmp / "work"), "--out", str(tmp / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def test_dry_run_times_every_phase(tmp_path):
    proc = run("--dry-run", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "dry-run" / "device-scoring.json").read_text())["smoke"]
    assert [p["phase"] for p in result["phases"]] == PHASES
    assert all(p["seconds"] > 0 and p["peak_bytes"] > 0 for p in result["phases"])
    table = (tmp_path / "out" / "dry-run" / "device-scoring.md").read_text()
    for phase in PHASES:
        assert f"| smoke | cpu | {phase} |" in table
    assert "× dimension 1" in table and "done in" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_real_run_without_cuda_is_a_clear_error(tmp_path):
    proc = run(tmp=tmp_path)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
