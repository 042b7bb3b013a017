"""Entry masks: which single weight entries a revision restores, stored compactly and by content.

A revision with entry units has, per weight tensor, a boolean mask of candidate entries. Masks are
bit-packed (one bit per entry, so 1/16 of a bf16 tensor) into a safetensors file named by the
sha256 of its content; the registry records only that hash and the counts. Ownership stays at the
neuron level (the registry's claims), so disjointness and rollback keep their meaning: a revision
restores its mask's entries *inside the neurons it owns*, and the version is the union of those.
Restoring is a copy, so the result depends only on the set of (owner, neuron) pairs, never on the
order: rollback is bit-identical to a from-scratch run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from fgsn_daemon.core.durable import fsync_dir
from fgsn_daemon.core.errors import FGSNError
from fgsn_daemon.core.records import NeuronId

SUFFIX = ".safetensors"


def pack(masks: Mapping[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays = {n: np.packbits(masks[n].flatten().numpy().astype(np.bool_)) for n in sorted(masks)}
    shapes = {n: list(masks[n].shape) for n in sorted(masks)}
    return arrays, {"shapes": json.dumps(shapes, sort_keys=True)}


def per_neuron_counts(
    masks: Mapping[str, torch.Tensor], units: Mapping[str, tuple[int, str, int]]
) -> dict[NeuronId, int]:
    """Selected entries per neuron (``units``: tensor name -> (layer, space, neuron axis))."""
    out: dict[NeuronId, int] = {}
    for name, mask in masks.items():
        layer, space, axis = units[name]
        per = (mask if mask.dim() == 2 else mask.reshape(-1, 1)).sum(dim=1 - axis)
        for idx in per.nonzero().flatten().tolist():
            key = NeuronId(layer, space, idx)
            out[key] = out.get(key, 0) + int(per[idx])
    return out


def content_hash(masks: Mapping[str, torch.Tensor]) -> str:
    arrays, meta = pack(masks)
    h = hashlib.sha256(meta["shapes"].encode())
    for name in sorted(arrays):
        h.update(name.encode() + b"\0" + arrays[name].tobytes())
    return h.hexdigest()


def save_masks(
    folder: Path, masks: Mapping[str, torch.Tensor], units: Mapping[str, tuple[int, str, int]]
) -> str:
    """Write the masks under ``folder/<sha256>.safetensors`` (atomically, fsynced); return the hash.
    ``units`` (tensor -> layer, space, neuron axis) rides along so queries can count entries per
    neuron without the model. An existing file of the same hash is the same content and is kept."""
    digest = content_hash(masks)
    path = folder / f"{digest}{SUFFIX}"
    if path.is_file():
        return digest
    folder.mkdir(parents=True, exist_ok=True)
    arrays, meta = pack(masks)
    meta["units"] = json.dumps({n: list(units[n]) for n in sorted(masks)}, sort_keys=True)
    tmp = folder / f".{digest}.tmp-{os.getpid()}"
    save_file(arrays, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)
    return digest


def load_masks(folder: Path, digest: str) -> dict[str, torch.Tensor]:
    return load_masks_and_units(folder, digest)[0]


def load_masks_and_units(
    folder: Path, digest: str
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, str, int]]]:
    path = folder / f"{digest}{SUFFIX}"
    if not path.is_file():
        raise FGSNError(f"entry mask file {path} is missing (the registry names it); the state is incomplete")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    units = {n: (int(u[0]), str(u[1]), int(u[2])) for n, u in json.loads(meta.get("units", "{}")).items()}
    shapes = json.loads(meta.get("shapes", "{}"))
    arrays = load_file(str(path))
    out = {}
    for name, packed in arrays.items():
        shape = shapes[name]
        count = int(np.prod(shape))
        out[name] = torch.from_numpy(np.unpackbits(packed)[:count].astype(np.bool_)).reshape(shape)
    if content_hash(out) != digest:
        raise FGSNError(f"entry mask file {path} does not match its hash (corrupted)")
    return out, units


def restrict_to_neurons(
    masks: Mapping[str, torch.Tensor],
    neurons: Sequence[NeuronId],
    tensor_units: Mapping[str, tuple[int, str, int]],
) -> dict[str, torch.Tensor]:
    """The part of ``masks`` inside ``neurons`` (rows or columns, per the tensor's neuron axis)."""
    wanted: dict[tuple[int, str], list[int]] = {}
    for n in neurons:
        wanted.setdefault((n.layer, n.space), []).append(n.index)
    out = {}
    for name, mask in masks.items():
        layer, space, axis = tensor_units[name]
        idx = wanted.get((layer, space))
        if not idx:
            continue
        keep = torch.zeros(mask.shape[axis], dtype=torch.bool)
        keep[torch.tensor(idx, dtype=torch.long)] = True
        shape = [1] * mask.dim()
        shape[axis] = -1
        part = mask & keep.reshape(shape)
        if bool(part.any()):
            out[name] = part
    return out


def union(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, mask in part.items():
            out[name] = out[name] | mask if name in out else mask.clone()
    return out


def _verify(path: Path, digest: str) -> dict[str, list[int]]:
    """Check a stored mask file against its hash one packed tensor at a time; return its shapes."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        h = hashlib.sha256(meta.get("shapes", "{}").encode())
        for name in sorted(f.keys()):
            h.update(name.encode() + b"\0" + f.get_tensor(name).tobytes())
    if h.hexdigest() != digest:
        raise FGSNError(f"entry mask file {path} does not match its hash (corrupted)")
    return json.loads(meta.get("shapes", "{}"))


class StoredMaskUnion(Mapping[str, torch.Tensor]):
    """The union of stored mask files, unpacked one tensor at a time when asked for: writing a
    version holds one tensor's mask (a byte per entry of that tensor), not the model's (a byte per
    scored parameter, about 7 GB at 8B over every layer). Equal to ``union`` of ``load_masks``."""

    def __init__(self, folder: Path, digests: Sequence[str]) -> None:
        self._paths: list[Path] = []
        self._shapes: dict[str, list[int]] = {}
        for digest in dict.fromkeys(digests):
            path = folder / f"{digest}{SUFFIX}"
            if not path.is_file():
                raise FGSNError(
                    f"entry mask file {path} is missing (the registry names it); the state is incomplete"
                )
            self._shapes.update(_verify(path, digest))
            self._paths.append(path)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._shapes:
            raise KeyError(name)
        shape = self._shapes[name]
        count = int(np.prod(shape))
        out: np.ndarray | None = None
        for path in self._paths:
            with safe_open(str(path), framework="numpy") as f:
                if name not in f.keys():  # noqa: SIM118 (a safetensors handle has no __contains__)
                    continue
                bits = np.unpackbits(f.get_tensor(name))[:count].astype(np.bool_)
            out = bits if out is None else out | bits
        assert out is not None
        return torch.from_numpy(out).reshape(shape)

    def __contains__(self, name: object) -> bool:  # Mapping's default would unpack the mask
        return name in self._shapes

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self._shapes))

    def __len__(self) -> int:
        return len(self._shapes)
