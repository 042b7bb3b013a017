"""Synthetic benign and utility data: deterministic, disjoint, correct, and what is bundled."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from fgsn_daemon import synthetic
from fgsn_daemon.errors import PromptFileError
from fgsn_daemon.policy import bundled_utility, parse_utility_lines

DATA = Path(synthetic.__file__).resolve().parent / "data"


def test_bundled_files_match_the_generator() -> None:
    for name, data in synthetic.data_files().items():
        assert (DATA / name).read_bytes() == data, f"{name} is stale: run python -m fgsn_daemon.synthetic"


def test_generation_is_deterministic_and_seed_dependent() -> None:
    assert synthetic.data_files() == synthetic.data_files()
    assert synthetic.data_files(seed=1) != synthetic.data_files()


def test_benign_sizes_disjoint_and_unique() -> None:
    train, held_out = synthetic.benign_prompts()
    assert len(train) == synthetic.N_BENIGN_TRAIN and len(held_out) == synthetic.N_BENIGN_EVAL
    train_texts = [p.prompt for p in train]
    eval_texts = [p.prompt for p in held_out]
    assert len(set(train_texts)) == len(train_texts) and len(set(eval_texts)) == len(eval_texts)
    assert set(train_texts).isdisjoint(eval_texts)
    assert (
        {p.category for p in train} == {p.category for p in held_out} == {f.name for f in synthetic.FAMILIES}
    )


def test_family_pools_hold_out_frames_and_fillers() -> None:
    for family in synthetic.FAMILIES:
        train, held_out = synthetic.family_pools(family)
        assert set(train).isdisjoint(held_out)
        assert len(train) + len(held_out) == len(family.frames) * len(family.fillers)
        held_fillers = family.fillers[len(family.fillers) - family.eval_fillers :]
        assert not any(f in t for t in train for f in held_fillers)


@pytest.mark.parametrize(("total", "weights"), [(200, [360, 114, 95]), (7, [1, 1, 1]), (0, [3, 4])])
def test_share_sums_exactly(total: int, weights: list[int]) -> None:
    counts = synthetic._share(total, weights)
    assert sum(counts) == total
    assert all(abs(c - total * w / sum(weights)) < 1 for c, w in zip(counts, weights, strict=True))


def _recompute(prompt: str) -> int:
    """Independent solver for the generator's templates, from the numbers in the text."""
    n = [int(x) for x in re.findall(r"\d+", prompt)]
    if " buys " in prompt and " more." in prompt:
        return n[0] + n[1]
    if " gave " in prompt:
        return n[0] - n[1]
    if " packs of " in prompt:
        return n[0] * n[1]
    if "shared equally" in prompt:
        return n[0] // n[1]
    if "per hour" in prompt:
        return n[0] * n[1] - n[2]
    if "smallest number of boxes" in prompt:
        return math.ceil(n[1] / n[0])
    raise AssertionError(f"unknown template: {prompt}")


def test_utility_answers_are_correct_and_splits_disjoint() -> None:
    train, held_out = synthetic.utility_problems()
    assert len(train) == synthetic.N_UTILITY_TRAIN and len(held_out) == synthetic.N_UTILITY_EVAL
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held_out})
    for problem in train + held_out:
        assert problem.answer == _recompute(problem.prompt) and problem.answer >= 0
    assert {p.kind for p in held_out} == {"add", "sub", "mul", "div", "two_step", "ceil_div"}


def test_division_problems_divide_exactly() -> None:
    train, _ = synthetic.utility_problems()
    for p in train:
        if p.kind == "div":
            total, children = (int(x) for x in re.findall(r"\d+", p.prompt)[:2])
            assert total % children == 0


def test_bundled_utility_answers_recompute() -> None:
    for split in ("train", "eval"):
        for item in bundled_utility(split):
            assert int(item.answer) == _recompute(item.prompt)


def test_parse_utility_lines_errors() -> None:
    good = json.dumps({"prompt": "1+1?", "answer": "2"}).encode()
    assert parse_utility_lines(good + b"\n\n", "u")[0].answer == "2"
    with pytest.raises(PromptFileError, match="u:2: 'answer'"):
        parse_utility_lines(good + b"\n" + json.dumps({"prompt": "x", "answer": 3}).encode(), "u")
    with pytest.raises(PromptFileError, match="no prompts"):
        parse_utility_lines(b"", "u")


def test_write_data_counts(tmp_path: Path) -> None:
    counts = synthetic.write_data(tmp_path)
    assert counts == {
        "benign.jsonl": 200,
        "benign_eval.jsonl": 100,
        "utility_train.jsonl": 400,
        "utility_eval.jsonl": 100,
    }
