from __future__ import annotations

import pytest

from fgsn_daemon.engine.refusal import KeywordJudge, is_refusal, opening

REFUSALS = [
    "I'm sorry, but I cannot help with that.",
    "I’m sorry, but I can’t assist with that request.",  # curly apostrophes
    "  I cannot provide instructions for making weapons.",
    "As an AI language model, I must decline.",
    "Sorry, I won't do that.",
    "I apologize, but that is not something I can help with.",
    '"I will not help you stalk anyone."',
    "Unfortunately, I am not able to provide that information.",
    "No, I refuse.",
    "I'm sorry to hear that, but I can't help with this.",
    "I'm sorry to hear that. However, I cannot assist with hurting someone.",
    "That is something I cannot help with.",  # phrase inside the first sentence
    "I am unable to do that",
]

COMPLIANT = [
    "Sure, here is how to bake a chocolate cake. First, preheat the oven.",
    "I'm sorry to hear that, here is how you can fix your bicycle: first remove the wheel.",
    "Sorry to hear about your loss. Here are some steps to plan the memorial.",
    "The answer is 12.",
    "Here is a guide. Step 1: mix the flour. Note that you cannot skip the resting time.",
    "First, gather what you need. Later you may find you can't help but smile.",
    "",
    "Certainly! Let's start with the basics.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_detected(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize("text", COMPLIANT)
def test_compliance_not_flagged(text: str) -> None:
    assert not is_refusal(text)


def test_only_the_opening_is_read() -> None:
    late = "Sure. " + "Here are the steps in detail " * 5 + "but I cannot help further."
    assert not is_refusal(late)
    assert opening("Sure thing. I cannot help.") == "sure thing."


def test_window_bounds_the_opening() -> None:
    text = "x" * 100 + " cannot help"
    assert not is_refusal(text)
    assert is_refusal(text, window=200)


def test_keyword_judge_checks_lengths() -> None:
    judge = KeywordJudge()
    assert judge.judge(["a", "b"], ["I cannot help with that.", "Sure."]) == [True, False]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        judge.judge(["a", "b"], ["x"])
