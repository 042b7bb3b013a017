"""Path-integrated attribution (``path_steps``): the gradients averaged at points along the revert
equal a dense float64 integrated-gradient reference, their sum tends to the real loss change of the
whole revert, and the weights come back bit-identical."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import BENIGN, HARMFUL, make_trio
from test_attribution import RESPONSES, mean_nll, revert_deltas, scored_names

from fgsn_daemon.core.errors import ConfigError, FGSNError
from fgsn_daemon.engine.activations import load_model, load_tokenizer
from fgsn_daemon.engine.attribution import (
    delta_effects,
    encode_targets,
    moved_along,
    path_effects,
    path_points,
)


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    return make_trio(tmp_path_factory.mktemp("path-attr"), "llama")


def test_path_points_are_the_midpoints_of_equal_pieces():
    assert path_points(1) == [0.0]  # first order at the current weights
    assert path_points(4) == pytest.approx([0.125, 0.375, 0.625, 0.875])
    with pytest.raises(FGSNError, match="path steps"):
        path_points(0)


def test_moving_along_a_delta_puts_the_exact_weights_back(trio):
    model = load_model(trio["finetuned"], torch.device("cpu"))
    names = scored_names(trio)[:3]
    deltas = revert_deltas(trio, names)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    with moved_along(model, deltas, 0.3):
        for n in names:
            torch.testing.assert_close(params[n].detach(), before[n] + 0.3 * deltas[n])
    assert all(torch.equal(params[n].detach(), before[n]) for n in names)
    with pytest.raises(RuntimeError, match="inside"), moved_along(model, deltas, 0.7):
        raise RuntimeError("inside")
    assert all(torch.equal(params[n].detach(), before[n]) for n in names)  # also after an error
    with (
        pytest.raises(FGSNError, match="no parameter"),
        moved_along(model, {"nope.weight": deltas[names[0]]}, 0.5),
    ):
        pass


def dense_integrated_gradient(trio, names, deltas, points) -> dict[str, torch.Tensor]:
    """Reference: float64 autograd on the weights at each point ``W + t·D``, times ``D``, averaged."""
    tok = load_tokenizer(trio["finetuned"])
    out = {n: torch.zeros(deltas[n].shape, dtype=torch.float64) for n in names}
    for t in points:
        model = load_model(trio["finetuned"], torch.device("cpu"), dtype=torch.float64)
        params = dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            for n in names:
                params[n].add_(t * deltas[n].double())
        for n in names:
            params[n].requires_grad_(True)
        loss = torch.zeros((), dtype=torch.float64)
        encoded = encode_targets(tok, HARMFUL, RESPONSES, 64)
        for ids, n_prompt in encoded:
            x = torch.tensor([ids])
            nll = torch.nn.functional.cross_entropy(
                model(input_ids=x).logits[0, :-1], x[0, 1:], reduction="none"
            )
            loss = loss + nll[n_prompt - 1 :].sum()
        (loss / len(encoded)).backward()
        for n in names:
            out[n] += params[n].grad * deltas[n].double() / len(points)
    return out


def test_path_effects_equal_a_dense_float64_integrated_gradient(trio):
    model = load_model(trio["finetuned"], torch.device("cpu"), dtype=torch.float64)
    tok = load_tokenizer(trio["finetuned"])
    names = [n for n in scored_names(trio) if n.endswith(".weight")]
    deltas = revert_deltas(trio, names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def at(where: str):
        return delta_effects(
            model, tok, HARMFUL, RESPONSES, deltas, entries=True, batch_size=3, max_length=64
        )

    eff = path_effects(model, deltas, 3, at)
    ref = dense_integrated_gradient(trio, names, deltas, path_points(3))
    for n in names:
        scale = float(ref[n].abs().max()) + 1e-12
        torch.testing.assert_close(eff.entries[n].double(), ref[n], atol=1e-5 * scale, rtol=1e-4)
        torch.testing.assert_close(eff.rows[n], ref[n].sum(-1), atol=1e-4 * scale, rtol=1e-4)
    # the walk along the path left the model as it was
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert eff.sequences == len(HARMFUL)


def test_path_effects_add_up_to_the_real_loss_change_of_the_whole_revert(trio):
    """Completeness: Σ effects → L(W + D) − L(W) as the steps grow; the first-order sum is off by
    the curvature along the revert (made large here: the revert is scaled up 6×)."""
    model = load_model(trio["finetuned"], torch.device("cpu"), dtype=torch.float64)
    tok = load_tokenizer(trio["finetuned"])
    names = scored_names(trio)
    deltas = {n: 6 * d for n, d in revert_deltas(trio, names).items()}

    def at(where: str):
        return delta_effects(model, tok, HARMFUL, RESPONSES, deltas, batch_size=5, max_length=64)

    before = mean_nll(model, tok, HARMFUL, RESPONSES)
    with moved_along(model, deltas, 1.0):
        after = mean_nll(model, tok, HARMFUL, RESPONSES)
    real = after - before
    first_order = path_effects(model, deltas, 1, at).total()
    integrated = path_effects(model, deltas, 16, at).total()
    assert abs(first_order - real) > 0.05 * abs(real), (first_order, real)  # the setting is non-linear
    assert abs(integrated - real) < 0.02 * abs(real), (integrated, real)
    assert abs(integrated - real) < abs(first_order - real) / 5


def test_path_steps_reach_the_engine_and_are_bounded(trio, tmp_path):
    """``fgsn apply``'s parameters carry path_steps into the record; the selection changes with
    them and stays deterministic; out-of-bounds values are a clear error."""
    from fgsn_daemon.engine.pipeline import FGSNParams, Localiser, ModelTrio

    params = FGSNParams(
        scoring="attribution", operator="restore", unit="entry", budget=1.0, target_tokens=4, batch_size=4
    )
    params = replace(params, contrast=0.0, hard_rounds=0)
    opened = ModelTrio.open(trio["base"], trio["aligned"], trio["finetuned"])
    try:
        one = Localiser(opened, params, torch.device("cpu"), BENIGN).localise_entries(HARMFUL)
        three = [
            Localiser(opened, replace(params, path_steps=3), torch.device("cpu"), BENIGN).localise_entries(
                HARMFUL
            )
            for _ in range(2)
        ]
    finally:
        opened.close()
    assert all(torch.equal(three[0][n], three[1][n]) for n in three[0])  # a function of its inputs
    assert sum(int(m.sum()) for m in three[0].values()) == sum(int(m.sum()) for m in one.values())
    assert any(not torch.equal(one[n], three[0][n]) for n in one)
    assert replace(params, path_steps=3).record().path_steps == 3
    for bad in (0, 33):
        with pytest.raises(ConfigError, match="path_steps must be in its bounds"):
            replace(params, path_steps=bad).validate()
