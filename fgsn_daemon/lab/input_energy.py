"""Benign output energy of reverting single entries (a lab lever, grid field ``eE``).

Reverting entry (i, j) of a linear weight moves output i by ``δ_ij · x_j`` on every token, with
``δ = W_aligned − W_ft`` and ``x`` the layer's input. Its mean squared size over benign tokens is
``δ_ij² · E_benign[x_j²]``: the diagonal-Hessian (OBD-style, one entry at a time) cost of the layer's
output change, Wanda's |W|·‖x‖ squared, on the delta. The first-order scores see how a revert
moves two losses; this one sees how much it disturbs the layer on benign inputs in any direction.

The moments are taken over the prompts' own tokens: the chat template's text shared by every prompt
(system prompt, role markers) is left out, as its activations are the same for harmful and benign
prompts alike (the model is causal)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fgsn_daemon.engine.activations import format_prompts, input_device


def module_of(tensor_name: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` -> ``model.layers.3.mlp.down_proj``."""
    return tensor_name.rsplit(".", 1)[0]


def content_span(token_ids: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The lengths of the prefix and suffix every tokenised prompt shares (the template's text),
    so that position ``prefix ≤ t < len − suffix`` is a prompt's own token. Needs two prompts or
    more (one prompt shares everything with itself)."""
    if len(token_ids) < 2:
        raise ValueError("the shared template is found from two prompts or more")
    shortest = min(len(ids) for ids in token_ids)
    prefix = 0
    while prefix < shortest and len({ids[prefix] for ids in token_ids}) == 1:
        prefix += 1
    suffix = 0
    while suffix < shortest - prefix and len({ids[len(ids) - 1 - suffix] for ids in token_ids}) == 1:
        suffix += 1
    return prefix, suffix


@torch.inference_mode()
def input_second_moments(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    modules: Sequence[str],
    batch_size: int = 16,
    max_length: int = 256,
) -> dict[str, torch.Tensor]:
    """Per module: E[x_j²] over the prompts' own tokens (``content_span``: not the template's text
    shared by all, not padding) of the chat-formatted prompts, float64 on the CPU."""
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

    texts = format_prompts(tokenizer, prompts)
    ids = [
        tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        for t in texts
    ]
    prefix, suffix = content_span(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = input_device(model)
    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    try:
        for lo in range(0, len(ids), batch_size):
            batch = ids[lo : lo + batch_size]
            width = max(len(seq) for seq in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            content = torch.zeros((len(batch), width), dtype=torch.long)
            for i, seq in enumerate(batch):
                input_ids[i, : len(seq)] = torch.tensor(seq)
                attention[i, : len(seq)] = 1
                content[i, prefix : len(seq) - suffix] = 1
            if not int(content.sum()):
                continue
            state["mask"] = content
            tokens += int(content.sum())
            model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not tokens:
        raise ValueError("the prompts have no tokens of their own beyond the shared template")
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
    """The factor that gives the penalty the gain's total over the entries with a positive gain
    (the selectable ones when no top-p % is excluded by cost), so a lever weight of 1 weighs the
    two alike whatever their units."""
    g = sum(float(v[v > 0].double().sum()) for v in gain.values())
    p = sum(float(penalty[n][v > 0].double().sum()) for n, v in gain.items())
    if p <= 0:
        raise ValueError("the energy penalty is zero on every entry with a positive gain")
    return g / p


def folded_penalty(
    gain: Mapping[str, torch.Tensor],
    energy: Mapping[str, torch.Tensor],
    weight: float,
    contrast_penalty: Mapping[str, torch.Tensor] | None,
    contrast: float,
) -> tuple[dict[str, torch.Tensor], float]:
    """One penalty for ``select_entries`` (with contrast 1) that scores ``gain − contrast ×
    contrast_penalty − weight × scale × energy``; also returns the scale (``matched_scale``)."""
    scale = matched_scale(gain, energy)
    folded = {}
    for n in gain:
        folded[n] = weight * scale * energy[n]
        if contrast_penalty is not None and contrast:
            folded[n] = folded[n] + contrast * contrast_penalty[n]
    return folded, scale
