"""The default FGSN setting, in one place: the engine, the daemon's settings, ``fgsn apply`` and
the experiment harness all read it. Chosen by measurement (README "Choosing the default"):
on the tiny organism, contrast scoring with the restore operator beat the paper's reading
(Wanda + Safe LoRA) for every operator/scoring pairing, and q = 10 % over MLP + attention
neurons gave the largest margin over random neurons within the 5 % parameter and 3-point
utility budgets; on SmolLM2 no setting differed from random neurons.
"""

from __future__ import annotations

SCORING = "contrast"
OPERATOR = "restore"
Q = 10.0  # top-q % of neurons by harmful score, per (layer, space)
P = 5.0  # minus the top-p % by benign score
SPACES: tuple[str, ...] = ("mlp", "attn")
ALLOCATION = "per_layer"  # attribution only: per_layer (q % of each band layer) | global (a budget)
BUDGET = 1.0  # attribution with global allocation: percent of all parameters
SCOPE = "all"  # attribution with global allocation: all layers compete, or the band only
UNIT = "neuron"  # attribution only: neuron | entry (single weight entries, restored to aligned)
