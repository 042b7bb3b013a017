"""Delta-aware attribution: what reverting a fine-tune delta does to a loss, to first order.

For a weight ``W`` at its fine-tuned value and the revert ``D = W_aligned − W_finetuned``, a loss
``L`` changes by ``ΔL ≈ Σ ∂L/∂W ⊙ D`` when ``D`` is applied. Summed over a unit's entries this is the
unit's *effect*; per entry it is the entry's effect. Two losses matter: the NLL of the aligned
model's own responses to harmful prompts (a refusal loss: reverting should lower it) and the NLL
of the fine-tuned model's own answers to benign/task prompts (reverting should not raise it).

No weight is updated and no gradient copy of the model is kept: for a linear layer ``y = x Wᵀ``,
``∂L/∂W = Σ_t g_t x_tᵀ`` with ``g = ∂L/∂y``, so a row's effect is ``Σ_t g_t[o] · (x_t · D[o])`` and a
column's is ``Σ_t x_t[i] · (g_t · D[:, i])``: hooks see ``x`` and ``g`` and only per-row and
per-column sums are accumulated. Entry effects (``--unit entry``) need ``∂L/∂W`` itself, accumulated
only for the tensors being scored.

Far from the aligned weights the first-order effect can be far off (the refusal loss is not linear
along a large revert). ``path_effects`` averages the same quantity at points ``W + t·D`` along the
revert (integrated gradients, midpoint rule), whose sum over all entries tends to the real loss
change of the whole revert.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from fgsn_daemon.core.errors import FGSNError
from fgsn_daemon.engine.activations import format_prompts


@dataclass
class DeltaEffects:
    """First-order loss change of applying each tensor's delta, summed by row, column or kept per
    entry. Keys are state-dict tensor names. ``sequences`` is the number of target sequences the
    (sum) loss was averaged over."""

    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [out] (1-D tensors: [n])
    cols: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [in] (2-D tensors only)
    entries: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> same shape as the tensor
    loss: float = 0.0
    sequences: int = 0

    def total(self) -> float:
        """The whole delta's first-order effect (every scored tensor reverted)."""
        return float(sum(float(r.sum()) for r in self.rows.values()))

    def along(self, name: str, axis: int) -> torch.Tensor:
        """Per-index effects of ``name`` along ``axis`` (0 = rows/outputs, 1 = columns/inputs)."""
        table = self.rows if axis == 0 else self.cols
        if name not in table:
            raise FGSNError(f"no attribution computed for {name} along axis {axis}")
        return table[name]


