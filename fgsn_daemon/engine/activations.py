"""Forward passes with hooks, and streaming statistics over them.

Statistics are sums (mergeable by addition, savable as a flat tensor dict) so a long run can be
checkpointed and resumed, and runs on different prompt shards can be combined. Padding is masked
out of every statistic; the forward pass is cut short after the deepest layer that is needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from fgsn_daemon.core.errors import CheckpointError
from fgsn_daemon.engine.architectures import ArchitectureSpec

LOG = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook to end the forward pass once the needed layers have run."""


@dataclass
class NeuronStats:
    """Per-neuron activation sums for one (layer, space), over real tokens and over last tokens."""

    sum: torch.Tensor
    sumsq: torch.Tensor
    sumabs: torch.Tensor
    count: int = 0
    last_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    last_sumsq: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    last_count: int = 0

    @classmethod
    def zeros(cls, size: int) -> NeuronStats:
        z = lambda: torch.zeros(size, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z(), 0, z(), z(), 0)

    def add(self, acts: torch.Tensor, mask: torch.Tensor, last_index: torch.Tensor) -> None:
        """acts [B, T, N], mask [B, T] (1 = real token), last_index [B]."""
        a = acts.to(torch.float64)
        m = mask.to(device=a.device, dtype=a.dtype).unsqueeze(-1)  # layers may sit on other devices
        self.sum = self.sum + (a * m).sum(dim=(0, 1)).cpu()
        self.sumsq = self.sumsq + (a * a * m).sum(dim=(0, 1)).cpu()
        self.sumabs = self.sumabs + (a.abs() * m).sum(dim=(0, 1)).cpu()
        self.count += int(mask.sum())
        last = a[torch.arange(a.shape[0], device=a.device), last_index.to(a.device)]
        self.last_sum = self.last_sum + last.sum(0).cpu()
        self.last_sumsq = self.last_sumsq + (last * last).sum(0).cpu()
        self.last_count += a.shape[0]

    def merge(self, other: NeuronStats) -> None:
        for name in ("sum", "sumsq", "sumabs", "last_sum", "last_sumsq"):
            # out of place: tensors made under inference_mode refuse in-place updates outside it
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.count += other.count
        self.last_count += other.last_count

    def mean(self, positions: str) -> torch.Tensor:
        if positions == "last":
            return self.last_sum / max(self.last_count, 1)
        return self.sum / max(self.count, 1)

    def rms(self, positions: str) -> torch.Tensor:
        if positions == "last":
            return (self.last_sumsq / max(self.last_count, 1)).sqrt()
        return (self.sumsq / max(self.count, 1)).sqrt()


@dataclass
class ActivationStats:
    """Everything one prompt set contributes: neuron stats per (layer, space) and, optionally,
    the per-layer sum of unit-normalised last-token hidden states (for the layer curve)."""

    neurons: dict[tuple[int, str], NeuronStats] = field(default_factory=dict)
    unit_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    prompts_seen: int = 0

    def merge(self, other: ActivationStats) -> None:
        for key, st in other.neurons.items():
            if key in self.neurons:
                self.neurons[key].merge(st)
            else:
                self.neurons[key] = st
        for layer, s in other.unit_sums.items():
            self.unit_sums[layer] = self.unit_sums.get(layer, torch.zeros_like(s)) + s
        self.prompts_seen += other.prompts_seen

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {"prompts_seen": torch.tensor([self.prompts_seen])}
        for (layer, space), st in self.neurons.items():
            prefix = f"neurons.{layer}.{space}."
            for name in ("sum", "sumsq", "sumabs", "last_sum", "last_sumsq"):
                state[prefix + name] = getattr(st, name)
            state[prefix + "count"] = torch.tensor([st.count])
            state[prefix + "last_count"] = torch.tensor([st.last_count])
        for layer, s in self.unit_sums.items():
            state[f"unit_sums.{layer}"] = s
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ActivationStats:
        out = cls(prompts_seen=int(state["prompts_seen"][0]))
        grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "neurons":
                grouped.setdefault((int(parts[1]), parts[2]), {})[parts[3]] = value
            elif parts[0] == "unit_sums":
                out.unit_sums[int(parts[1])] = value
        for unit, d in grouped.items():
            out.neurons[unit] = NeuronStats(
                d["sum"],
                d["sumsq"],
                d["sumabs"],
                int(d["count"][0]),
                d["last_sum"],
                d["last_sumsq"],
                int(d["last_count"][0]),
            )
        return out

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ActivationStats:
        return cls.from_state_dict(load_file(str(path)))


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


@dataclass(frozen=True)
class Placement:
    """How a model too large for one device is spread (accelerate's ``device_map``): ``auto``,
    ``balanced``, ``balanced_low_0``, ``sequential`` or an explicit module → device map (a device
    may be ``cpu`` or ``disk``: offloaded weights are streamed in for each forward pass)."""

    device_map: str | dict[str, str | int]
    max_memory: dict[str | int, str] | None = None
    offload_dir: Path | None = None


