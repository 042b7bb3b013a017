from __future__ import annotations

import random

from fgsn_daemon.core.records import NeuronId
from fgsn_daemon.engine.continual import assign_claims, neurons_by_unit, owners


def n(i: int, layer: int = 3) -> NeuronId:
    return NeuronId(layer, "mlp", i)


def test_first_come_first_served_and_rollback_hands_neurons_on():
    cands = {1: [n(0), n(1), n(2)], 2: [n(1), n(3)], 3: [n(2), n(3), n(4)]}
    claims = assign_claims([1, 2, 3], cands)
    assert claims == {1: [n(0), n(1), n(2)], 2: [n(3)], 3: [n(4)]}
    without_1 = assign_claims([2, 3], cands)
    assert without_1 == {2: [n(1), n(3)], 3: [n(2), n(4)]}
    assert owners(without_1)[n(2)] == 3
    assert neurons_by_unit(claims) == {(3, "mlp"): [0, 1, 2, 3, 4]}


def test_claims_are_disjoint_and_cover_the_union():
    rng = random.Random(0)
    for _ in range(50):
        revs = list(range(rng.randint(1, 6)))
        cands = {r: [n(rng.randrange(30)) for _ in range(rng.randint(0, 10))] for r in revs}
        claims = assign_claims(revs, cands)
        flat = [x for v in claims.values() for x in v]
        assert len(flat) == len(set(flat))
        assert set(flat) == {x for v in cands.values() for x in v}
        # appending a revision never changes what earlier revisions hold
        extra = assign_claims([*revs, 99], {**cands, 99: [n(rng.randrange(30)) for _ in range(5)]})
        assert all(extra[r] == claims[r] for r in revs)