def encode_targets(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
    use_chat_template: bool = True,
) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per pair: the prompt as the model sees it at inference,
    then the response and an end-of-sequence token. Responses are cut to fit ``max_length``."""
    if len(prompts) != len(responses):
        raise FGSNError(f"{len(prompts)} prompts but {len(responses)} responses")
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    texts = format_prompts(tokenizer, prompts, use_chat_template)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for text, response in zip(texts, responses, strict=True):
        p = tokenizer(text, add_special_tokens=not templated)["input_ids"][-(max_length // 2) :]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
        out.append((p + r[: max(1, max_length - len(p))], len(p)))
    return out


def _module(root: Any, dotted: str) -> Any:
    m = root
    for part in dotted.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def _split_name(name: str) -> tuple[str, str]:
    module, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        raise FGSNError(f"{name}: attribution needs a linear layer's weight or bias")
    return module, kind


@contextlib.contextmanager
def _attached(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def delta_effects(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    deltas: Mapping[str, torch.Tensor],
    entries: bool = False,
    batch_size: int = 8,
    max_length: int = 256,
    use_chat_template: bool = True,
    desc: str = "attribution",
    progress: Callable[[str], None] | None = None,
) -> DeltaEffects:
    """Effects of applying ``deltas`` (name -> D, the tensor's shape) on the mean-per-sequence NLL
    of ``responses`` given ``prompts``, at ``model``'s current weights, by hooks on the linear
    layers that own the tensors (see the module docstring). ``entries`` also keeps ∂L/∂W ⊙ D."""
    from fgsn_daemon.engine.activations import input_device

    device = input_device(model)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, d in deltas.items():
        module, kind = _split_name(name)
        by_module.setdefault(module, {})[kind] = d.to(dtype=torch.float32)
    # each module's deltas and gradient accumulators live where the module computes (a device map
    # may spread the layers over several devices); moved there once, on first use
    resident: dict[str, dict[str, torch.Tensor]] = {}
    out = DeltaEffects()
    grads: dict[str, torch.Tensor] = {}
    keep_entries: set[str] = set()
    for name, d in deltas.items():
        out.rows[name] = torch.zeros(d.shape[0], dtype=torch.float64)
        if d.dim() == 2:
            out.cols[name] = torch.zeros(d.shape[1], dtype=torch.float64)
            if entries:
                keep_entries.add(name)

    def accumulate(module_name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        x32, g32 = x.to(torch.float32), g.to(torch.float32)
        parts = resident.get(module_name)
        if parts is None or next(iter(parts.values())).device != g32.device:
            parts = {k: t.to(g32.device) for k, t in by_module[module_name].items()}
            resident[module_name] = parts
        w = parts.get("weight")
        if w is not None:
            name = f"{module_name}.weight"
            if name in keep_entries:  # rows and columns follow from the entries at the end: one matmul here
                if name not in grads:
                    grads[name] = torch.zeros(w.shape, dtype=torch.float32, device=g32.device)
                grads[name] += torch.einsum("bto,bti->oi", g32, x32)
            else:
                out.rows[name] += (g32 * (x32 @ w.T)).sum(dim=(0, 1)).double().cpu()
                out.cols[name] += (x32 * (g32 @ w)).sum(dim=(0, 1)).double().cpu()
        b = parts.get("bias")
        if b is not None:
            out.rows[f"{module_name}.bias"] += (g32.sum(dim=(0, 1)) * b).double().cpu()

    def forward_hook(module_name: str) -> Any:
        def hook(_module: Any, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: accumulate(module_name, x, g))

        return hook

    handles = [_module(model, module).register_forward_hook(forward_hook(module)) for module in by_module]
    encoded = encode_targets(tokenizer, prompts, responses, max_length, use_chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    embed = model.get_input_embeddings()
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # gradients flow through activations only: no weight .grad
    starts = range(0, len(encoded), batch_size)
    bar = tqdm(starts, desc=desc, unit="batch", leave=False, disable=not sys.stderr.isatty())
    n_seq = len(encoded)
    try:
        with _attached(handles), torch.enable_grad():
            every = max(1, len(starts) // 10)
            for k, lo in enumerate(bar, 1):
                if progress is not None and (k % every == 0 or k == len(starts)):
                    progress(f"{desc}: batch {k}/{len(starts)}")
                batch = encoded[lo : lo + batch_size]
                width = max(len(ids) for ids, _ in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, (seq, n_prompt) in enumerate(batch):
                    ids[i, : len(seq)] = torch.tensor(seq)
                    labels[i, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
                    mask[i, : len(seq)] = 1
                ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
                inputs = embed(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=inputs, attention_mask=mask, use_cache=False).logits
                shift_logits = logits[:, :-1].float()
                shift_labels = labels[:, 1:].to(shift_logits.device)
                nll = torch.nn.functional.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.shape[-1]),
                    shift_labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                loss = nll / n_seq  # the mean over all sequences, split into additive batch terms
                out.loss += float(loss.detach())
                loss.backward()
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    out.sequences = n_seq
    resident.clear()
    for name in sorted(keep_entries):
        # the accumulator becomes the effect in place: no third weight-sized tensor per scored
        # entry next to the accumulators and the deltas
        d = by_module[_split_name(name)[0]].pop("weight")
        g = grads.pop(name, None)
        if g is None:  # no token reached the module
            g = torch.zeros(d.shape, dtype=torch.float32)
        effect = g.mul_(d.to(g.device)).cpu()
        del d
        out.entries[name] = effect
        out.rows[name] = effect.double().sum(dim=1)
        out.cols[name] = effect.double().sum(dim=0)
    return out


def mean_effects(parts: Iterable[DeltaEffects]) -> DeltaEffects:
    """The effects on the mean of several losses (e.g. one per dimension, each a mean over its own
    prompts, so every dimension weighs the same), or the mean of one loss's effects measured at
    several points. Summed as they come, so one part's effects are held at a time."""
    out, n = DeltaEffects(), 0
    for part in parts:
        n += 1
        out.loss += part.loss
        out.sequences += part.sequences
        for kind in ("rows", "cols", "entries"):
            table = getattr(out, kind)
            for name, t in getattr(part, kind).items():
                table[name] = t.clone() if name not in table else table[name].add_(t)
    if n == 0:
        raise FGSNError("no effects to average")
    out.loss /= n
    for kind in ("rows", "cols", "entries"):
        for t in getattr(out, kind).values():
            t.div_(n)
    return out


def path_points(steps: int) -> list[float]:
    """Where on the straight path from the current weights (0) to the reverted ones (1) the
    gradients are taken: the midpoints of ``steps`` equal pieces; one step is the first-order
    effect at the current weights (t = 0), as before."""
    if steps < 1:
        raise FGSNError(f"path steps must be >= 1 (got {steps})")
    return [0.0] if steps == 1 else [(k + 0.5) / steps for k in range(steps)]


@contextlib.contextmanager
def moved_along(model: Any, deltas: Mapping[str, torch.Tensor], t: float) -> Iterator[None]:
    """Move each named parameter ``t`` of the way along its delta, in place; the exact original
    values are put back on exit (kept as copies, not recomputed)."""
    if t == 0.0:
        yield
        return
    params = dict(model.named_parameters())
    missing = sorted(n for n in deltas if n not in params)
    if missing:
        raise FGSNError(f"the model has no parameter {missing[0]} to move along its delta")
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, d in deltas.items():
                p = params[name]
                saved[name] = p.detach().clone()
                p.add_(d.to(device=p.device, dtype=torch.float32).mul(t).to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                params[name].copy_(original)


def path_effects(
    model: Any,
    deltas: Mapping[str, torch.Tensor],
    steps: int,
    effects_at: Callable[[str], DeltaEffects],
) -> DeltaEffects:
    """Path-integrated effects (integrated gradients along the revert): the mean over
    ``path_points(steps)`` of ``∂L/∂W ⊙ D`` taken at ``W + t·D``. Their sum over every entry tends to
    the real loss change ``L(W + D) − L(W)`` as the steps grow, where the one-point (first-order)
    effect can be far off when the revert is large. ``effects_at(label)`` computes the effects at
    the model's current weights. ``loss`` is the mean loss over the points; ``sequences`` that of
    one point."""
    points = path_points(steps)
    if len(points) == 1:
        return effects_at("")

    def each() -> Iterator[DeltaEffects]:
        for k, t in enumerate(points, 1):
            with moved_along(model, deltas, t):
                yield effects_at(f", path point {k}/{len(points)} (t = {t:.3g})")

    out = mean_effects(each())
    out.sequences //= len(points)
    return out
