"""Global and entry-level selection for delta scores, and the evaluation's intervals."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.core.records import NeuronId
from fgsn_daemon.core.stats import cluster_bootstrap_interval, paired_bootstrap_diff, wilson_interval
from fgsn_daemon.engine.delta_selection import (
    calibrated_weight,
    neurons_of_entries,
    select_entries,
    select_global,
)
from fgsn_daemon.engine.scorings import NeuronScores


def scores_of(gains: dict, costs: dict) -> dict:
    return {
        k: NeuronScores(torch.tensor(g, dtype=torch.float64), torch.tensor(costs[k]))
        for k, g in gains.items()
    }


def test_global_ranks_by_gain_per_parameter_across_layers_and_spends_the_budget():
    gains = {(0, "mlp"): [4.0, 1.0, -2.0], (1, "attn"): [3.0, 0.5, 0.0]}
    costs = {(0, "mlp"): [0.0, 0.0, 0.0], (1, "attn"): [0.0, 0.0, 0.0]}
    sizes = {(0, "mlp"): 4, (1, "attn"): 2}  # per parameter: mlp 1.0, 0.25; attn 1.5, 0.25
    sel = select_global(scores_of(gains, costs), sizes, budget=6, p=0)
    assert [(c.layer, c.index) for c in sel.candidates] == [(1, 0), (0, 0)]
    # the next unit (gain/param 0.25, size 2 or 4) would pass the budget of 6: stop
    assert sum(sizes[(c.layer, c.space)] for c in sel.candidates) <= 6
    big = select_global(scores_of(gains, costs), sizes, budget=100, p=0)
    # only units with positive gain are ever candidates
    assert {(c.layer, c.index) for c in big.candidates} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_global_excludes_the_costliest_units_and_skips_frozen_ones_without_changing_candidates():
    gains = {(0, "mlp"): [4.0, 3.0, 2.0, 1.0]}
    costs = {(0, "mlp"): [9.0, 0.0, 0.0, 0.0]}
    sizes = {(0, "mlp"): 1}
    sel = select_global(scores_of(gains, costs), sizes, budget=2, p=25)  # top 25 % by cost = unit 0
    assert [c.index for c in sel.candidates] == [1, 2]
    frozen = {NeuronId(0, "mlp", 1): "weapons"}
    sel2 = select_global(scores_of(gains, costs), sizes, budget=2, p=25, frozen=frozen)
    assert sel2.candidates == sel.candidates
    assert [s.index for s in sel2.selected] == [2]
    assert [(s.index, s.owner) for s in sel2.skipped] == [(1, "weapons")]
    assert sel2.counts[0].skipped == 1 and sel2.counts[0].selected == 1


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=30),
    st.integers(0, 40),
    st.sampled_from([0.0, 10.0, 50.0]),
)
def test_entries_match_a_sorted_reference(values, budget, p):
    gain = torch.tensor(values, dtype=torch.float32)
    values = gain.tolist()  # the reference sees the same float32 values
    half = len(values) // 2
    g = {"a": gain[:half].reshape(1, -1), "b": gain[half:].reshape(-1)}
    cost_flat = torch.arange(len(values), dtype=torch.float32)  # later entries cost more
    c = {"a": cost_flat[:half].reshape(1, -1), "b": cost_flat[half:].reshape(-1)}
    masks = select_entries(g, c, budget, p)
    chosen = torch.cat([masks["a"].flatten(), masks["b"].flatten()])
    k_excl = math.ceil(len(values) * p / 100)
    allowed = [i for i in range(len(values)) if i < len(values) - k_excl and values[i] > 0]
    ref = sorted(allowed, key=lambda i: (-values[i], i))[:budget]
    assert sorted(torch.nonzero(chosen).flatten().tolist()) == sorted(ref)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-5, 5, allow_nan=False), st.floats(-5, 5, allow_nan=False)),
        min_size=2,
        max_size=30,
    ),
    st.integers(0, 40),
    st.sampled_from([0.5, 1.0, 3.0]),
)
def test_contrast_ranks_positive_gain_entries_by_gain_minus_weighted_penalty(pairs, budget, contrast):
    gain = torch.tensor([g for g, _ in pairs], dtype=torch.float32)
    pen = torch.tensor([q for _, q in pairs], dtype=torch.float32)
    masks = select_entries({"a": gain}, {"a": torch.zeros_like(gain)}, budget, 0.0, {"a": pen}, contrast)
    score = (gain - torch.tensor(contrast, dtype=torch.float32) * pen).tolist()
    allowed = [i for i in range(len(pairs)) if float(gain[i]) > 0 and score[i] > 0]
    ref = sorted(allowed, key=lambda i: (-score[i], i))[:budget]
    assert sorted(torch.nonzero(masks["a"]).flatten().tolist()) == sorted(ref)


def test_contrast_drops_an_entry_that_makes_benign_prompts_refused():
    gain = {"w": torch.tensor([3.0, 2.0, 1.0])}
    cost = {"w": torch.zeros(3)}
    penalty = {"w": torch.tensor([2.9, 0.0, -1.0])}  # entry 0 restores refusal of benign prompts too
    assert select_entries(gain, cost, 2, 0.0)["w"].tolist() == [True, True, False]
    assert select_entries(gain, cost, 2, 0.0, penalty, 1.0)["w"].tolist() == [False, True, True]
    with pytest.raises(ConfigError):
        select_entries(gain, cost, 2, 0.0, None, 1.0)  # a contrast needs the penalty
    with pytest.raises(ConfigError):
        select_entries(gain, cost, 2, 0.0, penalty, -1.0)


def test_neurons_of_entries_counts_entries_per_neuron_along_the_right_axis():
    masks = {
        "gate": torch.tensor([[True, True, False], [False, False, False]]),  # rows = neurons
        "down": torch.tensor([[False, True], [False, True], [True, False]]),  # columns = neurons
    }
    units = {"gate": (3, "mlp", 0), "down": (3, "mlp", 1)}
    assert neurons_of_entries(masks, units) == {NeuronId(3, "mlp", 0): 3, NeuronId(3, "mlp", 1): 2}


def test_bad_budgets_are_refused():
    with pytest.raises(ConfigError):
        select_entries({"a": torch.ones(3)}, {"a": torch.zeros(3)}, -1, 0)
    with pytest.raises(ConfigError):
        select_global({}, {}, 10, 101)


def test_wilson_interval_known_values():
    w = wilson_interval(5, 10)
    assert w["rate"] == 0.5
    assert w["low"] == pytest.approx(0.2366, abs=1e-4) and w["high"] == pytest.approx(0.7634, abs=1e-4)
    zero = wilson_interval(0, 10)
    assert zero["low"] == 0.0 and zero["high"] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0)["high"] == 1.0


def test_paired_bootstrap_sees_identical_arms_as_no_difference_and_a_shift_as_a_shift():
    a = [1, 0, 1, 1, 0, 0, 1, 0]
    same = paired_bootstrap_diff(
        lambda idx: sum(a[i] for i in idx["x"]) - sum(a[i] for i in idx["x"]), {"x": 8}
    )
    assert same == (0, 0)
    b = [x + 1 for x in a]
    lo, hi = paired_bootstrap_diff(
        lambda idx: (sum(b[i] for i in idx["x"]) - sum(a[i] for i in idx["x"])) / len(idx["x"]), {"x": 8}
    )
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    # an unpaired-looking noisy difference has an interval that contains its point value
    c = [1, 1, 1, 0, 1, 1, 1, 1]
    lo, hi = paired_bootstrap_diff(
        lambda idx: (sum(c[i] for i in idx["x"]) - sum(a[i] for i in idx["x"])) / 8, {"x": 8}, draws=500
    )
    assert lo < (sum(c) - sum(a)) / 8 < hi


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(-3, 3), min_size=1, max_size=12), min_size=1, max_size=6),
    st.integers(0, 50),
    st.sampled_from([0.0, 10.0]),
)
def test_entries_over_many_tensors_with_ties_match_a_sorted_reference(groups, budget, p):
    """Many tensors and many equal scores: the two-pass selection (never concatenating the scores)
    keeps the order of tensor names, then positions, for ties, and the cost cutoff's ties too."""
    names = [f"t{i:02d}" for i in range(len(groups))]
    gain = {n: torch.tensor(g, dtype=torch.float32) for n, g in zip(names, groups, strict=True)}
    cost = {n: (gain[n] * 7 % 5).abs() for n in names}  # costs with ties as well
    masks = select_entries(gain, cost, budget, p)
    flat = [(n, i, float(v)) for n in names for i, v in enumerate(gain[n].tolist())]
    costs = [float(c) for n in names for c in cost[n].tolist()]
    k_excl = math.ceil(len(flat) * p / 100)
    cutoff = sorted(costs, reverse=True)[k_excl - 1] if k_excl else math.inf
    allowed = [j for j, (_, _, v) in enumerate(flat) if v > 0 and costs[j] < cutoff]
    ref = sorted(allowed, key=lambda j: (-flat[j][2], j))[:budget]
    chosen = [j for j, (n, i, _) in enumerate(flat) if bool(masks[n][i])]
    assert sorted(chosen) == sorted(ref)


