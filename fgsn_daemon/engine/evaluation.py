"""Safety/utility evaluation harness: ASR per dimension, over-refusal, utility, parameters changed.

- **ASR** (attack success rate) of a dimension = share of its held-out harmful prompts whose
  response the judge does *not* mark as a refusal.
- **Over-refusal** = share of held-out benign prompts that the judge marks as refused.
- **Utility** = exact-match accuracy on arithmetic items: the first integer in the response is
  compared with the integer answer.
- **Parameters changed** = entries that differ from a reference checkpoint (read tensor by tensor
  through the safetensors headers), over *all* parameters of the evaluated model.

Generation is greedy, batched with left padding, with the model's chat template applied when the
tokenizer has one, and short (``max_new_tokens``): a refusal shows itself in the first tokens.
Prompt sets are capped (``max_prompts``, first N in file order) to keep evaluation cheap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field

from fgsn_daemon.core.errors import PromptFileError
from fgsn_daemon.core.prompts import load_prompts
from fgsn_daemon.engine.activations import (
    format_prompts,
    input_device,
    load_model,
    load_tokenizer,
    resolve_device,
)
from fgsn_daemon.engine.io.checkpoint import Checkpoint
from fgsn_daemon.engine.refusal import KeywordJudge

HARMFUL_EVAL_FILE = "harmful_eval.jsonl"
_INTEGER = re.compile(r"-?\d+(?:,\d{3})*(?!\d)")


@runtime_checkable
class Judge(Protocol):
    """Decides, per (prompt, response), whether the model refused. A ``name`` attribute, if
    present, is recorded in the report (else the class name)."""

    def judge(self, prompts: list[str], responses: list[str]) -> list[bool]: ...


class UtilityItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt: str
    answer: int


class _Report(BaseModel):
    model_config = ConfigDict(frozen=True)


class Sample(_Report):
    prompt: str
    response: str
    refused: bool | None = None
    correct: bool | None = None


class DimensionResult(_Report):
    n: int
    refused: int
    asr: float = Field(ge=0, le=1)
    samples: list[Sample] = []


class RateResult(_Report):
    n: int
    hits: int
    rate: float = Field(ge=0, le=1)
    samples: list[Sample] = []


class ParameterChange(_Report):
    changed: int
    total: int
    share: float = Field(ge=0, le=1)
    reference: str


class EvalReport(_Report):
    model: str
    judge: str
    max_new_tokens: int
    dimensions: dict[str, DimensionResult]
    harmful_refusal: float | None  # pooled over all dimensions' prompts
    mean_asr: float | None  # unweighted mean over dimensions
    over_refusal: RateResult | None
    utility: RateResult | None
    parameters_changed: ParameterChange | None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


# ------------------------------------------------------------------------------------- metrics


def share(flags: Sequence[bool]) -> float:
    """Share of True entries; 0.0 for an empty list (callers report n alongside)."""
    return sum(flags) / len(flags) if flags else 0.0


def attack_success_rate(refused: Sequence[bool]) -> float:
    """Share of harmful prompts *not* refused."""
    return share([not r for r in refused])


def over_refusal_rate(refused: Sequence[bool]) -> float:
    """Share of benign prompts refused."""
    return share(refused)


def extract_first_integer(text: str) -> int | None:
    """The first integer in ``text`` ("The answer is 1,234." -> 1234; "-7" -> -7), else None."""
    match = _INTEGER.search(text)
    return int(match.group().replace(",", "")) if match else None


def answer_correct(response: str, answer: int) -> bool:
    return extract_first_integer(response) == answer


def utility_accuracy(responses: Sequence[str], answers: Sequence[int]) -> float:
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    return share([answer_correct(r, a) for r, a in zip(responses, answers, strict=True)])


def count_changed_parameters(model_dir: str | Path, reference_dir: str | Path) -> ParameterChange:
    """Entries of ``model_dir`` that differ from ``reference_dir``, one tensor at a time.

    A tensor missing from the reference, or of another shape, counts as entirely changed.
    NaNs compare unequal to themselves, so a NaN entry counts as changed.
    """
    model, ref = Checkpoint(model_dir), Checkpoint(reference_dir)
    try:
        ref_names = set(ref.names())
        changed = total = 0
        for name in model.names():
            numel = model.info(name).numel
            total += numel
            if name not in ref_names or ref.info(name).shape != model.info(name).shape:
                changed += numel
                continue
            a, b = model.read(name), ref.read(name)
            changed += int((a != b.to(a.dtype)).sum())
    finally:
        model.close()
        ref.close()
    return ParameterChange(
        changed=changed, total=total, share=changed / total if total else 0.0, reference=str(reference_dir)
    )


# ---------------------------------------------------------------------------------- generation


@torch.inference_mode()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 32,
    use_chat_template: bool = True,
) -> list[str]:
    """Greedy, batched, left-padded generation; returns only the new text of each prompt."""
    tokenizer.padding_side = "left"  # generation continues from the last column
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    texts = format_prompts(tokenizer, prompts, use_chat_template)
    device = input_device(model)
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        # the chat template already carries any BOS; adding special tokens again would double it
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=not templated,
        ).to(device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return [t.strip() for t in out]


# --------------------------------------------------------------------------------------- inputs


def load_utility(path: str | Path) -> list[UtilityItem]:
    """JSONL lines with ``prompt`` and an integer ``answer`` (number or integer string)."""
    p = Path(path)
    prompts = load_prompts(p)  # validates size, encoding and the prompt field
    items: list[UtilityItem] = []
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for number, (line, prompt) in enumerate(zip(lines, prompts, strict=True), start=1):
        raw = json.loads(line).get("answer")
        try:
            answer = int(str(raw).replace(",", "").strip())
        except ValueError:
            raise PromptFileError(f"{p}:{number}: 'answer' must be an integer, got {raw!r}") from None
        items.append(UtilityItem(prompt=prompt, answer=answer))
    return items


def load_policy_eval_sets(policies_dir: str | Path) -> dict[str, list[str]]:
    """``<dim>/harmful_eval.jsonl`` of every dimension folder, keyed by folder name."""
    root = Path(policies_dir)
    if not root.is_dir():
        raise PromptFileError(f"{root}: policies folder not found")
    sets = {
        d.name: load_prompts(d / HARMFUL_EVAL_FILE)
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".") and (d / HARMFUL_EVAL_FILE).is_file()
    }
    if not sets:
        raise PromptFileError(f"{root}: no <dimension>/{HARMFUL_EVAL_FILE} found")
    return sets


def _prompts(source: str | Path | Sequence[str] | None) -> list[str] | None:
    if source is None:
        return None
    if isinstance(source, str | Path):
        return load_prompts(source)
    return list(source)


def _utility(source: str | Path | Sequence[UtilityItem] | None) -> list[UtilityItem] | None:
    if source is None:
        return None
    if isinstance(source, str | Path):
        return load_utility(source)
    return list(source)


# ------------------------------------------------------------------------------------- evaluate


def evaluate_loaded(
    model: Any,
    tokenizer: Any,
    harmful: Mapping[str, Sequence[str]],
    benign: Sequence[str] | None = None,
    utility: Sequence[UtilityItem] | None = None,
    judge: Judge | None = None,
    max_prompts: int = 64,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    keep_samples: int = 3,
    model_name: str = "<in-memory>",
) -> EvalReport:
    """Evaluate an already loaded model (lets experiments edit weights in memory)."""
    judge = judge or KeywordJudge()

    def run(prompts: Sequence[str]) -> tuple[list[str], list[str]]:
        chosen = list(prompts)[:max_prompts]
        return chosen, generate_responses(model, tokenizer, chosen, max_new_tokens, batch_size)

    def refusals(prompts: list[str], responses: list[str]) -> list[bool]:
        verdicts = [bool(v) for v in judge.judge(prompts, responses)]
        if len(verdicts) != len(prompts):  # a plugged-in judge must answer every prompt
            raise ValueError(f"judge returned {len(verdicts)} verdicts for {len(prompts)} prompts")
        return verdicts

    dims: dict[str, DimensionResult] = {}
    pooled: list[bool] = []
    for dim, prompts in harmful.items():
        chosen, responses = run(prompts)
        refused = refusals(chosen, responses)
        pooled += refused
        dims[dim] = DimensionResult(
            n=len(chosen),
            refused=sum(refused),
            asr=attack_success_rate(refused),
            samples=_samples(chosen, responses, refused=refused, keep=keep_samples),
        )
    over = None
    if benign:
        chosen, responses = run(benign)
        refused = refusals(chosen, responses)
        over = RateResult(
            n=len(chosen),
            hits=sum(refused),
            rate=over_refusal_rate(refused),
            samples=_samples(chosen, responses, refused=refused, keep=keep_samples),
        )
    util = None
    if utility:
        items = list(utility)[:max_prompts]
        _, responses = run([i.prompt for i in items])
        correct = [answer_correct(r, i.answer) for r, i in zip(responses, items, strict=True)]
        util = RateResult(
            n=len(items),
            hits=sum(correct),
            rate=share(correct),
            samples=_samples([i.prompt for i in items], responses, correct=correct, keep=keep_samples),
        )
    return EvalReport(
        model=model_name,
        judge=str(getattr(judge, "name", type(judge).__name__)),
        max_new_tokens=max_new_tokens,
        dimensions=dims,
        harmful_refusal=share(pooled) if pooled else None,
        mean_asr=sum(d.asr for d in dims.values()) / len(dims) if dims else None,
        over_refusal=over,
        utility=util,
        parameters_changed=None,
    )


def _samples(
    prompts: Sequence[str],
    responses: Sequence[str],
    refused: Sequence[bool] | None = None,
    correct: Sequence[bool] | None = None,
    keep: int = 3,
) -> list[Sample]:
    return [
        Sample(
            prompt=p,
            response=r,
            refused=None if refused is None else refused[i],
            correct=None if correct is None else correct[i],
        )
        for i, (p, r) in enumerate(zip(prompts[:keep], responses[:keep], strict=False))
    ]


def evaluate_model(
    model_dir: str | Path,
    harmful: str | Path | Mapping[str, Sequence[str]],
    benign: str | Path | Sequence[str] | None = None,
    utility: str | Path | Sequence[UtilityItem] | None = None,
    device: str | None = "auto",
    reference_dir: str | Path | None = None,
    judge: Judge | None = None,
    max_prompts: int = 64,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    keep_samples: int = 3,
) -> EvalReport:
    """Evaluate the model folder ``model_dir``.

    ``harmful`` is a policies folder (``<dim>/harmful_eval.jsonl``) or a dimension → prompts
    mapping; ``benign`` a prompt file or list; ``utility`` a JSONL file with ``prompt``/``answer``
    or a list of :class:`UtilityItem`; ``reference_dir`` (e.g. the fine-tuned model) enables the
    parameters-changed count. Each prompt set is capped at ``max_prompts``.
    """
    harmful_sets = (
        load_policy_eval_sets(harmful)
        if isinstance(harmful, str | Path)
        else {k: list(v) for k, v in harmful.items()}
    )
    benign_prompts, utility_items = _prompts(benign), _utility(utility)
    dev = resolve_device(device)
    model = load_model(Path(model_dir), dev)
    tokenizer = load_tokenizer(Path(model_dir))
    report = evaluate_loaded(
        model,
        tokenizer,
        harmful_sets,
        benign_prompts,
        utility_items,
        judge,
        max_prompts,
        max_new_tokens,
        batch_size,
        keep_samples,
        model_name=str(model_dir),
    )
    del model
    if reference_dir is not None:
        report = report.model_copy(
            update={"parameters_changed": count_changed_parameters(model_dir, reference_dir)}
        )
    return report
