"""Is the tiny organism a good FGSN yardstick? Restore top-k% vs random-k% MLP neurons.

Neurons are MLP intermediate units (``gate_proj``/``up_proj`` row i, ``down_proj`` column i),
ranked over all layers by |mean act(harmful) - mean act(benign)| in the *aligned* model, where
act is the input of ``mlp.down_proj`` at the last prompt token (chat template applied). Each
restore copies the aligned values of the chosen units into the fine-tuned model, then measures
refusal on the held-out harmful prompts, over-refusal and utility. If the ranked neurons bring
back much more refusal than random ones at the same budget, the organism carries the signal
FGSN relies on (offline_assets §4.2: top-10% 0.86 vs random 0.55).

    python benchmarks/organism_probe.py [--trio DIR] [--percents 5 10 20] [--random-seeds 2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fgsn_daemon.core.prompts import load_prompts
from fgsn_daemon.engine.activations import format_prompts
from fgsn_daemon.engine.evaluation import EvalReport, evaluate_loaded, load_policy_eval_sets, load_utility
from fgsn_daemon.lab import organism as lab


@torch.inference_mode()
def last_token_mlp_means(model: Any, tokenizer: Any, prompts: Sequence[str], batch: int = 64) -> torch.Tensor:
    """Mean down_proj input at the last prompt token, per layer: shape (layers, intermediate)."""
    tokenizer.padding_side = "left"  # last column is then every prompt's last token
    layers = model.model.layers
    sums = torch.zeros(len(layers), layers[0].mlp.down_proj.in_features, dtype=torch.float64)
    handles = []
    for i, layer in enumerate(layers):

        def hook(_m: Any, args: tuple[torch.Tensor, ...], i: int = i) -> None:
            sums[i] += args[0][:, -1].to(torch.float64).sum(0)

        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        texts = format_prompts(tokenizer, prompts)
        for s in range(0, len(texts), batch):
            enc = tokenizer(texts[s : s + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    return sums / len(prompts)


def restore_mlp_units(target: Any, source: Any, units: Sequence[tuple[int, int]]) -> None:
    """Copy source's gate/up rows and down columns of ``units`` ((layer, index) pairs) into target."""
    with torch.no_grad():
        for layer, idx in units:
            t, s = target.model.layers[layer].mlp, source.model.layers[layer].mlp
            t.gate_proj.weight[idx] = s.gate_proj.weight[idx]
            t.up_proj.weight[idx] = s.up_proj.weight[idx]
            t.down_proj.weight[:, idx] = s.down_proj.weight[:, idx]


def top_units(score: torch.Tensor, percent: float) -> list[tuple[int, int]]:
    k = max(1, round(score.numel() * percent / 100))
    flat = torch.topk(score.flatten(), k).indices.tolist()
    return [(i // score.shape[1], i % score.shape[1]) for i in flat]


def random_units(shape: tuple[int, int], percent: float, seed: int) -> list[tuple[int, int]]:
    k = max(1, round(shape[0] * shape[1] * percent / 100))
    flat = random.Random(seed).sample(range(shape[0] * shape[1]), k)
    return [(i // shape[1], i % shape[1]) for i in flat]


def summary(report: EvalReport) -> dict[str, float]:
    return {
        "refusal": round(report.harmful_refusal or 0.0, 3),
        "over_refusal": round(report.over_refusal.rate if report.over_refusal else 0.0, 3),
        "utility": round(report.utility.rate if report.utility else 0.0, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--trio", type=Path, default=None, help="trio folder (default: build/reuse the cached one)"
    )
    ap.add_argument("--percents", type=float, nargs="+", default=[5.0, 10.0, 20.0])
    ap.add_argument("--random-seeds", type=int, default=2)
    ap.add_argument("--score-prompts", type=int, default=200)
    ap.add_argument("--max-prompts", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    paths = lab.TrioPaths.at(args.trio) if args.trio else lab.tiny_trio()
    tok = AutoTokenizer.from_pretrained(str(paths.aligned))
    load = lambda p: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()  # noqa: E731
    aligned, finetuned = load(paths.aligned), load(paths.finetuned)
    rng = random.Random(0)
    harmful_train = [p for d in lab.DIMENSIONS for p in load_prompts(paths.policies / d / "harmful.jsonl")]
    harmful_scoring = rng.sample(harmful_train, min(args.score_prompts, len(harmful_train)))
    benign_all = load_prompts(paths.benign)
    benign_scoring = rng.sample(benign_all, min(args.score_prompts, len(benign_all)))
    score = (
        last_token_mlp_means(aligned, tok, harmful_scoring)
        - last_token_mlp_means(aligned, tok, benign_scoring)
    ).abs()
    sets = load_policy_eval_sets(paths.policies)
    benign_eval, utility = load_prompts(paths.benign_eval), load_utility(paths.utility_eval)

    def evaluate(model: Any) -> dict[str, float]:
        return summary(
            evaluate_loaded(
                model,
                tok,
                sets,
                benign_eval,
                utility,
                max_prompts=args.max_prompts,
                max_new_tokens=10,
                batch_size=64,
            )
        )

    def restored(units: Sequence[tuple[int, int]]) -> dict[str, float]:
        model = load(paths.finetuned)
        restore_mlp_units(model, aligned, units)
        return evaluate(model)

    shape = (score.shape[0], score.shape[1])
    results: dict[str, Any] = {"aligned": evaluate(aligned), "finetuned": evaluate(finetuned)}
    for pct in args.percents:
        rand = [restored(random_units(shape, pct, seed)) for seed in range(args.random_seeds)]
        results[f"top{pct:g}%"] = restored(top_units(score, pct))
        results[f"random{pct:g}%"] = {k: round(sum(r[k] for r in rand) / len(rand), 3) for k in rand[0]}
    results["all_mlp"] = restored([(layer, i) for layer in range(shape[0]) for i in range(shape[1])])
    top_layers = torch.bincount(torch.tensor([u[0] for u in top_units(score, 10.0)]), minlength=shape[0])
    results["top10%_units_per_layer"] = top_layers.tolist()
    results["seconds"] = round(time.perf_counter() - t0, 1)
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
