"""``attribution``: the first-order refusal-loss drop of reverting a unit's fine-tune delta, against
the benign loss rise. A gradient scoring: the ``Localiser`` computes it from backward passes at the
fine-tuned weights (``fgsn_daemon.engine.attribution``); it is declared here so that it is chosen
like any other."""

from __future__ import annotations

from fgsn_daemon.engine.scorings.base import Scoring, register


@register
class DeltaAttribution(Scoring):
    name = "attribution"
    summary = "refusal-loss drop of reverting the fine-tune delta (backward passes)"
    uses_activation_stats = False
