"""Realistic model shapes without downloads: sharded bfloat16 trios with the exact configs of
well-known models, random-initialised deterministically and streamed to disk one tensor at a time
(the largest tensor is the only one in memory, so even the 8B shape is written within 24 GB).

The aligned and fine-tuned members are small structured perturbations of the base confined to a
block of layers (the region a safety band would cover); every other shard is a hard link to the
base's, so an 8B trio costs one model plus two blocks of layers on disk. ``--lora`` adds a LoRA
adapter variant of the fine-tune (rank 16 on q/v/gate/up/down of the perturbed layers).

    python benchmarks/shapes.py --shape llama-3.2-1b --out /tmp/shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fgsn_daemon.engine.io.checkpoint import INDEX_NAME, shard_filename  # noqa: E402
from fgsn_daemon.engine.io.safetensors_io import PlannedTensor, TensorInfo, write_shard  # noqa: E402


@dataclass(frozen=True)
class Shape:
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    rope_theta: float = 500_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# The public configs' dimensions (config.json of each model on the hub).
SHAPES = {
    "llama-3.2-1b": Shape("llama", 2048, 8192, 16, 32, 8, 128_256, tied=True),
    "qwen2.5-1.5b": Shape("qwen2", 1536, 8960, 28, 12, 2, 151_936, tied=True, qkv_bias=True, rope_theta=1e6),
    "llama-3.1-8b": Shape("llama", 4096, 14_336, 32, 32, 8, 128_256, tied=False),
}


def config(shape: Shape) -> dict[str, object]:
    arch = "LlamaForCausalLM" if shape.family == "llama" else "Qwen2ForCausalLM"
    return {
        "architectures": [arch],
        "model_type": shape.family,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "tie_word_embeddings": shape.tied,
        "rms_norm_eps": 1e-5 if shape.family == "llama" else 1e-6,
        "rope_theta": shape.rope_theta,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def tensor_shapes(shape: Shape) -> Iterator[tuple[str, tuple[int, ...], int | None]]:
    """(name, shape, layer) in checkpoint order; layer None for the embeddings, norm and head."""
    h, hd = shape.hidden, shape.head_dim
    yield "model.embed_tokens.weight", (shape.vocab, h), None
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,), i
        yield p + "self_attn.q_proj.weight", (shape.heads * hd, h), i
        yield p + "self_attn.k_proj.weight", (shape.kv_heads * hd, h), i
        yield p + "self_attn.v_proj.weight", (shape.kv_heads * hd, h), i
        if shape.qkv_bias:
            yield p + "self_attn.q_proj.bias", (shape.heads * hd,), i
            yield p + "self_attn.k_proj.bias", (shape.kv_heads * hd,), i
            yield p + "self_attn.v_proj.bias", (shape.kv_heads * hd,), i
        yield p + "self_attn.o_proj.weight", (h, shape.heads * hd), i
        yield p + "post_attention_layernorm.weight", (h,), i
        yield p + "mlp.gate_proj.weight", (shape.intermediate, h), i
        yield p + "mlp.up_proj.weight", (shape.intermediate, h), i
        yield p + "mlp.down_proj.weight", (h, shape.intermediate), i
    yield "model.norm.weight", (h,), None
    if not shape.tied:
        yield "lm_head.weight", (shape.vocab, h), None


def values(name: str, dims: tuple[int, ...], member: str, perturbed: bool) -> torch.Tensor:
    """Deterministic bf16 values: base ~ N(0, 0.02²) (norms = 1); aligned and fine-tuned add
    N(0, 0.002²) steps inside the perturbed block."""
    seed = zlib.crc32(name.encode())
    if name.endswith("norm.weight"):
        t = torch.ones(dims)
    else:
        t = torch.randn(dims, generator=torch.Generator().manual_seed(seed)) * 0.02
    steps = {"base": 0, "aligned": 1, "finetuned": 2}[member] if perturbed else 0
    for k in range(1, steps + 1):
        t += torch.randn(dims, generator=torch.Generator().manual_seed(seed + 7919 * k)) * 0.002
    return t.to(torch.bfloat16)


def producer(name: str, dims: tuple[int, ...], member: str, perturbed: bool) -> Callable:
    def produce(f) -> None:  # type: ignore[no-untyped-def]
        t = values(name, dims, member, perturbed)
        f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    return produce


def write_trio(
    shape_name: str, out: Path, block: tuple[int, int] | None = None, lora: bool = False
) -> dict[str, Path]:
    """Write base, aligned and finetuned folders under ``out/shape_name`` (skipped when present)."""
    shape = SHAPES[shape_name]
    root = out / shape_name
    lo, hi = block or (shape.layers // 2 - shape.layers // 8, shape.layers // 2 + shape.layers // 8 - 1)
    entries = list(tensor_shapes(shape))
    groups: list[tuple[str, list[tuple[str, tuple[int, ...], int | None]]]] = []
    for name, dims, layer in entries:
        key = "other" if layer is None else f"layer{layer}"
        if not groups or groups[-1][0] != key:
            groups.append((key, []))
        groups[-1][1].append((name, dims, layer))
    n = len(groups)
    paths = {m: root / m for m in ("base", "aligned", "finetuned")}
    done = root / ".complete"
    if done.exists():
        return paths
    for member in ("base", "aligned", "finetuned"):
        folder = paths[member]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config(shape), indent=1))
        weight_map: dict[str, str] = {}
        total = 0
        for i, (_key, items) in enumerate(groups):
            fname = shard_filename(i, n)
            perturbed = any(layer is not None and lo <= layer <= hi for _, _, layer in items)
            weight_map.update({name: fname for name, _, _ in items})
            nbytes = sum(2 * _numel(d) for _, d, _ in items)
            total += nbytes
            if (folder / fname).exists():
                continue
            if member != "base" and not perturbed:
                os.link(paths["base"] / fname, folder / fname)  # identical content: share the inode
                continue
            planned = [
                PlannedTensor(
                    name,
                    TensorInfo("BF16", dims, 0, 2 * _numel(dims)),
                    producer(name, dims, member, perturbed),
                )
                for name, dims, _ in items
            ]
            write_shard(folder / fname, planned, {"format": "pt"})
        (folder / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    if lora:
        write_lora(shape, paths["aligned"], root / "finetuned-lora", (lo, hi))
    done.write_text(json.dumps({"block": [lo, hi]}))
    return paths


def write_lora(shape: Shape, aligned: Path, out: Path, block: tuple[int, int], rank: int = 16) -> None:
    """A rank-16 LoRA adapter on q, v, gate, up, down of the block's layers (fine-tune variant)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    tensors: dict[str, torch.Tensor] = {}
    dims = dict((n, d) for n, d, _ in tensor_shapes(shape))
    for layer in range(block[0], block[1] + 1):
        for t in targets:
            part = "self_attn" if t.endswith(("q_proj", "v_proj")) else "mlp"
            name = f"model.layers.{layer}.{part}.{t}.weight"
            rows, cols = dims[name]
            prefix = f"base_model.model.model.layers.{layer}.{part}.{t}"
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 17)
            tensors[prefix + ".lora_A.weight"] = (torch.randn(rank, cols, generator=g) * 0.01).to(
                torch.bfloat16
            )
            tensors[prefix + ".lora_B.weight"] = (torch.randn(rows, rank, generator=g) * 0.01).to(
                torch.bfloat16
            )
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": targets,
                "base_model_name_or_path": str(aligned),
                "fan_in_fan_out": False,
                "bias": "none",
            }
        )
    )


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), action="append", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lora", action="store_true")
    args = ap.parse_args()
    for name in args.shape:
        t0 = time.perf_counter()
        paths = write_trio(name, args.out, lora=args.lora)
        size = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors"))
        print(
            f"{name}: {size / 1e9:.2f} GB per member, written in {time.perf_counter() - t0:.0f} s "
            f"-> {paths['base'].parent}"
        )


if __name__ == "__main__":
    main()
