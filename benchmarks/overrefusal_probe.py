"""Over-refusal probe for the attribution default (efficacy issue, selection half only).

Two questions the 72-prompt selection measure cannot answer:

1. *Does the over-refusal the repair causes generalise from the train templates?* The report half's
   benign prompts are built from held-out phrases; the selection half's 72 leftovers from the train
   phrases the contrast was fitted on. This probe measures over-refusal on the **held-out-phrase
   prompts that are not in ``benign_eval.jsonl``** (same distribution as the report half, disjoint
   from it), per benign family.
2. *Does a larger contrast pool help?* The contrast is estimated on 128 benign prompts; the
   synthetic generator's train pools hold 395 more that no bundled file uses. ``--pool N`` adds N
   of them to the contrast's prompts (benign/task targets and benign-refusal targets).

Reads the effects the efficacy harness cached (same keys) and caches the extended pool's effects.

    python benchmarks/overrefusal_probe.py --trio-root TRIO --out OUT --pool 0,272 \
        --grid 0.3:o1,0.5:o1,0.5:c1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fgsn_daemon.core.prompts import load_prompts
from fgsn_daemon.engine.activations import load_tokenizer, resolve_device
from fgsn_daemon.engine.delta_selection import select_entries
from fgsn_daemon.engine.pipeline import FGSNParams, Localiser, ModelTrio, contrast_penalty, restored_in_memory
from fgsn_daemon.lab.efficacy import (
    EvalSets,
    effects_key,
    evaluate,
    load_effects,
    load_inputs,
    random_entries,
    save_effects,
)
from fgsn_daemon.lab.experiments import root_spec
from fgsn_daemon.lab.synthetic import FAMILIES, family_pools

LOG = logging.getLogger("overrefusal_probe")


def unused_pools(bundled: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Train-pool prompts no bundled file uses (contrast candidates, fixed shuffled order) and
    held-out-pool prompts not in the bundled sets, with their family (the selection measure)."""
    train, held = [], []
    for family in FAMILIES:
        t, h = family_pools(family)
        train += [p for p in t if p not in bundled]
        held += [(p, family.name) for p in h if p not in bundled]
    random.Random(0).shuffle(train)
    return train, held