def load_model(
    path: Path, device: torch.device, dtype: torch.dtype = torch.float32, placement: Placement | None = None
) -> Any:
    """Load a causal LM from a local safetensors folder: no hub access, no remote code. With a
    ``placement`` the model is spread over devices by accelerate instead of moved to ``device``."""
    from transformers import AutoModelForCausalLM

    spread: dict[str, Any] = {}
    if placement is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise CheckpointError(
                "device_map needs the accelerate package (pip install accelerate)"
            ) from None
        spread = {"device_map": placement.device_map, "max_memory": placement.max_memory}
        if placement.offload_dir is not None:
            placement.offload_dir.mkdir(parents=True, exist_ok=True)
            spread["offload_folder"] = str(placement.offload_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            **spread,
        )
    except OSError as exc:
        raise CheckpointError(f"{path}: transformers could not load the model ({exc})") from None
    except (ValueError, RuntimeError, AssertionError) as exc:  # a bad map, or a device torch lacks
        if placement is None:
            raise
        raise CheckpointError(f"{path}: device_map {placement.device_map!r} failed: {exc}") from None
    if placement is None:
        model = model.to(device)  # type: ignore[arg-type]  # transformers types .to's wrapper oddly
    return model.eval()


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: its input embedding's device (with offloaded embeddings, the CPU;
    accelerate's hooks move them to the execution device)."""
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def offloaded_parameters(model: Any) -> list[str]:
    """Parameters that are not resident (offloaded to CPU or disk by a device map)."""
    return [name for name, p in model.named_parameters() if p.device.type == "meta"]


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: no usable tokenizer ({exc})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def format_prompts(tokenizer: Any, prompts: Sequence[str], use_chat_template: bool = True) -> list[str]:
    """Render prompts the way the model sees them at inference (chat template when it has one)."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    return list(prompts)


def _module(root: Any, dotted: str) -> Any:
    m = root
    for part in dotted.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


@contextlib.contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def collect_stats(
    model: Any,
    tokenizer: Any,
    spec: ArchitectureSpec,
    prompts: Sequence[str],
    layers: Sequence[int],
    spaces: Sequence[str],
    curve: bool = False,
    batch_size: int = 16,
    max_length: int = 256,
    use_chat_template: bool = True,
    resume: ActivationStats | None = None,
    checkpoint_path: Path | None = None,
    checkpoint_every: int = 50,
) -> ActivationStats:
    """Run ``prompts`` through ``model``, accumulating neuron stats at ``layers`` × ``spaces`` and,
    if ``curve``, unit-normalised last-token hidden states at every layer."""
    device = input_device(model)
    decoder_layers = _module(model, spec.layers_module)
    n_layers = len(decoder_layers)
    stop_after = n_layers - 1 if curve else max(layers)
    stats = resume or ActivationStats()
    texts = format_prompts(tokenizer, prompts, use_chat_template)
    state: dict[str, torch.Tensor] = {}
    handles: list[Any] = []

    def neuron_hook(key: tuple[int, str]) -> Any:
        def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            acts = args[0]
            if key not in stats.neurons:
                stats.neurons[key] = NeuronStats.zeros(acts.shape[-1])
            stats.neurons[key].add(acts, state["mask"], state["last"])

        return hook

    def layer_hook(layer: int) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            if curve:
                hidden = output[0] if isinstance(output, tuple) else output
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                last = hidden[rows, state["last"].to(hidden.device)]
                unit = torch.nn.functional.normalize(last.to(torch.float64), dim=-1)
                # per-prompt unit vectors are kept so benign–benign pairs can exclude self-pairs
                stats.unit_sums[layer] = (
                    stats.unit_sums.get(layer, torch.zeros(unit.shape[-1], dtype=torch.float64))
                    + unit.sum(0).cpu()
                )
            if layer == stop_after:
                raise _StopForward

        return hook

    for layer in layers:
        for space in spaces:
            target = _module(decoder_layers[layer], spec.space(space).hook_module)
            handles.append(target.register_forward_pre_hook(neuron_hook((layer, space))))
    for layer in range(stop_after + 1):
        handles.append(decoder_layers[layer].register_forward_hook(layer_hook(layer)))

    tokenizer.padding_side = "right"  # positions then start at 0 for every prompt
    tokenizer.truncation_side = "left"  # keep the end of long prompts: the last token matters
    start = stats.prompts_seen
    batches_since_save = 0
    starts = range(start, len(texts), batch_size)
    bar = tqdm(starts, desc="forward passes", unit="batch", leave=False, disable=not sys.stderr.isatty())
    with _hooks(handles):
        for lo in bar:
            batch = texts[lo : lo + batch_size]
            enc = tokenizer(
                batch,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
                add_special_tokens=not use_chat_template,
            )
            mask = enc["attention_mask"].to(device)
            state["mask"] = mask
            state["last"] = mask.sum(1) - 1
            with contextlib.suppress(_StopForward):
                model(input_ids=enc["input_ids"].to(device), attention_mask=mask, use_cache=False)
            stats.prompts_seen = lo + len(batch)
            batches_since_save += 1
            if checkpoint_path is not None and batches_since_save >= checkpoint_every:
                stats.save(checkpoint_path)
                batches_since_save = 0
    if checkpoint_path is not None:
        stats.save(checkpoint_path)
    return stats