def test_cluster_bootstrap_widens_when_failures_come_in_clusters():
    # 400 outcomes, 12 hits: scattered over 400 singleton clusters, or all in one of 20 frames
    hits = [i % 33 == 0 for i in range(400)][:400]
    assert sum(hits) == 13
    singletons = cluster_bootstrap_interval(hits, [str(i) for i in range(400)])
    wilson = wilson_interval(13, 400)
    assert singletons["rate"] == wilson["rate"] and singletons["clusters"] == 400
    # singleton clusters: the ordinary bootstrap, close to Wilson
    assert abs(singletons["low"] - wilson["low"]) < 0.01 and abs(singletons["high"] - wilson["high"]) < 0.01
    clustered = [i < 13 for i in range(400)]
    frames = [str(i // 20) for i in range(400)]  # the 13 hits share the first frame
    wide = cluster_bootstrap_interval(clustered, frames)
    assert wide["clusters"] == 20 and wide["rate"] == pytest.approx(13 / 400)
    assert wide["low"] == 0.0 and wide["high"] > wilson["high"] + 0.03
    with pytest.raises(ValueError, match="cluster labels"):
        cluster_bootstrap_interval([True], [])


def union_reference(
    gains: list[list[float]], penalty: list[float], cost: list[float], budget: int, p: float, contrast: float
) -> set[int]:
    """Dense reference: the largest t whose union of per-dimension top-t fits the budget."""
    excluded = set(sorted(range(len(cost)), key=lambda i: -cost[i])[: math.ceil(len(cost) * p / 100)])
    best: set[int] = set()
    for t in range(budget + 1):
        chosen: set[int] = set()
        for g in gains:
            # float32 scores, as the implementation computes them
            s32 = (torch.tensor(g) - contrast * torch.tensor(penalty)).tolist()
            scored = [(s32[i], i) for i, gi in enumerate(g) if gi > 0 and s32[i] > 0 and i not in excluded]
            scored.sort(key=lambda x: -x[0])
            chosen |= {i for _, i in scored[:t]}
        if len(chosen) > budget:
            break
        best = chosen
    return best


def distinct(values: list[float]) -> list[float]:
    return [v + 1e-6 * i for i, v in enumerate(values)]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-1, 1, allow_nan=False).map(lambda x: round(x, 3)), min_size=12, max_size=12),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.floats(-1, 1, allow_nan=False).map(lambda x: round(x, 3)), min_size=12, max_size=12),
    st.lists(st.floats(0, 1, allow_nan=False).map(lambda x: round(x, 3)), min_size=12, max_size=12),
    st.integers(0, 12),
    st.sampled_from([0.0, 25.0]),
    st.sampled_from([0.0, 0.5]),
)
# a negative-gain entry whose negative penalty alone would make its score positive
@example([[-0.1, 0.2] + [0.0] * 10], [-0.5] + [0.0] * 11, [0.0] * 12, 4, 0.0, 0.5)
def test_union_of_dimensions_matches_a_dense_reference(gains, penalty, cost, budget, p, contrast):
    from fgsn_daemon.engine.delta_selection import select_entries_union

    # distinct scores and costs, so "top t" and "top p %" have one answer; negative penalties
    # (reverting makes benign prompts less refused) raise a score, but only positive gains compete
    gains = [distinct(row) for row in gains]
    cost = distinct(cost)
    as_tensors = [{"w": torch.tensor(row, dtype=torch.float32).reshape(3, 4)} for row in gains]
    costs = {"w": torch.tensor(cost, dtype=torch.float32).reshape(3, 4)}
    pen = {"w": torch.tensor(penalty, dtype=torch.float32).reshape(3, 4)}
    masks = select_entries_union(as_tensors, costs, budget, p, pen, contrast)
    got = set(torch.nonzero(masks["w"].flatten()).flatten().tolist())
    g32 = [torch.tensor(row, dtype=torch.float32).tolist() for row in gains]
    c32 = torch.tensor(cost, dtype=torch.float32).tolist()
    p32 = torch.tensor(penalty, dtype=torch.float32).tolist()
    assert got == union_reference(g32, p32, c32, budget, p, contrast)
    assert len(got) <= budget


