"""The ``fgsn apply`` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BENIGN, HARMFUL, make_trio, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    trio = make_trio(root, "qwen2")
    return trio, write_jsonl(root / "harmful.jsonl", HARMFUL), write_jsonl(root / "benign.jsonl", BENIGN)


def fgsn(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fgsn_daemon.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def common(trio, harmful: Path, benign: Path, out: Path) -> list[str]:
    return [
        "apply",
        "--base",
        str(trio["base"]),
        "--aligned",
        str(trio["aligned"]),
        "--finetuned",
        str(trio["finetuned"]),
        "--harmful",
        str(harmful),
        "--benign",
        str(benign),
        "--out",
        str(out),
        "--q",
        "20",
        "--p",
        "10",
        "--device",
        "cpu",
        "--contrast",  # the random trio's aligned model refuses nothing: no refusal to contrast
        "0",
    ]


def test_apply_json(setup, tmp_path):
    trio, harmful, benign = setup
    proc = fgsn(*common(trio, harmful, benign, tmp_path / "out"), "--json", "--spaces", "mlp,attn")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    for key in ("curve", "band", "layer_counts", "selected", "skipped", "modification", "candidates"):
        assert key in record
    assert record["selected"] and {n["space"] for n in record["selected"]} <= {"mlp", "attn"}
    assert record["modification"]["denominator"]
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_apply_human_output_and_band_override(setup, tmp_path):
    trio, harmful, benign = setup
    proc = fgsn(*common(trio, harmful, benign, tmp_path / "out"), "--band", "1:2", "--operator", "restore")
    assert proc.returncode == 0, proc.stderr
    assert "band: layers 1-2 (override)" in proc.stdout
    assert "of all parameters stored in the fine-tuned checkpoint" in proc.stdout


@pytest.mark.parametrize(
    ("extra", "bad_file", "message"),
    [
        ((), b"", "no prompts"),
        ((), b"{oops\n", "not valid JSON"),
        (("--operator", "magic"), None, "unknown projection operator"),
        (("--band", "x"), None, "--band must look like START:END"),
        (("--q", "0"), None, "q must be in"),
        (("--hard-target", "lots"), None, "--hard-target must be a number of points or 'off'"),
        (("--hard-target", "-1"), None, "hard_target"),
    ],
)
def test_errors_are_clear_and_write_nothing(setup, tmp_path, extra, bad_file, message):
    trio, harmful, benign = setup
    if bad_file is not None:
        harmful = tmp_path / "bad.jsonl"
        harmful.write_bytes(bad_file)
    out = tmp_path / "out"
    proc = fgsn(*common(trio, harmful, benign, out), *extra)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_apply_default_contrast_without_aligned_refusals_is_a_clear_error(setup, tmp_path):
    trio, harmful, benign = setup
    args = common(trio, harmful, benign, tmp_path / "out")
    proc = fgsn(*args[: args.index("--contrast")])  # the default preset's contrast
    assert proc.returncode != 0
    assert "refused none of the dimension's harmful prompts" in proc.stderr and "contrast = 0" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_bad_calibration_file_is_a_clear_error_and_writes_nothing(setup, tmp_path):
    trio, harmful, benign = setup
    empty = tmp_path / "calibration.jsonl"
    empty.write_bytes(b"")
    cases = [
        ((tmp_path / "missing.jsonl",), "missing.jsonl"),
        ((empty,), "no prompts"),
        ((benign, "--hard-rounds", "0"), "needs entry units and --hard-rounds >= 1"),
    ]
    for (path, *extra), message in cases:
        out = tmp_path / "out"
        proc = fgsn(*common(trio, harmful, benign, out), "--calibration", str(path), *extra)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and message in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not out.exists()


def test_the_calibration_file_reaches_the_engine(setup, tmp_path, monkeypatch):
    """In process: the prompts of ``--calibration`` are what ``apply_dimension`` is given; without
    the option it is given none (and uses the benign prompts)."""
    from typer.testing import CliRunner

    from fgsn_daemon.cli.main import app
    from fgsn_daemon.core.errors import ConfigError
    from fgsn_daemon.engine import pipeline

    trio, harmful, benign = setup
    seen: list[object] = []

    def fake_apply(*args, calibration_prompts=None, params=None, **kwargs):
        seen.append((calibration_prompts, params.calibration_max))
        raise ConfigError("stopped by the test")

    monkeypatch.setattr(pipeline, "apply_dimension", fake_apply)
    prompts = ["Describe a calm lake.", "How do I fold a paper boat?"]
    calibration = write_jsonl(tmp_path / "calibration.jsonl", prompts)
    args = common(trio, harmful, benign, tmp_path / "out")
    for extra in (["--calibration", str(calibration)], [], ["--calibration-max", "7"]):
        result = CliRunner().invoke(app, args + extra)
        assert result.exit_code == 2 and "stopped by the test" in result.output
    assert seen == [(prompts, 200), (None, 200), (None, 7)]  # the cap: 200 unless given
    result = CliRunner().invoke(app, [*args, "--calibration-max", "0"])
    assert result.exit_code == 2 and "calibration_max" in result.output and len(seen) == 3
    result = CliRunner().invoke(app, [*args, "--calibration-max", "7", "--hard-rounds", "0"])
    assert result.exit_code == 2 and "--calibration-max shapes the set" in result.output and len(seen) == 3
