"""Where did the fine-tune break refusal? Restore one part of the model to aligned, measure ASR.

For a base/aligned/fine-tuned trio (lab layout: ``base/``, ``aligned/``, ``finetuned/``), this
copies the aligned weights of one part into the fine-tuned model, measures refusal on the held-out
harmful prompts of the bundled policies, and puts the part back. Parts: windows of ``--window``
layers (their attention q/k/v/o, their MLP gate/up/down, both), every attention, every MLP, the
embeddings + norms, and with ``--per-layer`` each layer's attention and MLP alone. The answer
says whether FGSN's premise — the safety that fine-tuning erodes sits in a band of mid layers —
holds for the trio, and which band.

    python benchmarks/layer_probe.py --trio "$(fgsn lab path --model smollm2)" \
        --out benchmarks/results/smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fgsn_daemon.core.policy import bundled_policies_dir
from fgsn_daemon.engine.evaluation import evaluate_loaded, load_policy_eval_sets

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def part_names(state: dict[str, torch.Tensor], layers: Sequence[int], modules: Sequence[str]) -> list[str]:
    names = [f"model.layers.{i}.{m}.weight" for i in layers for m in modules]
    missing = [n for n in names if n not in state]
    if missing:
        raise KeyError(f"not in the model: {missing[:3]}")
    return names


def outside_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """Embeddings, final norm, untied head and the per-layer norms."""
    return [n for n in state if not n.startswith("model.layers.") or "layernorm" in n]


@contextmanager
def restored(model: Any, aligned: dict[str, torch.Tensor], names: Sequence[str]) -> Iterator[None]:
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            params[n].copy_(aligned[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved[n])


def probe_parts(
    n_layers: int, window: int, state: dict[str, torch.Tensor], per_layer: bool
) -> dict[str, list[str]]:
    parts: dict[str, list[str]] = {}
    if per_layer:
        for i in range(n_layers):
            parts[f"L{i}/attn"] = part_names(state, [i], ATTN)
            parts[f"L{i}/mlp"] = part_names(state, [i], MLP)
    for s in range(0, n_layers, window):
        layers = list(range(s, min(n_layers, s + window)))
        for label, modules in (("attn", ATTN), ("mlp", MLP), ("all", ATTN + MLP)):
            parts[f"L{layers[0]}-{layers[-1]}/{label}"] = part_names(state, layers, modules)
    parts["all/attn"] = part_names(state, range(n_layers), ATTN)
    parts["all/mlp"] = part_names(state, range(n_layers), MLP)
    parts["embeddings+norms"] = outside_layers(state)
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trio", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="writes layer_probe.json here")
    ap.add_argument("--max-prompts", type=int, default=10, help="held-out prompts per dimension")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-layer", action="store_true", help="also each layer's attention and MLP alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load = lambda p: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()  # noqa: E731
    tok = AutoTokenizer.from_pretrained(str(args.trio / "finetuned"))
    model = load(args.trio / "finetuned")
    aligned = {k: v.detach() for k, v in load(args.trio / "aligned").state_dict().items()}
    total = sum(p.numel() for p in model.parameters())
    sets = load_policy_eval_sets(bundled_policies_dir())

    def asr() -> float:
        report = evaluate_loaded(
            model, tok, sets, max_prompts=args.max_prompts, max_new_tokens=args.max_new_tokens, batch_size=64
        )
        return round(float(report.mean_asr or 0.0), 4)

    results: dict[str, Any] = {"finetuned": {"asr": asr(), "share": 0.0}}
    with restored(model, aligned, [n for n, _ in model.named_parameters()]):
        results["aligned"] = {"asr": asr(), "share": 1.0}
    parts = probe_parts(len(model.model.layers), args.window, dict(model.named_parameters()), args.per_layer)
    log: Callable[[str], None] = lambda m: print(m, flush=True)  # noqa: E731
    for name, names in parts.items():
        with restored(model, aligned, names):
            share = sum(aligned[n].numel() for n in names) / total
            results[name] = {"asr": asr(), "share": round(share, 4)}
        log(f"{name:>18}: ASR {results[name]['asr']:.3f}  ({100 * share:.1f} % of parameters)")
    results["_meta"] = {
        "trio": str(args.trio),
        "prompts_per_dimension": args.max_prompts,
        "dimensions": sorted(sets),
        "max_new_tokens": args.max_new_tokens,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/layer_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "layer_probe.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