def test_union_takes_ties_together_and_refuses_bad_input():
    from fgsn_daemon.engine.delta_selection import select_entries_union

    tied = {"w": torch.tensor([[1.0, 1.0, 1.0, 0.5]])}
    zero = {"w": torch.zeros(1, 4)}
    # the three tied entries come in together or not at all
    assert select_entries_union([tied], zero, 3, 0.0)["w"].tolist() == [[True, True, True, False]]
    assert not select_entries_union([tied], zero, 2, 0.0)["w"].any()
    with pytest.raises(ConfigError):
        select_entries_union([tied], zero, 2, 0.0, None, 1.0)  # a contrast needs its penalty
    with pytest.raises(ConfigError):
        select_entries_union([tied], zero, -1, 0.0)
    with pytest.raises(ConfigError):
        select_entries_union([], zero, 2, 0.0)


def test_union_gives_each_dimension_its_own_best_entry():
    from fgsn_daemon.engine.delta_selection import select_entries_union

    # one dimension's gains are 100x the other's: a summed ranking would take only its entries
    loud = {"w": torch.tensor([[9.0, 8.0, 7.0, 0.0]]) * 100}
    quiet = {"w": torch.tensor([[0.0, 0.0, 0.0, 0.05]])}
    masks = select_entries_union([loud, quiet], {"w": torch.zeros(1, 4)}, 2, 0.0)
    assert masks["w"].tolist() == [[True, False, False, True]]


