"""The continual rule as a pure function: who owns which neuron, given an order of revisions.

Revisions are applied in order; each claims those of its candidates that no earlier revision has
claimed. Because candidates do not depend on what is frozen (they come from the revision's own
prompts and the lineage's fixed band and benign statistics), the same function answers "apply a
new dimension" (append), "roll back A" (remove A: later revisions pick up what A held) and
"replace a revision" (remove the old, append the new) — and the answer is, by construction, what
applying the remaining sequence from scratch would give.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fgsn_daemon.core.records import NeuronId


def assign_claims(
    order: Sequence[int], candidates: Mapping[int, Sequence[NeuronId]]
) -> dict[int, list[NeuronId]]:
    """Neurons each revision claims, in revision order (first come, first served)."""
    owner: dict[NeuronId, int] = {}
    claims: dict[int, list[NeuronId]] = {}
    for revision in order:
        mine = []
        for neuron in candidates[revision]:
            if neuron not in owner:
                owner[neuron] = revision
                mine.append(neuron)
        claims[revision] = mine
    return claims


def owners(claims: Mapping[int, Sequence[NeuronId]]) -> dict[NeuronId, int]:
    return {n: revision for revision, neurons in claims.items() for n in neurons}


def neurons_by_unit(claims: Mapping[int, Sequence[NeuronId]]) -> dict[tuple[int, str], list[int]]:
    """All claimed neurons grouped by (layer, space), as the checkpoint editor takes them."""
    grouped: dict[tuple[int, str], list[int]] = {}
    for neurons in claims.values():
        for n in neurons:
            grouped.setdefault((n.layer, n.space), []).append(n.index)
    return {k: sorted(v) for k, v in sorted(grouped.items())}
