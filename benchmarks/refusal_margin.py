"""How strongly does the aligned model refuse each prompt, and does that strength separate the
harmful prompts an edit still answers from the benign prompts it must keep answering?

The strength is the aligned model's mean log-probability per token of its own most frequent
refusal (teacher-forced, chat template as at inference) after the prompt. Prompts are grouped by
the verdicts of a ``--responses`` run: harmful prompts the aligned model refuses, split by whether
the edit ``--row`` refuses them; benign prompts the aligned model refuses (its over-refusals),
split the same way; benign prompts the aligned model answers. The AUC says how often a harmful
prompt that the aligned model refuses gets a stronger refusal than a benign one it refuses
(0.5 = no separation).

    python benchmarks/refusal_margin.py --aligned ALIGNED_DIR --row ROW RESPONSES.jsonl[.gz] ... [--out F]
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the verdict reader next to this file
import refusal_overlap

GROUPS = (
    ("harmful, aligned refuses, edit refuses", "harmful", True, True),
    ("harmful, aligned refuses, edit answers", "harmful", True, False),
    ("benign, aligned refuses, edit refuses", "benign", True, True),
    ("benign, aligned refuses, edit answers", "benign", True, False),
    ("benign, aligned answers", "benign", False, None),
)


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney U over n·m)."""
    if not positive or not negative:
        raise ValueError("both groups need at least one value")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def auc_interval(
    positive: Sequence[float], negative: Sequence[float], draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of ``auc``: each group resampled with replacement."""
    rng = random.Random(seed)
    values = sorted(
        auc(rng.choices(positive, k=len(positive)), rng.choices(negative, k=len(negative)))
        for _ in range(draws)
    )
    return values[int(0.025 * draws)], values[int(0.975 * draws) - 1]


def grouped(
    aligned: dict[tuple[str, str], bool], edit: dict[tuple[str, str], bool]
) -> dict[str, list[tuple[str, str]]]:
    """The prompts of each group (``GROUPS``), in the responses' order."""
    out: dict[str, list[tuple[str, str]]] = {name: [] for name, *_ in GROUPS}
    for key, refused in edit.items():
        kind = (
            "harmful" if key[0].startswith("harmful") else "benign" if key[0].startswith("benign") else None
        )
        for name, group_kind, by_aligned, by_edit in GROUPS:
            if kind == group_kind and aligned[key] == by_aligned and by_edit in (None, refused):
                out[name].append(key)
    return out


def summary(strength: dict[tuple[str, str], float], groups: dict[str, list[tuple[str, str]]]) -> list[str]:
    lines = [
        "| group | prompts | refusal log-prob per token: median [quartiles] |",
        "|---|---|---|",
    ]
    for name, keys in groups.items():
        values = sorted(strength[k] for k in keys)
        if len(values) >= 2:
            q1, med, q3 = statistics.quantiles(values, n=4)
            cell = f"{med:.2f} [{q1:.2f}, {q3:.2f}]"
        else:
            cell = f"{values[0]:.2f}" if values else "–"
        lines.append(f"| {name} | {len(values)} | {cell} |")
    pairs = (
        ("harmful, aligned refuses, edit answers", "benign, aligned refuses, edit answers"),
        ("harmful, aligned refuses, edit answers", "benign, aligned refuses, edit refuses"),
        ("harmful, aligned refuses, edit refuses", "benign, aligned refuses, edit answers"),
    )
    lines += ["", "| stronger refusal than … | AUC [95 % bootstrap CI] |", "|---|---|"]
    for pos, neg in pairs:
        if groups[pos] and groups[neg]:
            a, b = [strength[k] for k in groups[pos]], [strength[k] for k in groups[neg]]
            low, high = auc_interval(a, b)
            lines.append(f"| {pos} vs {neg} | {auc(a, b):.2f} [{low:.2f}, {high:.2f}] |")
    return lines


def refusal_strength(
    aligned_dir: Path, prompts: Sequence[str], refusal: str, progress: Callable[[str], None] = print
) -> list[float]:
    """Mean log-probability per token of ``refusal`` (plus end of sequence) after each prompt,
    under the aligned model, in float32 on the CPU."""
    import torch

    from fgsn_daemon.engine.activations import load_model, load_tokenizer
    from fgsn_daemon.engine.attribution import encode_targets

    model = load_model(aligned_dir, torch.device("cpu"))
    tokenizer = load_tokenizer(aligned_dir)
    out = []
    with torch.no_grad():
        for k, (ids, n_prompt) in enumerate(
            encode_targets(tokenizer, prompts, [refusal] * len(prompts), 512)
        ):
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None])[:, 0]
            out.append(float(logp[max(n_prompt - 1, 0) :].mean()))
            if (k + 1) % 100 == 0:
                progress(f"{k + 1}/{len(prompts)} prompts")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("responses", nargs="+", type=Path)
    ap.add_argument("--aligned", type=Path, required=True, help="the aligned model's folder")
    ap.add_argument("--row", required=True, help="the edited row whose verdicts split the groups")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    items = list(refusal_overlap.judged_items(args.responses))  # each file read once
    rows = refusal_overlap.read_verdicts(args.responses, items)
    if "aligned" not in rows or args.row not in rows:
        raise SystemExit(f"the responses need an 'aligned' row and {args.row!r}; rows: {sorted(rows)}")
    aligned, edit = rows["aligned"], rows[args.row]
    missing = [k for k in edit if k not in aligned]
    if missing:
        raise SystemExit(f"{args.row}: {missing[0]} has no aligned verdict (responses of another run?)")
    said = collections.Counter(
        item["response"] for _, item in items if item["row"] == "aligned" and item["refused"]
    )
    if not said:
        raise SystemExit("the aligned model refuses no prompt in these responses: no refusal to score")
    refusal = said.most_common(1)[0][0]
    keys = list(edit)
    values = refusal_strength(
        args.aligned, [p for _, p in keys], refusal, lambda m: print(m, file=sys.stderr)
    )
    strength = dict(zip(keys, values, strict=True))
    command = f"python benchmarks/refusal_margin.py --aligned {args.aligned} --row '{args.row}' " + " ".join(
        str(p) for p in args.responses
    )
    lines = [f"Command: `{command}`", "", f"Refusal scored: {refusal!r}", ""]
    lines += summary(strength, grouped(aligned, edit))
    refusal_overlap.emit("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
