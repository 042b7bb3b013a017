"""Projection operators against dense float64 references built the obvious (d×d) way."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.engine.operators import operator_names
from fgsn_daemon.engine.projection import BLOCK, TensorTriple, parse_operator, project_tensor


def dense_reference(
    op: str, ft: torch.Tensor, al: torch.Tensor, base: torch.Tensor, rank: int
) -> torch.Tensor:
    """Op applied to the whole delta with explicit d_out×d_out matrices (float64)."""
    ft, al, base = ft.double(), al.double(), base.double()
    v, delta = al - base, ft - al
    if op == "safe_lora":
        c = v @ v.T / torch.linalg.norm(v)
        return al + c @ delta
    if op == "projector":
        u = torch.linalg.svd(v, full_matrices=False)[0][:, :rank]
        return al + u @ u.T @ delta
    if op == "restore":
        return al.clone()
    raise AssertionError(op)


def per_neuron_reference(ft, al, base, axis):
    ft, al, base = ft.double(), al.double(), base.double()
    v, delta = al - base, ft - al
    out = al.clone()
    n = ft.shape[axis]
    for i in range(n):
        vi = v[i] if axis == 0 else v[:, i]
        di = delta[i] if axis == 0 else delta[:, i]
        new = vi * (vi @ di) / (vi @ vi)
        if axis == 0:
            out[i] += new
        else:
            out[:, i] += new
    return out


def random_triple(d_out: int, d_in: int, seed: int) -> TensorTriple:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d_out, d_in, generator=g)
    al = base + 0.1 * torch.randn(d_out, d_in, generator=g)
    ft = al + 0.05 * torch.randn(d_out, d_in, generator=g)
    return TensorTriple(ft, al, base)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


@settings(max_examples=25, deadline=None)
@given(
    op=st.sampled_from(["safe_lora", "projector", "per_neuron", "restore"]),
    d_out=st.integers(2, 40),
    d_in=st.integers(2, 40),
    axis=st.integers(0, 1),
    seed=st.integers(0, 10_000),
    rank=st.integers(1, 6),
    data=st.data(),
)
def test_operators_match_dense_reference(op, d_out, d_in, axis, seed, rank, data):
    t = random_triple(d_out, d_in, seed)
    n = t.finetuned.shape[axis]
    chosen = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
    got = project_tensor(op, t, axis, chosen, rank=rank)
    if op == "per_neuron":
        ref = per_neuron_reference(t.finetuned, t.aligned, t.base, axis)
    else:
        ref = dense_reference(op, t.finetuned, t.aligned, t.base, rank)
    mask = torch.zeros_like(t.finetuned, dtype=torch.bool)
    if axis == 0:
        mask[chosen] = True
    else:
        mask[:, chosen] = True
    # Selected slices follow the reference; the rest is the fine-tuned tensor, bit for bit.
    assert rel_err(got[mask], ref.float()[mask]) < 1e-5
    assert torch.equal(got[~mask], t.finetuned[~mask])


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("op", ["safe_lora", "projector", "per_neuron"])
def test_multi_block_tensor_matches_reference(op, axis):
    size = 2 * BLOCK + 17
    t = random_triple(size if axis == 0 else 24, 24 if axis == 0 else size, seed=3)
    chosen = [0, 5, BLOCK - 1, BLOCK, BLOCK + 3, 2 * BLOCK + 16]
    got = project_tensor(op, t, axis, chosen, rank=4)
    ref = (
        per_neuron_reference(t.finetuned, t.aligned, t.base, axis)
        if op == "per_neuron"
        else dense_reference(op, t.finetuned, t.aligned, t.base, 4)
    )
    sel = got[chosen] if axis == 0 else got[:, chosen]
    ref_sel = ref[chosen] if axis == 0 else ref[:, chosen]
    assert rel_err(sel, ref_sel) < 1e-5


@pytest.mark.parametrize("op", operator_names())
def test_neuron_value_does_not_depend_on_the_rest_of_the_selection(op):
    """The invariant behind bit-identical rollback: a neuron's new value is a function of itself."""
    t = random_triple(300, 48, seed=7)
    alone = project_tensor(op, t, 0, [5], rank=4)
    crowd = project_tensor(op, t, 0, [1, 5, 9, 100, 299], rank=4)
    assert torch.equal(alone[5], crowd[5])
    cols = random_triple(48, 300, seed=8)
    assert torch.equal(
        project_tensor(op, cols, 1, [7], rank=4)[:, 7], project_tensor(op, cols, 1, [7, 8, 260], rank=4)[:, 7]
    )


def test_projector_is_idempotent():
    t = random_triple(20, 30, seed=1)
    once = project_tensor("projector", t, 0, list(range(20)), rank=3)
    twice = project_tensor("projector", TensorTriple(once, t.aligned, t.base), 0, list(range(20)), rank=3)
    assert rel_err(twice - t.aligned, once - t.aligned) < 1e-5


def test_restore_is_exact_and_bias_vectors_work():
    t = random_triple(10, 6, seed=2)
    out = project_tensor("restore", t, 1, [2, 4])
    assert torch.equal(out[:, [2, 4]], t.aligned[:, [2, 4]])
    bias = TensorTriple(t.finetuned[:, 0], t.aligned[:, 0], t.base[:, 0])
    got = project_tensor("safe_lora", bias, 0, [1, 3])
    ref = dense_reference("safe_lora", bias.finetuned[:, None], bias.aligned[:, None], bias.base[:, None], 1)
    assert got.shape == (10,)
    assert rel_err(got[[1, 3]], ref[[1, 3], 0]) < 1e-5


def test_zero_direction_and_empty_selection_are_safe():
    t = random_triple(8, 8, seed=4)
    same = TensorTriple(t.finetuned, t.aligned, t.aligned)  # V = 0
    out = project_tensor("safe_lora", same, 0, [0, 1])
    assert torch.equal(out[[0, 1]], t.aligned[[0, 1]])
    assert torch.equal(project_tensor("safe_lora", t, 0, []), t.finetuned)
    with pytest.raises(IndexError):
        project_tensor("safe_lora", t, 0, [8])


def test_unknown_operator_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown projection operator"):
        parse_operator("magic")


def test_restore_needs_no_base_tensor_and_other_operators_ask_for_it():
    t = random_triple(12, 9, seed=3)
    without_base = TensorTriple(t.finetuned, t.aligned, None)
    assert torch.equal(
        project_tensor("restore", without_base, 0, [1, 7]), project_tensor("restore", t, 0, [1, 7])
    )
    with pytest.raises(ValueError, match="needs the base tensor"):
        project_tensor("safe_lora", without_base, 0, [1])