@settings(max_examples=60, deadline=None)
@given(
    threshold=st.floats(1e-3, 10.0),
    start=st.floats(1e-3, 10.0),
)
def test_calibrated_weight_finds_the_smallest_passing_weight_within_the_bisection(threshold, start):
    """A rate that falls through the limit at ``threshold``: the search returns a weight it tried;
    whenever six halvings or doublings reach the threshold, that weight passes, no smaller weight
    tried passed, and two log-space bisections bring it within a factor 2^(1/4) of the threshold."""

    def rate(w: float) -> float:
        return 0.02 if w >= threshold else 0.5

    weight, tried = calibrated_weight(rate, start, limit=0.05)
    assert (weight, rate(weight)) in tried
    ladder_reach = start / 2**6 <= threshold <= start * 2**6
    if ladder_reach:
        assert threshold <= weight <= threshold * 2 ** (1 / 4) * (1 + 1e-9)
        # nothing smaller that was tried passed
        assert all(r > 0.05 for w, r in tried if w < weight)
    assert len(tried) <= 1 + 6 + 2


def test_calibrated_weight_without_a_passing_weight_returns_the_least_refusing_and_refuses_zero():
    rates = {0.1: 0.4, 0.2: 0.3, 0.4: 0.3, 0.8: 0.35}

    def rate(w: float) -> float:
        return rates.get(round(w, 6), 0.9)

    weight, tried = calibrated_weight(rate, 0.1, limit=0.05, max_moves=3)
    assert [w for w, _ in tried] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert weight == pytest.approx(0.2)  # the lowest rate; the smaller weight on a tie
    with pytest.raises(ConfigError, match="hard_weight > 0"):
        calibrated_weight(rate, 0.0, limit=0.05)
