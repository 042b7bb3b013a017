"""The efficacy harness with the path integration stopped part-way along the revert.

``path_steps = K`` averages ``∂L/∂W ⊙ D`` at the K midpoints of the whole revert (t in (0, 1)).
This probe scales those points by ``--span τ`` (t in (0, τ)): τ → 0 is the first-order score at
the fine-tuned weights, τ = 1 the integrated one. It answers whether the integrated score's gain on
one trio and its loss on another come from how far along the revert the gradients are taken. A lab
probe, not an engine option: the scaled effects get their own cache key, everything else (arguments,
tables) is the harness's own.

    python benchmarks/path_span_probe.py --span 0.25 --tiny --tiny-variant lora --out OUT \\
        --split report --threads 1 --random-seeds 0 --path-steps 3 --grid entry:5:all:0
"""

from __future__ import annotations

import sys

import fgsn_daemon.engine.attribution as attribution
import fgsn_daemon.lab.efficacy as efficacy


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--span":
        raise SystemExit("usage: path_span_probe.py --span TAU HARNESS-ARGS...")
    span = float(argv[1])
    if not 0.0 < span <= 1.0:
        raise SystemExit(f"--span must be in (0, 1] (got {span})")
    harness = argv[2:]
    steps = int(harness[harness.index("--path-steps") + 1]) if "--path-steps" in harness else 1
    if steps < 2:
        raise SystemExit(
            "give --path-steps 2 or more: with one point the score is first order, whatever the span"
        )
    whole_path = attribution.path_points
    attribution.path_points = lambda steps: [span * t for t in whole_path(steps)]
    keyed = efficacy.effects_key
    efficacy.effects_key = lambda *a, **k: f"{keyed(*a, **k)}-span{span:g}"
    efficacy.PROG = f"python benchmarks/path_span_probe.py --span {span:g}"  # the tables' command line
    return efficacy.main(harness)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
