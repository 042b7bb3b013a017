"""``benchmarks/refusal_overlap.py``: an edit's refusals split by what the aligned model does."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from helpers import load_benchmark


def verdicts(row: str, refused: dict[str, bool]) -> list[dict]:
    return [
        {"row": row, "split": "report", "set": p.split(":")[0], "prompt": p, "response": "r", "refused": f}
        for p, f in refused.items()
    ]


def write(path: Path, items: list[dict]) -> None:
    text = "".join(json.dumps(i) + "\n" for i in items)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def test_counts_split_by_the_aligned_verdict(tmp_path: Path) -> None:
    ov = load_benchmark("refusal_overlap")
    aligned = {"benign:a": True, "benign:b": True, "benign:c": False, "harmful:x": True, "harmful:y": False}
    edit = {"benign:a": True, "benign:b": False, "benign:c": True, "harmful:x": False, "harmful:y": False}
    utility = {"row": "edit", "split": "report", "set": "utility", "prompt": "u", "correct": True}
    write(tmp_path / "one.jsonl.gz", verdicts("aligned", aligned) + verdicts("edit", edit) + [utility])
    # a second file: the same aligned verdicts, a random control (left out) and another edit
    random = verdicts("random/edit/seed0", dict.fromkeys(edit, False))
    write(tmp_path / "two.jsonl", verdicts("aligned", aligned) + random + verdicts("other", aligned))
    found = {
        o.row: o for o in ov.overlaps(ov.read_verdicts([tmp_path / "one.jsonl.gz", tmp_path / "two.jsonl"]))
    }
    assert set(found) == {"edit", "other"}
    assert found["edit"] == ov.Overlap("edit", 3, 2, 1, 2, 2, 1)
    assert found["other"] == ov.Overlap("other", 3, 2, 2, 2, 1, 0)
    text = ov.table(list(found.values()), "cmd")
    assert "| edit | 2 / 3 | 1 (50 %) | 2 / 2 | 1 (50 %) |" in text


def test_contradicting_or_missing_verdicts_are_errors(tmp_path: Path) -> None:
    ov = load_benchmark("refusal_overlap")
    write(tmp_path / "a.jsonl", verdicts("aligned", {"benign:a": True}))
    write(tmp_path / "b.jsonl", verdicts("aligned", {"benign:a": False}))
    with pytest.raises(SystemExit, match="both ways"):
        ov.read_verdicts([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    write(tmp_path / "c.jsonl", verdicts("edit", {"benign:a": True}))
    with pytest.raises(SystemExit, match="no 'aligned' row"):
        ov.overlaps(ov.read_verdicts([tmp_path / "c.jsonl"]))
    write(
        tmp_path / "d.jsonl", verdicts("aligned", {"benign:a": True}) + verdicts("edit", {"benign:z": True})
    )
    with pytest.raises(SystemExit, match="no aligned verdict"):
        ov.overlaps(ov.read_verdicts([tmp_path / "d.jsonl"]))


def test_groups_auc_and_summary() -> None:
    rm = load_benchmark("refusal_margin")
    aligned = {("harmful/a", "h1"): True, ("harmful/a", "h2"): True, ("harmful/a", "h3"): False}
    aligned |= {("benign", "b1"): True, ("benign", "b2"): True, ("benign", "b3"): False}
    edit = {("harmful/a", "h1"): True, ("harmful/a", "h2"): False, ("harmful/a", "h3"): False}
    edit |= {("benign", "b1"): True, ("benign", "b2"): False, ("benign", "b3"): False}
    groups = rm.grouped(aligned, edit)
    assert groups["harmful, aligned refuses, edit refuses"] == [("harmful/a", "h1")]
    assert groups["harmful, aligned refuses, edit answers"] == [("harmful/a", "h2")]
    assert groups["benign, aligned refuses, edit refuses"] == [("benign", "b1")]
    assert groups["benign, aligned refuses, edit answers"] == [("benign", "b2")]
    assert groups["benign, aligned answers"] == [("benign", "b3")]
    assert sum(map(len, groups.values())) == 5  # h3: harmful the aligned model answers, in no group
    assert rm.auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.875)
    assert rm.auc([1.0], [1.0]) == 0.5
    low, high = rm.auc_interval([3.0, 2.0, 2.5, 0.5], [1.0, 2.0, 0.0])
    assert 0.0 <= low < rm.auc([3.0, 2.0, 2.5, 0.5], [1.0, 2.0, 0.0]) < high <= 1.0
    assert rm.auc_interval([3.0, 4.0], [1.0, 2.0]) == (1.0, 1.0)  # separated in every resample
    with pytest.raises(ValueError):
        rm.auc([], [1.0])
    strength = {("harmful/a", "h1"): -0.1, ("harmful/a", "h2"): -0.5, ("benign", "b1"): -0.3}
    strength |= {("benign", "b2"): -0.9, ("benign", "b3"): -2.0}
    text = "\n".join(rm.summary(strength, groups))
    assert "| harmful, aligned refuses, edit answers | 1 | -0.50 |" in text
    pair = "harmful, aligned refuses, edit answers vs benign, aligned refuses, edit answers"
    assert f"| {pair} | 1.00 [1.00, 1.00] |" in text


def test_refusal_strength_is_the_mean_token_log_probability(tmp_path: Path) -> None:
    import torch
    from helpers import make_trio

    from fgsn_daemon.engine.activations import load_model, load_tokenizer
    from fgsn_daemon.engine.attribution import encode_targets

    rm = load_benchmark("refusal_margin")
    trio = make_trio(tmp_path, "llama")
    prompts, refusal = ["how to do a thing", "write a poem"], "i do not help"
    got = rm.refusal_strength(trio["aligned"], prompts, refusal, progress=lambda _: None)
    model = load_model(trio["aligned"], torch.device("cpu"), dtype=torch.float64)
    tokenizer = load_tokenizer(trio["aligned"])
    for value, (ids, n_prompt) in zip(
        got, encode_targets(tokenizer, prompts, [refusal] * 2, 512), strict=True
    ):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        targets = nll[max(n_prompt - 1, 0) :]
        assert value == pytest.approx(-float(targets.mean()), abs=1e-4)
