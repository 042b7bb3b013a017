"""Hugging Face model folders: lazy reading, LoRA adapters, compatibility checks, sharded writing.

Reading goes one tensor (or a few rows) at a time through the safetensors index; nothing is
unpickled and no remote code runs. Writing streams tensors into shards whose headers are known
up front; tensors that editing may touch go into their own shard(s) so that later versions can
rewrite only those and hard-link the rest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from fgsn_daemon.core.durable import fsync_dir
from fgsn_daemon.core.errors import CheckpointError, DiskSpaceError, IncompatibleCheckpointsError
from fgsn_daemon.core.faults import fault_point
from fgsn_daemon.core.precision import round_to
from fgsn_daemon.engine.io.safetensors_io import (
    DTYPE_NAMES,
    PlannedTensor,
    SafetensorsFile,
    TensorInfo,
    tensor_bytes,
    write_shard,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Config keys that must agree between the three checkpoints (shapes follow from them).
STRUCTURAL_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


class TensorSource(Protocol):
    """What the editor needs from a model: names, shapes and lazy reads."""

    config: dict[str, Any]
    path: Path

    def names(self) -> list[str]: ...
    def info(self, name: str) -> TensorInfo: ...
    def read(self, name: str) -> torch.Tensor: ...
    def read_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor: ...
    def copy_raw(self, name: str, out: BinaryIO) -> None: ...


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({exc})") from None


class Checkpoint:
    """A model folder with ``config.json`` and safetensors weights (single file or sharded)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: model folder not found")
        self.config: dict[str, Any] = _read_json(self.path / "config.json", "config.json")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = _read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: missing or empty weight_map")
            for fname in sorted(set(weight_map.values())):
                self._open(fname)
            for name, fname in weight_map.items():
                if name not in self._files[fname].infos:
                    raise CheckpointError(f"{index}: {name!r} is mapped to {fname} but not stored there")
                self._where[name] = fname
        elif (self.path / SINGLE_NAME).exists():
            f = self._open(SINGLE_NAME)
            self._where = dict.fromkeys(f.infos, SINGLE_NAME)
        else:
            pickled = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickled:
                raise CheckpointError(
                    f"{self.path}: only pickled weights found ({', '.join(pickled)}); pickles can run "
                    "arbitrary code and are refused. Convert the model to safetensors first."
                )
            raise CheckpointError(f"{self.path}: no model.safetensors or {INDEX_NAME}")

    def _open(self, fname: str) -> SafetensorsFile:
        target = (self.path / fname).resolve()
        if target.parent != self.path.resolve() or not target.is_file():
            raise CheckpointError(f"{self.path}: shard {fname!r} is missing or outside the folder")
        self._files[fname] = SafetensorsFile(target)
        return self._files[fname]

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._files[self._where[name]].infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found") from None

    def read(self, name: str) -> torch.Tensor:
        self.info(name)
        return self._files[self._where[name]].read(name)

    def read_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        self.info(name)
        return self._files[self._where[name]].read_rows(name, rows)

    def copy_raw(self, name: str, out: BinaryIO) -> None:
        self._files[self._where[name]].copy_raw(name, out)

    def total_parameters(self) -> int:
        return sum(self.info(n).numel for n in self.names())

    def close(self) -> None:
        for f in self._files.values():
            f.close()


@dataclass(frozen=True)
class LoraModule:
    a_file: str
    a_key: str
    b_key: str
    scale: float


MERGE_ROWS = 512  # rows of a LoRA-targeted weight merged at a time