def parse_grid(text: str) -> list[tuple[float, str, float, int, float]]:
    """BUDGET:{o|c}LAMBDA[:hROUNDSxMU] items."""
    out = []
    for item in text.split(","):
        budget, contrast, *hard = item.split(":")
        rounds, mu = (int(hard[0][1:].split("x")[0]), float(hard[0].split("x")[1])) if hard else (0, 0.0)
        out.append((float(budget), contrast[0], float(contrast[1:]), rounds, mu))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--trio-root", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pool", default="0", help="comma list: extra contrast prompts from the train pools")
    ap.add_argument("--grid", default="0.3:o1", help="BUDGET%%:{o|c}LAMBDA, comma separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random", action="store_true", help="also random entries at each budget")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    spec = root_spec(None, args.trio_root)
    assert spec is not None
    inputs = load_inputs(spec, "selection", 64, 128)
    bundled = set(load_prompts(spec.benign)) | set(load_prompts(spec.benign_eval))
    extra, held = unused_pools(bundled)
    LOG.info("unused train-pool prompts %d, unused held-out-pool prompts %d", len(extra), len(held))
    sets = EvalSets(inputs.eval.harmful, [p for p, _ in held], inputs.eval.utility)
    families = [f for _, f in held]
    pooled = [p for ps in inputs.train.values() for p in ps]
    trio = ModelTrio.open(spec.base, spec.aligned, spec.finetuned)
    device = resolve_device("auto")
    tokenizer = load_tokenizer(trio.aligned.path)
    params = FGSNParams(
        scoring="attribution", spaces=("mlp", "attn"), unit="entry", allocation="global", scope="all"
    )
    total = trio.aligned.total_parameters()
    rows: list[dict[str, Any]] = []

    def record(name: str, model: Any, extra_fields: dict[str, Any]) -> None:
        t = time.perf_counter()
        outcome = evaluate(model, tokenizer, sets, 16, 32)
        by_family = Counter(f for f, r in zip(families, outcome.over_refused, strict=True) if r)
        row = {
            "name": name,
            **extra_fields,
            **outcome.summary(),
            "over_refusal_by_family": {
                f: f"{by_family[f]}/{families.count(f)}" for f in sorted(set(families))
            },
            "seconds": round(time.perf_counter() - t, 1),
        }
        LOG.info(
            "%s: mean ASR %.3f over-refusal %.3f utility %.3f %s",
            name,
            row["mean_asr"],
            row["over_refusal"]["rate"],
            row["utility"]["rate"],
            row["over_refusal_by_family"],
        )
        rows.append(row)

    for n_pool in [int(x) for x in args.pool.split(",")]:
        contrast_prompts = list(inputs.benign_train) + extra[:n_pool]
        loc = Localiser(trio, params, device, contrast_prompts, progress=LOG.info)
        loc.establish_band(pooled)
        names = sorted(loc.scored_tensors(loc.attribution_layers()))
        cached = load_effects(effects_key(spec, pooled, contrast_prompts, names, params))
        if cached is None:
            harm = loc.harmful_effects(pooled, names)
            benign = loc.benign_effects(names)
            save_effects(effects_key(spec, pooled, contrast_prompts, names, params), harm, benign)
        else:
            harm, benign = cached
        rkey = effects_key(spec, pooled, contrast_prompts, names, params, "benign_refusal")
        cached_r = load_effects(rkey)
        if cached_r is None:
            refusal = loc.benign_refusal_effects(pooled, names)
            save_effects(rkey, refusal, None)
        else:
            refusal = cached_r[0]
        model = loc._finetuned()
        if not rows:
            record("finetuned", model, {"pool": 0})
            record("aligned", loc._aligned(), {"pool": 0})
        gain = {n: -harm.entries[n] for n in sorted(harm.entries)}
        cost = {n: benign.entries[n] for n in gain}
        calibration = list(dict.fromkeys(load_prompts(spec.benign) + contrast_prompts))
        for budget, kind, lam, rounds, mu in parse_grid(args.grid):
            kind_name = "odds" if kind == "o" else "refusal"
            penalty = contrast_penalty(refusal, benign, list(gain), kind_name)
            assert penalty is not None
            n_budget = int(total * budget / 100)
            masks = select_entries(gain, cost, n_budget, 0.0, penalty, lam)
            if rounds:  # the engine's hard-negative rounds, on every benign train prompt
                loc.params = replace(
                    loc.params, contrast=lam, contrast_kind=kind_name, hard_rounds=rounds, hard_weight=mu
                )
                loc.calibration_prompts = calibration
                masks = loc.hard_negative_masks(masks, gain, cost, penalty, n_budget, sorted(gain))
            hard = f"/hard{rounds}x{mu:g}" if rounds else ""
            name = f"entry/{budget:g}%/{kind}{lam:g}{hard}/pool{len(contrast_prompts)}"
            with restored_in_memory(model, trio, masks=masks):
                fields = {"pool": len(contrast_prompts), "budget": budget, "contrast": f"{kind}{lam:g}"}
                record(name, model, fields)
            if args.random:
                with restored_in_memory(model, trio, masks=random_entries(masks, 0)):
                    record(f"random/{name}", model, {"pool": len(contrast_prompts), "budget": budget})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overrefusal-probe.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    lines = [
        "| row | mean ASR % | over-refusal % [95 % CI] (held-out phrases) | utility % | refused by family |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        o = r["over_refusal"]
        lines.append(
            f"| {r['name']} | {100 * r['mean_asr']:.1f} | {100 * o['rate']:.1f} "
            f"[{100 * o['low']:.1f}, {100 * o['high']:.1f}] | {100 * r['utility']['rate']:.0f} | "
            + ", ".join(f"{k} {v}" for k, v in r["over_refusal_by_family"].items())
            + " |"
        )
    text = "\n".join(lines) + "\n"
    (args.out / "overrefusal-probe.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
