"""The benign output-energy lever (lab.input_energy) against dense float64 references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import BENIGN, make_trio

from fgsn_daemon.engine.activations import format_prompts, load_model, load_tokenizer
from fgsn_daemon.engine.delta_selection import select_entries
from fgsn_daemon.lab.input_energy import (
    content_span,
    energy_penalty,
    folded_penalty,
    input_second_moments,
    matched_scale,
    module_of,
)


def test_the_shared_template_is_the_common_prefix_and_suffix() -> None:
    assert content_span([[1, 2, 5, 9], [1, 2, 6, 7, 9]]) == (2, 1)
    assert content_span([[1, 2, 3], [1, 2, 3, 4]]) == (3, 0)  # one prompt is all template
    assert content_span([[4, 2], [5, 2], [6, 3]]) == (0, 0)
    with pytest.raises(ValueError, match="two prompts or more"):
        content_span([[1, 2]])


def test_the_moments_are_the_mean_squared_inputs_over_the_prompts_own_tokens(tmp_path: Path) -> None:
    """Batched with padding, the hook's E[x_j²] equals one prompt at a time, unpadded, over the
    positions between the shared prefix and suffix ("please … now")."""
    trio = make_trio(tmp_path, "llama")
    model = load_model(trio["finetuned"], torch.device("cpu"), dtype=torch.float64)
    tok = load_tokenizer(trio["finetuned"])
    modules = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    prompts = [f"please {p} now" for p in BENIGN[:5]]
    texts = format_prompts(tok, prompts)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(i) for i in ids}) > 1  # padding happens
    prefix, suffix = content_span(ids)
    assert prefix >= 1 and suffix >= 1  # "please" and "now" at least
    found = input_second_moments(model, tok, prompts, modules, batch_size=4)
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    handles = []
    for m in modules:
        module = model.get_submodule(m)
        handles.append(
            module.register_forward_pre_hook(
                lambda _mod, args, m=m: seen[m].append(args[0][0, prefix : args[0].shape[1] - suffix])
            )
        )
    with torch.no_grad():
        for seq in ids:
            model(input_ids=torch.tensor([seq]), use_cache=False)
    for h in handles:
        h.remove()
    for m in modules:
        every = torch.cat(seen[m])  # [content tokens, in]
        assert every.shape[0] == sum(len(i) - prefix - suffix for i in ids)
        torch.testing.assert_close(found[m], every.double().square().mean(dim=0), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="no tokens of their own"):
        input_second_moments(model, tok, ["same words", "same words"], modules)


def test_the_folded_penalty_selects_by_gain_minus_contrast_minus_energy() -> None:
    """``select_entries`` with the folded penalty and contrast 1 picks the top entries of
    gain − c·pen − s·E among positive gains (a dense reference), with or without a contrast."""
    gen = torch.Generator().manual_seed(1)
    names = ["a.weight", "b.weight"]
    gain = {n: torch.randn(4, 5, generator=gen) for n in names}
    pen = {n: torch.randn(4, 5, generator=gen).abs() for n in names}
    energy = {n: torch.rand(4, 5, generator=gen) for n in names}
    cost = {n: torch.zeros(4, 5) for n in names}
    for contrast_penalty, contrast in ((pen, 0.7), (None, 0.0)):
        folded, scale = folded_penalty(gain, energy, 0.5, contrast_penalty, contrast)
        assert scale == pytest.approx(matched_scale(gain, energy))
        masks = select_entries(gain, cost, 6, 0.0, folded, 1.0)
        score = torch.cat(
            [
                (gain[n] - contrast * (pen[n] if contrast_penalty else 0) - 0.5 * scale * energy[n]).flatten()
                for n in names
            ]
        ).double()
        eligible = torch.cat([(gain[n] > 0).flatten() for n in names]) & (score > 0)
        ranked = torch.where(eligible, score, torch.full_like(score, -torch.inf))
        want = torch.zeros_like(score, dtype=torch.bool)
        want[ranked.topk(min(6, int(eligible.sum()))).indices] = True
        got = torch.cat([masks[n].flatten() for n in names])
        assert torch.equal(got, want)


def test_the_penalty_is_the_squared_delta_times_the_input_moment_and_the_scale_matches_totals() -> None:
    gen = torch.Generator().manual_seed(0)
    name = "model.layers.0.mlp.up_proj.weight"
    delta = torch.randn(3, 4, generator=gen)
    moments = {module_of(name): torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)}
    penalty = energy_penalty({name: delta}, moments)[name]
    want = torch.tensor(
        [[float(delta[i, j]) ** 2 * [1.0, 0.0, 2.0, 0.5][j] for j in range(4)] for i in range(3)]
    )
    torch.testing.assert_close(penalty, want)
    gain = {name: torch.randn(3, 4, generator=gen)}
    scale = matched_scale(gain, {name: penalty})
    chosen = gain[name] > 0
    assert abs(scale * float(penalty[chosen].sum()) - float(gain[name][chosen].sum())) < 1e-4
    with pytest.raises(ValueError, match="zero on every entry"):
        matched_scale(gain, {name: torch.zeros(3, 4)})
