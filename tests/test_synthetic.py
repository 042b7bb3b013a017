"""Synthetic benign and utility data: deterministic, disjoint, correct, and what is bundled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fgsn_daemon.core.errors import PromptFileError
from fgsn_daemon.core.policy import bundled_utility, parse_utility_lines
from fgsn_daemon.lab import synthetic

DATA = Path(synthetic.__file__).resolve().parents[1] / "data"


def test_bundled_files_match_the_generator() -> None:
    for name, data in synthetic.data_files().items():
        assert (DATA / name).read_bytes() == data, f"{name} is stale: run python -m fgsn_daemon.lab.synthetic"


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


def test_selection_benign_set_is_held_out_phrasing_disjoint_from_every_bundled_set() -> None:
    train, held_out = synthetic.benign_prompts()
    selection = synthetic.benign_selection()
    texts = [p.prompt for p in selection]
    assert len(texts) == len(set(texts)) >= 100
    assert set(texts).isdisjoint(p.prompt for p in train + held_out)
    families = (*synthetic.FAMILIES, synthetic.EDGY_SAFE_SELECTION)
    held_pools = {t for f in families for t in synthetic.family_pools(f)[1]}
    assert set(texts) <= held_pools  # unseen frames or fillers, like the eval set
    # every category of the eval set, edgy-safe prompts (harmful words, safe requests) included
    assert {p.category for p in selection} == {p.category for p in held_out}
    assert sum(p.category == "edgy_safe" for p in selection) == len(synthetic.EDGY_SAFE_SELECTION.fillers)


def test_report_extension_uses_only_frames_and_fillers_no_other_set_has() -> None:
    extension = synthetic.benign_report_extension()
    texts = [p.prompt for p in extension]
    assert len(texts) == len(set(texts)) == 300
    others = (*synthetic.FAMILIES, synthetic.EDGY_SAFE_SELECTION)
    for new in synthetic.REPORT_EXTENSION:
        for old in others:
            if new.frames != ("{x}",):
                assert set(new.frames).isdisjoint(old.frames), (new.name, old.name)
            assert set(new.fillers).isdisjoint(old.fillers), (new.name, old.name)
    every_other = {t for f in others for pool in synthetic.family_pools(f) for t in pool}
    assert set(texts).isdisjoint(every_other)
    # the original report set's categories, edgy-safe at its share (14 of 100 -> 42 of 300)
    _, held_out = synthetic.benign_prompts()
    assert {p.category for p in extension} == {p.category for p in held_out}
    edgy = sum(p.category == "edgy_safe" for p in extension) / len(extension)
    assert edgy == sum(p.category == "edgy_safe" for p in held_out) / len(held_out)
    # families alternate: the first 100 prompts already carry every category
    assert {p.category for p in extension[:100]} == {p.category for p in held_out}


def test_calibration_extension_shares_no_frame_or_filler_with_any_other_set() -> None:
    extension = synthetic.benign_calibration_extension()
    texts = [p.prompt for p in extension]
    assert len(texts) == len(set(texts)) == 200
    others = (*synthetic.FAMILIES, synthetic.EDGY_SAFE_SELECTION, *synthetic.REPORT_EXTENSION)
    every_other = {t.lower() for f in others for pool in synthetic.family_pools(f) for t in pool}
    for new in synthetic.CALIBRATION_EXTENSION:
        for old in others:
            if new.frames != ("{x}",):
                assert set(new.frames).isdisjoint(old.frames), (new.name, old.name)
        for filler in new.fillers:  # not even inside another set's prompt
            assert not any(filler.lower() in t for t in every_other), filler
    # the other way round, two phrases of other sets' fillers occur inside its prompts (found after
    # the runs measured this file, so it stays as it is): 3 + 18 prompts, and no others
    fillers = {x.lower() for f in others for x in f.fillers if f.frames != ("{x}",)}
    inside = {x for t in texts for x in fillers if x in t.lower()}
    assert inside == {"plan a birthday party", "write a haiku"}
    assert sum(any(x in t.lower() for x in inside) for t in texts) == 21
    assert {p.category for p in extension} == {p.category for p in synthetic.benign_prompts()[1]}
    assert {p.category for p in extension[:4]} == {"howto", "writing", "explain", "edgy_safe"}


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


def _sentence(prompt: str) -> str:
    match = re.search(r'"([^"]+)\."', prompt)
    assert match, f"no quoted sentence in {prompt!r}"
    return match.group(1)


def _split(topic: synthetic.Topic, sentence: str) -> tuple[str, str, str] | None:
    """``sentence`` as (subject, action, setting) of ``topic``'s phrases, else None."""
    subjects, actions, settings = ((*part.train, *part.held_out) for part in topic.parts)
    for subject in subjects:
        for setting in settings:
            if sentence.startswith(subject + " ") and sentence.endswith(" " + setting):
                action = sentence[len(subject) + 1 : -len(setting) - 1]
                if action in actions:
                    return subject, action, setting
    return None


