"""``benchmarks/selection_frontier.py``: which rows it keeps, how it labels them, the target corner."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "selection_frontier", ROOT / "benchmarks" / "selection_frontier.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
    fr = load_script()
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
    study(  # the same setting again (kept once) and a hard-negative row of the first order
        tmp_path / "b" / "efficacy-both.json",
        "efficacy --grid y",
        410,
        [*refs, row("attribution/entry/0.5%/all/p0/c1/hard1x0.05", "fgsn", 0.18, 0.041, {"hard": 1})],
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
        ("first order, pooled, hard negatives", "entry/0.5%/all/p0/c1/hard1x0.05"),
        ("integrated, balanced", "entry/0.5%/all/p0/c0.8"),
    ]
    assert found["aligned_asr"] == 5.0 and found["finetuned_or"] == 0.0
    assert fr.write_table(points, found, tmp_path, "cmd") == 1  # only c0.7: 8.0 % ≤ 10, 4.0 % ≤ 5
    assert "**1 inside**" in (tmp_path / "selection-frontier.md").read_text()
