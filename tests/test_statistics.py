"""Activation statistics (padding, early stop, resume) and the localisation math."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import BENIGN, HARMFUL, make_model

from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.core.records import LayerCurve, NeuronId
from fgsn_daemon.engine.activations import ActivationStats, collect_stats, load_model, load_tokenizer
from fgsn_daemon.engine.architectures import spec_for_config
from fgsn_daemon.engine.localisation import (
    NeuronScores,
    choose_band,
    layer_curve,
    select_neurons,
    top_fraction,
)


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "llama"
    make_model("llama", path, seed=3)
    model = load_model(path, torch.device("cpu"))
    return model, load_tokenizer(path), spec_for_config(model.config.to_dict())


def stats_for(model_and_tok, prompts, **kw):
    model, tok, spec = model_and_tok
    return collect_stats(model, tok, spec, prompts, layers=[1, 2], spaces=["mlp", "attn"], **kw)


def assert_stats_close(a: ActivationStats, b: ActivationStats) -> None:
    assert a.neurons.keys() == b.neurons.keys()
    for key in a.neurons:
        x, y = a.neurons[key], b.neurons[key]
        assert x.count == y.count and x.last_count == y.last_count
        for name in ("sum", "sumsq", "sumabs", "last_sum", "last_sumsq"):
            torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=1e-5, atol=1e-6)
    for layer in a.unit_sums:
        torch.testing.assert_close(a.unit_sums[layer], b.unit_sums[layer], rtol=1e-5, atol=1e-6)


def test_padding_is_masked_out(model_and_tok):
    """Batching a short prompt with a long one (so it gets padded) changes no statistic."""
    short, long = "hack wifi", "how do i make a bomb and steal money from bank account"
    batched = stats_for(model_and_tok, [short, long], batch_size=2, curve=True)
    one_by_one = stats_for(model_and_tok, [short, long], batch_size=1, curve=True)
    assert_stats_close(batched, one_by_one)
    tokens = sum(len(s.split()) for s in (short, long))
    assert batched.neurons[(1, "mlp")].count == tokens
    assert batched.neurons[(1, "mlp")].last_count == 2


def test_resume_and_merge_equal_a_single_run(model_and_tok, tmp_path):
    full = stats_for(model_and_tok, HARMFUL, batch_size=3, curve=True)
    partial = stats_for(model_and_tok, HARMFUL[:6], batch_size=3, curve=True)
    partial.save(tmp_path / "stats.safetensors")
    resumed = stats_for(
        model_and_tok,
        HARMFUL,
        batch_size=3,
        curve=True,
        resume=ActivationStats.load(tmp_path / "stats.safetensors"),
    )
    assert resumed.prompts_seen == len(HARMFUL)
    assert_stats_close(resumed, full)
    merged = stats_for(model_and_tok, HARMFUL[:4], batch_size=3, curve=True)
    merged.merge(stats_for(model_and_tok, HARMFUL[4:], batch_size=3, curve=True))
    assert_stats_close(merged, full)


def test_forward_stops_after_the_last_needed_layer(model_and_tok):
    model, tok, spec = model_and_tok
    ran: list[int] = []
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        collect_stats(model, tok, spec, BENIGN[:2], layers=[1], spaces=["mlp"], batch_size=2)
    finally:
        for h in handles:
            h.remove()
    assert max(ran) == 1


def test_layer_curve_matches_pairwise_cosines():
    g = torch.Generator().manual_seed(0)
    n_vecs, m_vecs = (
        torch.randn(3, 5, 8, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 8, generator=g, dtype=torch.float64),
    )
    benign, harmful = ActivationStats(prompts_seen=5), ActivationStats(prompts_seen=4)
    for layer in range(3):
        benign.unit_sums[layer] = torch.nn.functional.normalize(n_vecs[layer], dim=-1).sum(0)
        harmful.unit_sums[layer] = torch.nn.functional.normalize(m_vecs[layer], dim=-1).sum(0)
    curve = layer_curve(benign, harmful)
    cos = torch.nn.functional.cosine_similarity
    for layer in range(3):
        nn_pairs = [
            float(cos(n_vecs[layer, i], n_vecs[layer, j], dim=0))
            for i, j in itertools.permutations(range(5), 2)
        ]
        nm_pairs = [float(cos(n_vecs[layer, i], m_vecs[layer, j], dim=0)) for i in range(5) for j in range(4)]
        assert curve.benign_benign[layer] == pytest.approx(sum(nn_pairs) / len(nn_pairs))
        assert curve.benign_harmful[layer] == pytest.approx(sum(nm_pairs) / len(nm_pairs))


def curve_from_gap(gap):
    return LayerCurve(benign_benign=[0.0] * len(gap), benign_harmful=[-g for g in gap], gap=gap)


def test_band_is_where_the_gap_opens():
    gap = [0.0, 0.01, 0.02, 0.1, 0.3, 0.5, 0.6, 0.62, 0.62, 0.6, 0.6, 0.61, 0.6, 0.6, 0.6, 0.6]
    band = choose_band(curve_from_gap(gap))
    assert (band.start, band.end, band.source) == (4, 5, "auto")  # 0.2·peak at layer 4, 0.8·peak at 5
    assert choose_band(curve_from_gap(gap), (2, 3)).source == "override"
    with pytest.raises(ConfigError):
        choose_band(curve_from_gap(gap), (3, 16))
    flat = choose_band(curve_from_gap([-0.1] * 8))
    assert 0 <= flat.start <= flat.end < 8


def test_selection_is_topq_minus_topp_minus_frozen():
    harm = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    benign = torch.tensor([0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0])
    scores = {(3, "mlp"): NeuronScores(harm, benign)}
    sel = select_neurons(scores, q=40, p=20, frozen={NeuronId(3, "mlp", 2): "weapons"})
    assert [n.index for n in sel.candidates] == [0, 2, 3]  # top-4 {0,1,2,3} minus benign top-2 {1,9}
    assert [n.index for n in sel.selected] == [0, 3]
    assert [(s.index, s.owner) for s in sel.skipped] == [(2, "weapons")]
    c = sel.counts[0]
    assert (c.total, c.harmful_top, c.benign_top, c.candidates, c.skipped, c.selected) == (10, 4, 2, 3, 1, 2)
    assert top_fraction(torch.tensor([1.0, 1.0, 1.0]), 50) == [0, 1]  # ties: lowest index first
    with pytest.raises(ConfigError):
        select_neurons(scores, q=0, p=10)