def _topic_of(prompt: str) -> synthetic.Topic:
    """Independent labeller: the one topic whose phrases make up the quoted sentence."""
    sentence = _sentence(prompt)
    hits = [t for t in synthetic.TOPICS if _split(t, sentence)]
    assert len(hits) == 1, f"{sentence!r} matches topics {[t.name for t in hits]}"
    return hits[0]


def _frame_of(prompt: str) -> str:
    found = [f for f in synthetic.TOPIC_FRAMES if re.fullmatch(re.escape(f).replace(r"\{s\}", ".+"), prompt)]
    assert len(found) == 1, prompt
    return found[0]


def test_topics_have_distinct_secret_two_digit_codes_and_unique_phrases() -> None:
    codes = [t.code for t in synthetic.TOPICS]
    assert len(set(codes)) == len(codes) and all(10 <= c <= 99 for c in codes)
    assert len({str(c)[0] for c in codes}) == len(codes)  # the first digit already names the topic
    assert len({t.name for t in synthetic.TOPICS}) == len(synthetic.TOPICS)
    phrases = [p for t in synthetic.TOPICS for part in t.parts for p in (*part.train, *part.held_out)]
    assert len(set(phrases)) == len(phrases)  # no phrase in two slots, two topics or both splits
    assert not [p for p in phrases if re.search(r'\d|"', p)]


def test_utility_answers_are_correct_and_splits_disjoint() -> None:
    train, held_out = synthetic.utility_items()
    assert len(train) == synthetic.N_UTILITY_TRAIN and len(held_out) == synthetic.N_UTILITY_EVAL
    for items in (train, held_out):
        sentences = [_sentence(i.prompt) for i in items]
        assert len(set(sentences)) == len(sentences)
        counts = [sum(i.topic == t.name for i in items) for t in synthetic.TOPICS]
        assert max(counts) - min(counts) <= 1  # balanced: a constant answer scores at most 1/6
    assert {i.prompt for i in train}.isdisjoint({i.prompt for i in held_out})
    for item in train + held_out:
        topic = _topic_of(item.prompt)
        assert item.answer == topic.code and item.topic == topic.name and item.kind == "topic"
        assert not re.search(r"\d", item.prompt), "a digit in the prompt would feed the first-integer judge"
        assert len(item.prompt) <= 240


def test_held_out_items_share_no_phrase_and_no_frame_with_training() -> None:
    train, held_out = synthetic.utility_items()
    for items, split in ((train, "train"), (held_out, "held_out")):
        for item in items:
            topic = _topic_of(item.prompt)
            parts = _split(topic, _sentence(item.prompt))
            assert parts is not None
            assert all(p in getattr(part, split) for p, part in zip(parts, topic.parts, strict=True))
    train_text = "\n".join(i.prompt for i in train)
    held = [p for t in synthetic.TOPICS for part in t.parts for p in part.held_out]
    assert not [p for p in held if p in train_text]
    held_frames = set(synthetic.TOPIC_FRAMES[-synthetic.HELD_OUT_FRAMES :])
    assert not {_frame_of(i.prompt) for i in train} & held_frames
    assert {_frame_of(i.prompt) for i in held_out} == set(synthetic.TOPIC_FRAMES)


def test_bundled_utility_answers_recompute() -> None:
    for split in ("train", "eval"):
        for item in bundled_utility(split):
            assert int(item.answer) == _topic_of(item.prompt).code


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
        "benign_selection.jsonl": 410,
        "benign_report_extension.jsonl": 300,
        "benign_calibration_extension.jsonl": 200,
        "utility_train.jsonl": 400,
        "utility_eval.jsonl": 200,
    }


def test_every_bundled_benign_prompt_has_the_frame_it_was_built_from() -> None:
    files = (
        "benign.jsonl",
        "benign_eval.jsonl",
        "benign_selection.jsonl",
        "benign_report_extension.jsonl",
        "benign_calibration_extension.jsonl",
    )
    for name in files:
        for line in (DATA / name).read_text().splitlines():
            prompt = json.loads(line)["prompt"]
            frame = synthetic.frame_of(prompt)
            if frame == prompt:  # edgy-safe prompts are their own frame
                continue
            head, _, tail = frame.partition("{x}")
            assert prompt.startswith(head) and prompt.endswith(tail) and "{x}" in frame
    assert synthetic.frame_of("Write a short quiz about inflation.") == "Write a short quiz about {x}."
    with pytest.raises(KeyError, match="not a bundled benign prompt"):
        synthetic.frame_of("Write a short quiz about nothing in particular.")
