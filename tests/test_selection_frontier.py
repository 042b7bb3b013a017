"""``benchmarks/selection_frontier.py``: which rows it keeps, how it labels them, the target corner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark


def row(
    name: str, group: str, asr: float, over: float, setting: dict | None = None, split: str = "selection"
):
    out = {
        "name": name,
        "split": split,
        "group": group,
        "mean_asr": asr,
        "over_refusal": {"rate": over},
        "utility": {"rate": 0.9},
    }
    return out | ({"setting": setting} if setting is not None else {})


def study(path: Path, command: str, benign: int, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = {"selection": {"benign_eval": benign}}
    path.write_text(
        json.dumps({"kind": "efficacy", "command": command, "prompt_counts": counts, "rows": rows})
    )


def test_points_are_labelled_deduplicated_and_checked_against_the_corner(tmp_path: Path) -> None:
    fr = load_benchmark("selection_frontier")
    refs = [row("aligned", "reference", 0.05, 0.30), row("finetuned", "reference", 0.98, 0.0)]
    plain = {"hard": 0, "hard_positive": 0.0}
    study(
        tmp_path / "a" / "efficacy-selection.json",
        "efficacy --path-steps 3 --balance-dimensions --grid x",
        410,
        [
            *refs,
            row("attribution/entry/0.5%/all/p0/c0.8", "fgsn", 0.115, 0.049, plain),
            row("attribution/entry/0.5%/all/p0/c0.7", "fgsn", 0.08, 0.04, plain),  # inside the corner
            row("random/x", "random", 1.0, 0.0),
            row("attribution/entry/0.5%/all/p0/c0.8", "fgsn", 0.2, 0.2, plain, split="report"),
        ],
    )
    hard = {"hard": 1}
    study(  # the same setting re-run (kept once) and a hard-negative row
        tmp_path / "b" / "efficacy-both.json",
        "efficacy --path-steps=3 --balance-dimensions --grid y",
        410,
        [
            *refs,
            row("attribution/entry/0.5%/all/p0/c0.8", "fgsn", 0.115, 0.049, plain),
            row("attribution/entry/0.5%/all/p0/c1/hard1x0.05", "fgsn", 0.18, 0.041, hard),
        ],
    )
    study(
        tmp_path / "c" / "efficacy-selection.json",
        "efficacy --grid z",
        380,
        [*refs, row("old", "fgsn", 0, 0, plain)],
    )
    points, found = fr.collect([tmp_path], 410)
    assert [(p.family, p.setting) for p in points] == [
        ("integrated, balanced", "entry/0.5%/all/p0/c0.7"),
        ("integrated, balanced, hard negatives", "entry/0.5%/all/p0/c1/hard1x0.05"),
        ("integrated, balanced", "entry/0.5%/all/p0/c0.8"),
    ]
    assert points[-1].source.endswith("a/efficacy-selection.json")  # the re-run is not a new point
    assert found["aligned_asr"] == 5.0 and found["finetuned_or"] == 0.0
    assert fr.write_table(points, found, tmp_path, "cmd") == 1  # only c0.7: 8.0 % ≤ 10, 4.0 % ≤ 5
    assert "**1 inside**" in (tmp_path / "selection-frontier.md").read_text()


def test_a_re_run_that_disagrees_and_other_options_are_not_merged(tmp_path: Path) -> None:
    fr = load_benchmark("selection_frontier")
    assert fr.family_of("x --path-steps 5 --max-train-prompts 32 --calibration c.jsonl", {}) == (
        "integrated K=5, pooled, 32 train prompts per dimension, calibration c.jsonl"
    )
    edited = {"hard": 1, "hard_at": "edited"}
    assert fr.family_of("x", edited) == "first order, pooled, hard negatives at the edit"
    assert (
        fr.family_of("x", {**edited, "hard_positive": 0.1})
        == "first order, pooled, hard positives at the edit"
    )
    calibrated = {"hard": 1, "hard_target": 1.0}
    assert fr.family_of("x", calibrated) == "first order, pooled, hard negatives, calibrated weight"
    assert fr.family_of("x", {"hard": 1, "hard_target": None}) == "first order, pooled, hard negatives"
    assert fr.family_of("x", {"strength": 1.0, "safety": 0.0}) == "first order, pooled"  # restored
    assert fr.family_of("x", {"strength": 1.5}) == "first order, pooled, strength along the revert"
    assert fr.family_of("x", {"safety": 0.5}) == "first order, pooled, plus the safety vector"
    assert fr.family_of("x", {"energy": 0.5}) == "first order, pooled, benign output energy"
    assert fr.family_of("x --contrast-prompts /a/look.jsonl", {}) == (
        "first order, pooled, contrast on look.jsonl"
    )
    refs = [row("aligned", "reference", 0.05, 0.30), row("finetuned", "reference", 0.98, 0.0)]
    for name, asr in (("a", 0.1), ("b", 0.2)):
        rows = [*refs, row("s", "fgsn", asr, 0.0, {"hard": 0})]
        study(tmp_path / name / "efficacy-selection.json", "efficacy --grid x", 410, rows)
    with pytest.raises(SystemExit, match="disagree"):
        fr.collect([tmp_path], 410)
