"""How far the first-order attribution is from the real loss change along the revert.

Walks a trio's fine-tuned model along the straight path to the aligned weights (every linear-layer
tensor of the attribution's spaces, t = 0, ¼, ½, ¾, 1) and prints, at each point, the refusal loss
(the aligned model's own responses to harmful train prompts) and the benign/task loss (the
fine-tuned model's own answers), each with ``Σ ∂L/∂W ⊙ D`` taken there. Then the real change of
the whole revert next to the first-order prediction at t = 0 and the trapezoid rule over the five
points (what ``path_steps`` integrates, with midpoints).

    python benchmarks/path_probe.py "$(fgsn lab path --model smollm2)" --per-dimension 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fgsn_daemon.engine.attribution import delta_effects, moved_along
from fgsn_daemon.engine.pipeline import FGSNParams, Localiser, ModelTrio
from fgsn_daemon.lab.efficacy import load_inputs
from fgsn_daemon.lab.experiments import trio_from_root

POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trio_root", type=Path)
    ap.add_argument("--per-dimension", type=int, default=8, help="harmful train prompts per dimension")
    ap.add_argument("--benign", type=int, default=32, help="benign/task train prompts")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = trio_from_root(args.trio_root)
    inputs = load_inputs(spec, "selection", 64, 128)
    harmful = [p for ps in inputs.train.values() for p in ps[: args.per_dimension]]
    benign = inputs.benign_train[: args.benign]
    trio = ModelTrio.open(spec.base, spec.aligned, spec.finetuned)
    try:
        params = FGSNParams(scoring="attribution", unit="neuron", allocation="global", scope="all")
        loc = Localiser(trio, params, torch.device("cpu"), benign)
        names = sorted(loc.scored_tensors(loc.attribution_layers()))
        refusals, answers = loc.aligned_responses(harmful), loc.finetuned_answers(benign)
        model = loc._finetuned()
        revert = loc.revert_deltas(names)
        rows = []
        for t in POINTS:
            with moved_along(model, revert, t):
                harm = delta_effects(model, loc.tokenizer, harmful, refusals, revert, batch_size=8)
                ben = delta_effects(model, loc.tokenizer, benign, answers, revert, batch_size=8)
            row = {
                "t": t,
                "refusal_loss": round(harm.loss, 4),
                "refusal_gradient_dot_delta": round(harm.total(), 4),
                "benign_loss": round(ben.loss, 4),
                "benign_gradient_dot_delta": round(ben.total(), 4),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        g = [r["refusal_gradient_dot_delta"] for r in rows]
        trapezoid = (g[0] / 2 + sum(g[1:-1]) + g[-1] / 2) / (len(g) - 1)
        summary = {
            "prompts": {"harmful": len(harmful), "benign": len(benign)},
            "refusal_real_change": round(rows[-1]["refusal_loss"] - rows[0]["refusal_loss"], 4),
            "refusal_first_order": g[0],
            "refusal_trapezoid": round(trapezoid, 4),
        }
        print(json.dumps(summary))
    finally:
        trio.close()


if __name__ == "__main__":
    main()