class LoraFinetuned:
    """A PEFT LoRA adapter on top of the aligned checkpoint, read as a full fine-tuned model.

    Targeted weights are ``W_aligned + scale·B·A``, computed in float64 and rounded once to the
    aligned weight's dtype, whatever the adapter's own dtype (a float32 adapter over a bfloat16
    model gives a bfloat16 fine-tuned weight); every other tensor is the aligned one, copied byte
    for byte. This rounded merge *is* the fine-tuned model: edits start from it and untouched
    targeted weights are written as it.
    """

    def __init__(self, adapter_dir: str | Path, aligned: Checkpoint) -> None:
        self.path = Path(adapter_dir)
        self.aligned = aligned
        self.config = aligned.config
        cfg = _read_json(self.path / "adapter_config.json", "adapter_config.json")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(
                f"{self.path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)"
            )
        for flag in ("use_dora", "fan_in_fan_out"):
            if cfg.get(flag):
                raise CheckpointError(f"{self.path}: adapters with {flag}=true are not supported")
        if cfg.get("modules_to_save"):
            raise CheckpointError(f"{self.path}: adapters with modules_to_save are not supported")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise CheckpointError(f"{self.path}: per-module rank/alpha patterns are not supported")
        rank, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        weights = self.path / "adapter_model.safetensors"
        if not weights.exists():
            if (self.path / "adapter_model.bin").exists():
                raise CheckpointError(
                    f"{self.path}: adapter_model.bin is a pickle and is refused; save with safetensors"
                )
            raise CheckpointError(f"{self.path}: adapter_model.safetensors not found")
        self._file = SafetensorsFile(weights)
        self.modules: dict[str, LoraModule] = {}
        for key in self._file.infos:
            if ".lora_A." not in key:
                if ".lora_B." not in key:
                    raise CheckpointError(
                        f"{weights}: unexpected tensor {key!r} (only lora_A/lora_B supported)"
                    )
                continue
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in self._file.infos:
                raise CheckpointError(f"{weights}: {key!r} has no matching lora_B")
            target = module + ".weight"
            info = aligned.info(target)
            a_shape, b_shape = self._file.infos[key].shape, self._file.infos[b_key].shape
            if b_shape[0] != info.shape[0] or a_shape[1] != info.shape[1] or a_shape[0] != b_shape[1]:
                raise IncompatibleCheckpointsError(
                    f"{weights}: LoRA for {target} has A{list(a_shape)} B{list(b_shape)}, "
                    f"which does not fit the aligned weight {list(info.shape)}"
                )
            self.modules[target] = LoraModule(weights.name, key, b_key, scale)
        if not self.modules:
            raise CheckpointError(f"{weights}: no LoRA tensors found")

    def names(self) -> list[str]:
        return self.aligned.names()

    def info(self, name: str) -> TensorInfo:
        return self.aligned.info(name)

    def read(self, name: str) -> torch.Tensor:
        w = self.aligned.read(name)
        if name not in self.modules:
            return w
        factors = self._factors(name)
        out = torch.empty_like(w)
        for lo in range(0, w.shape[0], MERGE_ROWS):
            hi = min(lo + MERGE_ROWS, w.shape[0])
            out[lo:hi] = self._merged_block(factors, w[lo:hi], lo)
        return out

    def read_rows(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        rows = list(rows)
        if name not in self.modules or not rows:
            return self.aligned.read_rows(name, rows)
        n = self.info(name).shape[0]
        if not all(0 <= r < n for r in rows):
            raise IndexError(f"{name}: row outside 0..{n - 1} in {rows}")
        factors = self._factors(name)
        blocks: dict[int, torch.Tensor] = {}
        for block in sorted({r // MERGE_ROWS for r in rows}):
            lo, hi = block * MERGE_ROWS, min((block + 1) * MERGE_ROWS, n)
            w = self.aligned.read_rows(name, range(lo, hi))
            blocks[block] = self._merged_block(factors, w, lo)
        return torch.stack([blocks[r // MERGE_ROWS][r % MERGE_ROWS] for r in rows])

    def _factors(self, name: str) -> tuple[float, torch.Tensor, torch.Tensor]:
        """The module's scale, ``A`` in float64 and ``B`` as stored: read once per tensor."""
        m = self.modules[name]
        return m.scale, self._file.read(m.a_key).double(), self._file.read(m.b_key)

    @staticmethod
    def _merged_block(
        factors: tuple[float, torch.Tensor, torch.Tensor], w: torch.Tensor, lo: int
    ) -> torch.Tensor:
        """Rows ``lo ..`` of the merge: the aligned rows ``w`` plus ``scale·B[rows]·A`` in float64,
        rounded once. Rows are merged in fixed blocks of ``MERGE_ROWS`` (block k always covers rows
        k·MERGE_ROWS onwards), which keeps the float64 temporaries and the rounding's scratch at
        one block instead of the whole tensor (several GB for an 8B model's largest matrices) and
        makes every block the same matmul of the same shape however it is read, so ``read`` and
        ``read_rows`` agree bit for bit (as ``projection`` does for its neuron blocks)."""
        scale, a, b = factors
        delta = scale * (b[lo : lo + w.shape[0]].double() @ a)
        return round_to(w.double() + delta, w.dtype)

    def copy_raw(self, name: str, out: BinaryIO) -> None:
        if name in self.modules:
            out.write(tensor_bytes(self.read(name)))
        else:
            self.aligned.copy_raw(name, out)

    def close(self) -> None:
        self._file.close()


def open_finetuned(path: str | Path, aligned: Checkpoint) -> Checkpoint | LoraFinetuned:
    """A full checkpoint, or a LoRA adapter folder (``adapter_config.json``) on the aligned model."""
    p = Path(path)
    if (p / "adapter_config.json").exists():
        return LoraFinetuned(p, aligned)
    return Checkpoint(p)


def _dtype_problems(ref_label: str, ref: TensorSource, label: str, src: TensorSource) -> list[str]:
    """The first few tensors whose dtype differs between two sources, and how many more do."""
    mixed = [
        f"tensor {name}: dtype {ref.info(name).dtype} in {ref_label}, {src.info(name).dtype} in {label}"
        for name in sorted(set(ref.names()) & set(src.names()))
        if ref.info(name).dtype != src.info(name).dtype
    ]
    if len(mixed) > 3:
        mixed = [*mixed[:3], f"... and {len(mixed) - 3} more tensors whose dtype differs in {label}"]
    return mixed


def check_compatible(sources: dict[str, TensorSource]) -> None:
    """Raise with a precise list of differences unless all sources share architecture, shapes and
    dtypes. Mixed-precision trios (say a bfloat16 base with a float32 fine-tune) are refused rather
    than silently cast: an edit mixes values from all three models and is written in one dtype,
    so the user chooses the cast. A LoRA adapter is not a mixed trio: its fine-tuned weights take
    the aligned model's dtype whatever the adapter's (see ``LoraFinetuned``)."""
    problems: list[str] = []
    (ref_label, ref), *others = sources.items()
    ref_names = set(ref.names())
    for label, src in others:
        for key in STRUCTURAL_KEYS:
            a, b = ref.config.get(key), src.config.get(key)
            if a != b:
                problems.append(f"config {key}: {ref_label}={a!r} {label}={b!r}")
        names = set(src.names())
        for name in sorted(ref_names - names)[:10]:
            problems.append(f"tensor {name} is in {ref_label} but missing from {label}")
        for name in sorted(names - ref_names)[:10]:
            problems.append(f"tensor {name} is in {label} but not in {ref_label}")
        for name in sorted(ref_names & names):
            sa, sb = ref.info(name).shape, src.info(name).shape
            if sa != sb:
                problems.append(f"tensor {name}: shape {list(sa)} in {ref_label}, {list(sb)} in {label}")
        problems += _dtype_problems(ref_label, ref, label, src)
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        hint = (
            "\n  (mixed dtypes are not cast implicitly: save the three models in one dtype)"
            if any(": dtype " in p for p in problems)
            else ""
        )
        raise IncompatibleCheckpointsError(
            "checkpoints are not compatible:\n  " + "\n  ".join(shown) + more + hint
        )


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class ShardPlan:
    """Which tensors go in which shard; ``edit_group`` shards hold the tensors edits may touch."""

    shards: list[list[str]] = field(default_factory=list)
    edit_shards: set[int] = field(default_factory=set)


def plan_shards(infos: dict[str, TensorInfo], edit_names: Iterable[str], max_shard_bytes: int) -> ShardPlan:
    edit_set = set(edit_names)
    plan = ShardPlan()

    def pack(names: list[str]) -> None:
        current: list[str] = []
        size = 0
        for name in names:
            nbytes = infos[name].nbytes
            if current and size + nbytes > max_shard_bytes:
                plan.shards.append(current)
                current, size = [], 0
            current.append(name)
            size += nbytes
        if current:
            plan.shards.append(current)

    pack([n for n in infos if n not in edit_set])
    first_edit = len(plan.shards)
    pack([n for n in infos if n in edit_set])
    plan.edit_shards = set(range(first_edit, len(plan.shards)))
    return plan


def shard_filename(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_checkpoint(
    out_dir: Path,
    source: TensorSource,
    edited: dict[str, Callable[[], torch.Tensor]],
    edit_group: Iterable[str],
    aux_dirs: Sequence[Path],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
    reuse_from: Path | None = None,
) -> dict[str, Any]:
    """Write ``source`` to ``out_dir`` with ``edited`` tensors replaced (computed lazily, one at a
    time). Untouched tensors are copied byte for byte; shards outside the edit group that an
    earlier version (``reuse_from``, same layout) already holds are hard-linked instead. Refuses
    to start, and turns ENOSPC into, a ``DiskSpaceError`` naming the bytes needed.
    Returns the index written."""
    infos = {name: source.info(name) for name in source.names()}
    plan = plan_shards(infos, edit_group, max_shard_bytes)
    n = len(plan.shards)
    weight_map: dict[str, str] = {}
    total = 0
    previous_map: dict[str, str] = {}
    if reuse_from is not None and (reuse_from / INDEX_NAME).exists():
        previous_map = _read_json(reuse_from / INDEX_NAME, "safetensors index").get("weight_map", {})
    edited_names = set(edited)
    linked = {
        i
        for i, names in enumerate(plan.shards)
        if reuse_from is not None
        and i not in plan.edit_shards
        and not set(names) & edited_names
        and {k for k, v in previous_map.items() if v == shard_filename(i, n)} == set(names)
        and (reuse_from / shard_filename(i, n)).is_file()
    }
    aux = _aux_sources(aux_dirs)
    written = [names for i, names in enumerate(plan.shards) if i not in linked]
    needed = (
        sum(infos[nm].nbytes + ENTRY_OVERHEAD_BYTES for names in written for nm in names)
        + ENTRY_OVERHEAD_BYTES * len(infos)  # the index
        + sum(p.stat().st_size for p in aux.values())
        + FILE_OVERHEAD_BYTES * (len(written) + len(aux) + 2)  # + index and manifest
    )
    ensure_free_space(out_dir.parent, needed)
    out_dir.mkdir(parents=True, exist_ok=False)
    fault_point("staging_created")

    def producer(name: str) -> Callable[[BinaryIO], None]:
        if name in edited:

            def produce_edited(f: BinaryIO) -> None:
                tensor = edited[name]()
                expected = infos[name]
                if tuple(tensor.shape) != expected.shape or DTYPE_NAMES[tensor.dtype] != expected.dtype:
                    raise RuntimeError(f"edited {name} changed shape or dtype")
                f.write(tensor_bytes(tensor))

            return produce_edited
        return lambda f: source.copy_raw(name, f)

    try:
        for i, names in enumerate(plan.shards):
            fname = shard_filename(i, n)
            weight_map.update(dict.fromkeys(names, fname))
            if i in linked:
                assert reuse_from is not None
                os.link(reuse_from / fname, out_dir / fname)
                fault_point("shard_linked")
                total += sum(infos[nm].nbytes for nm in names)
                continue
            planned = [PlannedTensor(nm, infos[nm], producer(nm)) for nm in names]
            total += write_shard(out_dir / fname, planned, {"format": "pt"})
        index = {
            "metadata": {
                "total_size": total,
                "fgsn_edit_shards": [shard_filename(i, n) for i in sorted(plan.edit_shards)],
                **(metadata or {}),
            },
            "weight_map": weight_map,
        }
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        fault_point("index_written")
        for fname, src in aux.items():
            shutil.copyfile(src, out_dir / fname)
        fsync_dir(out_dir)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise DiskSpaceError.enospc(out_dir.name, out_dir.parent, needed) from None
    fault_point("staging_complete")
    return index


ENTRY_OVERHEAD_BYTES = 256  # a tensor's share of a shard header or of the index (generous)
FILE_OVERHEAD_BYTES = 4096  # a file's last, partly filled block


def _aux_sources(aux_dirs: Sequence[Path]) -> dict[str, Path]:
    """Config and tokenizer files to copy: the first of ``aux_dirs`` holding each wins."""
    out: dict[str, Path] = {}
    for aux_dir in aux_dirs:
        for fname in AUX_FILES:
            src = aux_dir / fname
            if fname not in out and src.is_file() and not src.is_symlink():
                out[fname] = src
    return out


def ensure_free_space(folder: Path, needed: int) -> None:
    """Refuse a write before it starts when ``folder``'s file system has less than ``needed`` bytes."""
    existing = folder
    while not existing.exists() and existing != existing.parent:  # the folder may not exist yet
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise DiskSpaceError(
            f"not enough free space: {needed} bytes needed, {free} free, to write a checkpoint in "
            f"{folder} (free {needed - free} bytes or more)",
            needed,
            free,
        )


SAMPLED_BLOCKS = 64
SAMPLED_BLOCK_BYTES = 64 * 1024


def folder_fingerprint(path: Path) -> str:
    """Identity of a model folder: configs, every safetensors header and size, and 64 evenly spaced
    64 KiB blocks of each weight file. Training changes every tensor, so sampled blocks tell two
    checkpoints of the same shapes apart, at a fixed cost instead of a full read of the model."""
    h = hashlib.sha256()
    for name in ("config.json", "adapter_config.json", "model.safetensors.index.json"):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f.name.encode() + b"\0" + str(size).encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(fh.read(min(n, 64 << 20)))
            step = max(size // SAMPLED_BLOCKS, 1)
            for offset in range(0, size, step):
                fh.seek(offset)
                h.update(fh.read(SAMPLED_BLOCK_BYTES))
    return h.hexdigest()
