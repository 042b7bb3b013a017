"""Benign output energy of reverting single entries (a lab lever, grid field ``eE``).

Reverting entry (i, j) of a linear weight moves output i by ``δ_ij · x_j`` on every token, with
``δ = W_aligned − W_ft`` and ``x`` the layer's input. Its mean squared size over benign tokens is
``δ_ij² · E_benign[x_j²]``: the diagonal (one entry at a time) second-order cost that OBS-style
pruning and Safe Delta use. The first-order scores see how a revert moves two losses; this one sees
how much it disturbs the layer on benign inputs in any direction, so an entry whose input feature is
quiet on benign prompts (harm-selective) costs little."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fgsn_daemon.engine.activations import format_prompts, input_device


def module_of(tensor_name: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` -> ``model.layers.3.mlp.down_proj``."""
    return tensor_name.rsplit(".", 1)[0]


def _module(root: Any, dotted: str) -> Any:
    m = root
    for part in dotted.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


@torch.inference_mode()
def input_second_moments(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    modules: Sequence[str],
    batch_size: int = 16,
    max_length: int = 256,
) -> dict[str, torch.Tensor]:
    """Per module: E[x_j²] over every real (non-padding) token of the chat-formatted prompts,
    float64 on the CPU."""
    if not prompts:
        raise ValueError("no prompts to measure the input energy on")
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    state: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def pre(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].to(torch.float64)
            mask = state["mask"].to(device=x.device, dtype=torch.float64)
            part = (x.square() * mask[..., None]).sum(dim=(0, 1)).cpu()
            sums[name] = sums[name] + part if name in sums else part

        return pre

    handles = [_module(model, m).register_forward_pre_hook(hook(m)) for m in modules]
    texts = format_prompts(tokenizer, prompts)
    device = input_device(model)
    tokenizer.padding_side = "right"
    try:
        for lo in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[lo : lo + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
                add_special_tokens=False,
            )
            state["mask"] = enc["attention_mask"]
            tokens += int(enc["attention_mask"].sum())
            model(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                use_cache=False,
            )
    finally:
        for h in handles:
            h.remove()
    return {m: s / tokens for m, s in sums.items()}


def energy_penalty(
    deltas: Mapping[str, torch.Tensor], moments: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per 2-D weight: ``δ_ij² · E[x_j²]`` (float32, the weight's shape)."""
    out = {}
    for name, d in deltas.items():
        m = moments[module_of(name)].to(torch.float32)
        out[name] = d.to(torch.float32).square() * m[None, :]
    return out


def matched_scale(gain: Mapping[str, torch.Tensor], penalty: Mapping[str, torch.Tensor]) -> float:
    """The factor that gives the penalty the gain's total over the entries that can be chosen
    (positive gain), so a lever weight of 1 weighs the two alike whatever their units."""
    g = sum(float(v[v > 0].double().sum()) for v in gain.values())
    p = sum(float(penalty[n][v > 0].double().sum()) for n, v in gain.items())
    if p <= 0:
        raise ValueError("the energy penalty is zero on every entry with a positive gain")
    return g / p
