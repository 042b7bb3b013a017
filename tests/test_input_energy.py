"""The benign output-energy lever (lab.input_energy) against dense float64 references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import BENIGN, make_trio

from fgsn_daemon.engine.activations import format_prompts, load_model, load_tokenizer
from fgsn_daemon.lab.input_energy import (
    energy_penalty,
    input_second_moments,
    matched_scale,
    module_of,
)


def test_the_moments_are_the_mean_squared_inputs_over_real_tokens(tmp_path: Path) -> None:
    """Batched with padding, the hook's E[x_j²] equals one prompt at a time, unpadded."""
    trio = make_trio(tmp_path, "llama")
    model = load_model(trio["finetuned"], torch.device("cpu"), dtype=torch.float64)
    tok = load_tokenizer(trio["finetuned"])
    modules = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    prompts = BENIGN[:5]
    assert len({len(tok(t)["input_ids"]) for t in format_prompts(tok, prompts)}) > 1  # padding happens
    found = input_second_moments(model, tok, prompts, modules, batch_size=4)
    seen: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    handles = []
    for m in modules:
        module = model.get_submodule(m)
        handles.append(module.register_forward_pre_hook(lambda _mod, args, m=m: seen[m].append(args[0][0])))
    with torch.no_grad():
        for text in format_prompts(tok, prompts):
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    for m in modules:
        every = torch.cat(seen[m])  # [tokens, in]
        torch.testing.assert_close(found[m], every.double().square().mean(dim=0), rtol=1e-9, atol=1e-12)


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
