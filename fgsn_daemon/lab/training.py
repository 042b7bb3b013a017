"""The lab organisms' one training loop: mixed batches from named pools, AdamW with a warm-up and a
decay to 10 % of the rate, gradient clipping. The tiny organism and the SmolLM2 trio differ only in
their pools, their mix and the decay's shape."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

# (input ids, labels with -100 on the positions that are not learnt)
Encoded = tuple[list[int], list[int]]


def mix_counts(mix: Sequence[tuple[str, float]], batch: int) -> list[tuple[str, int]]:
    """Split a batch into per-pool counts that sum exactly to ``batch`` (largest remainder)."""
    total = sum(w for _, w in mix)
    raw = [(name, batch * w / total) for name, w in mix]
    names = [name for name, _ in raw]
    counts = [int(x) for _, x in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i][1] - int(raw[i][1]), reverse=True)
    for i in order[: batch - sum(counts)]:
        counts[i] += 1
    return [(str(n), c) for n, c in zip(names, counts, strict=True) if c > 0]


def batches(
    encoded: Mapping[str, list[Encoded]],
    mix: Sequence[tuple[str, int]],
    steps: int,
    pad_id: int,
    rng: random.Random,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded (ids, attention mask, labels) batches drawn from the pools by fixed counts."""
    for _ in range(steps):
        rows = [ex for name, n in mix for ex in rng.choices(encoded[name], k=n)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
            labels[i, : len(y)] = torch.tensor(y)
        yield ids, mask, labels


Decay = Literal["linear", "cosine"]


def lr_factor(step: int, steps: int, warmup: int, decay: Decay) -> float:
    """Linear warm-up over ``warmup`` steps, then a linear or cosine decay from 1 to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    if decay == "linear":
        return 1.0 - 0.9 * progress
    return 0.5 * (1 + math.cos(math.pi * progress)) * 0.9 + 0.1


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    batch: int
    warmup: int
    decay: Decay


def train_loop(
    model: Any,
    encoded: Mapping[str, list[Encoded]],
    mix: Sequence[tuple[str, float]],
    schedule: Schedule,
    seed: int,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW (no weight decay) on the parameters that require gradients (all of them, or LoRA's),
    clipped to norm 1; returns the per-step losses. ``on_step(step, loss)`` after each step."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=schedule.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, schedule.steps, schedule.warmup, schedule.decay)
    )
    model.train()
    losses: list[float] = []
    stream = batches(encoded, mix_counts(mix, schedule.batch), schedule.steps, pad_id, rng)
    for step, (ids, mask, labels) in enumerate(stream):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
