"""Minimal LoRA for the lab's fine-tuning stage: wrap, train, merge, save as a PEFT adapter.

The FGSN paper repairs LoRA fine-tunes (``ΔW = scale·B·A``), so the SmolLM2 lab can fine-tune that
way. This is deliberately small (no ``peft`` dependency): plain ``nn.Linear`` targets, float32,
``scale = alpha / r``. The adapter is written in PEFT's file layout, which is exactly what
:class:`fgsn_daemon.engine.io.checkpoint.LoraFinetuned` reads, so the engine can take either the merged
model or the adapter folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fgsn_daemon.core.errors import FGSNError


class LoraLinear(nn.Module):
    """``base(x) + scale · (x Aᵀ) Bᵀ`` with the base frozen; B starts at zero (identity at step 0)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features)
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming-uniform(a=√5) bound, as nn.Linear uses
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_A.t()) @ self.lora_B.t())

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B.double() @ self.lora_A.double())


def attach_lora(
    model: nn.Module, targets: Sequence[str], rank: int, alpha: float, seed: int
) -> dict[str, LoraLinear]:
    """Freeze ``model`` and replace every ``nn.Linear`` whose attribute name is in ``targets``
    (e.g. ``q_proj``) with a :class:`LoraLinear`; returns them by module path."""
    if rank < 1:
        raise FGSNError(f"LoRA rank must be >= 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wrapped: dict[str, LoraLinear] = {}
    for path, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            if attr in targets and isinstance(child, nn.Linear):
                lora = LoraLinear(child, rank, alpha, gen)
                setattr(module, attr, lora)
                wrapped[f"{path}.{attr}" if path else attr] = lora
    if not wrapped:
        raise FGSNError(f"no nn.Linear named {list(targets)} in the model")
    return wrapped


def merge_lora(model: nn.Module, wrapped: dict[str, LoraLinear]) -> None:
    """Fold ``scale·B·A`` into each base weight (float64 sum) and put the plain layers back."""
    for path, lora in wrapped.items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        w = lora.base.weight
        with torch.no_grad():
            w.copy_((w.double() + lora.delta()).to(w.dtype))
        setattr(parent, attr, lora.base)


def save_peft_adapter(
    wrapped: dict[str, LoraLinear], rank: int, alpha: float, targets: Sequence[str], folder: Path
) -> None:
    """PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors`` with
    ``base_model.model.<module>.lora_A.weight`` (r × in) and ``.lora_B.weight`` (out × r)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for path, lora in wrapped.items():
        key = f"base_model.model.{path}"
        tensors[f"{key}.lora_A.weight"] = lora.lora_A.detach().contiguous().clone()
        tensors[f"{key}.lora_B.weight"] = lora.lora_B.detach().contiguous().clone()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(set(targets)),
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
