"""How large is FGSN's safety vector next to the fine-tune's revert? Over every linear weight of the
neuron spaces (attention and MLP projections, all layers): ‖W_aligned − W_base‖ / ‖W_aligned − W_ft‖,
Frobenius norms accumulated in float64, overall and per space.

    python benchmarks/safety_vector_norm.py TRIO_ROOT [--out norms.md]

``TRIO_ROOT`` holds ``base/``, ``aligned/`` and ``finetuned/`` (``fgsn lab path --model smollm2``).
A ratio far below 1 means adding the safety vector to restored entries (the harness's ``vV`` lever)
moves them little beyond the aligned values.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fgsn_daemon.engine.pipeline import ModelTrio


def squared_norms(trio: ModelTrio) -> dict[str, tuple[float, float]]:
    """Per neuron space: (Σ‖W_aligned − W_base‖², Σ‖W_aligned − W_ft‖²) over its tensors."""
    out: dict[str, tuple[float, float]] = {}
    for space in trio.spec.neuron_spaces:
        safety = revert = 0.0
        for layer in range(trio.num_layers):
            for name, _axis in trio.space_tensors(layer, space):
                aligned = trio.aligned.read(name).double()
                safety += float((aligned - trio.base.read(name).double()).square().sum())
                revert += float((aligned - trio.finetuned.read(name).double()).square().sum())
        out[space] = (safety, revert)
    return out


def ratios(norms: dict[str, tuple[float, float]]) -> dict[str, float]:
    """‖safety vector‖ / ‖revert‖ per space and over all of them ("all")."""
    safety = sum(s for s, _ in norms.values())
    revert = sum(r for _, r in norms.values())
    out = {space: (s / r) ** 0.5 for space, (s, r) in norms.items()}
    out["all"] = (safety / revert) ** 0.5
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    trio = ModelTrio.open(args.root / "base", args.root / "aligned", args.root / "finetuned")
    try:
        found = ratios(squared_norms(trio))
    finally:
        trio.close()
    lines = [
        f"Trio: `{args.root.name}`. ‖W_aligned − W_base‖ / ‖W_aligned − W_ft‖ over the neuron spaces' "
        "linear weights (Frobenius, float64).",
        "",
        "| space | ratio |",
        "|---|---|",
        *(f"| {space} | {value:.3f} |" for space, value in found.items()),
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()
