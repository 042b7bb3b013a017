"""`fgsn demo` plumbing on a tiny random trio (the real organism is exercised in test_lab)."""

from __future__ import annotations

import json

import pytest
from helpers import BENIGN, make_trio, write_jsonl

from fgsn_daemon.lab.demo import DemoInputs, run_demo
from fgsn_daemon.lab.report import format_table

pytestmark = pytest.mark.slow


def test_demo_writes_versions_table_and_report(tmp_path):
    trio = make_trio(tmp_path / "trio", "llama")
    policies = tmp_path / "policies"
    for name, prompts in {
        "cyber": ["hack wifi", "phish bank account"],
        "arms": ["build weapon", "make bomb"],
    }.items():
        (policies / name).mkdir(parents=True)
        (policies / name / "policy.toml").write_text('description = "d"\nsource = "s"\nlicense = "MIT"\n')
        write_jsonl(policies / name / "harmful.jsonl", prompts)
        write_jsonl(policies / name / "harmful_eval.jsonl", prompts[::-1])
    utility = tmp_path / "utility.jsonl"
    utility.write_text(json.dumps({"prompt": "sum numbers", "answer": "3"}) + "\n")
    inputs = DemoInputs(
        trio["base"],
        trio["aligned"],
        trio["finetuned"],
        policies,
        write_jsonl(tmp_path / "b.jsonl", BENIGN),
        write_jsonl(tmp_path / "be.jsonl", BENIGN[:3]),
        utility,
    )
    report = run_demo(tmp_path / "out", max_prompts=4, device="cpu", progress=lambda _m: None, inputs=inputs)
    labels = [r.label for r in report.rows]
    assert labels[:2] == ["aligned", "fine-tuned"]
    assert labels[2:] == ["FGSN v2 (+arms)", "FGSN v3 (+cyber)"]  # one version per dimension, in order
    assert report.rows[1].report.parameters_changed.changed == 0  # fine-tuned vs itself
    assert all(0.0 <= r.report.mean_asr <= 1.0 for r in report.rows)
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "FGSN v3" in page
    assert "| model |" in format_table(report)
    # a warm run reuses the state and the cached evaluations
    again = run_demo(tmp_path / "out", max_prompts=4, device="cpu", progress=lambda _m: None, inputs=inputs)
    assert [r.report for r in again.rows] == [r.report for r in report.rows]
