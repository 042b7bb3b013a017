"""Checkpoint versions on disk: staged, fsynced, renamed into place, published by a symlink swap.

Layout under the state folder::

    versions/v0001/ ...       complete, immutable checkpoint folders
    versions/.staging-v0002/  a version being written (deleted on restart)
    current -> versions/v0001 the published version (replaced atomically with os.replace)

A version folder appears under its final name only once every file in it is written and fsynced,
so a crash leaves either no folder or a complete one. Unchanged shards are hard links into the
parent version, so a version costs only the bytes of its edit shard(s).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from fgsn_daemon.engine import (
    EditOutcome,
    ModelTrio,
    write_edited_checkpoint,
    write_entry_restored_checkpoint,
)
from fgsn_daemon.records import Band
from fgsn_daemon.safetensors_io import fsync_dir

VERSION_NAME = re.compile(r"^v(\d{4,})$")


class VersionStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.root = state_dir / "versions"
        self.current_link = state_dir / "current"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if VERSION_NAME.match(p.name) and p.is_dir())

    def next_name(self) -> str:
        numbers = [int(VERSION_NAME.match(n).group(1)) for n in self.names()]  # type: ignore[union-attr]
        return f"v{max(numbers, default=0) + 1:04d}"

    def current(self) -> str | None:
        if not self.current_link.is_symlink():
            return None
        return Path(os.readlink(self.current_link)).name

    def build(
        self,
        name: str,
        trio: ModelTrio,
        neurons: Mapping[tuple[int, str], Sequence[int]],
        operator: str,
        band: Band,
        spaces: Sequence[str],
        rank: int,
        device: torch.device | str,
        max_shard_bytes: int,
        parent: str | None,
        entry_masks: Mapping[str, torch.Tensor] | None = None,
    ) -> EditOutcome:
        """Write version ``name`` (the fine-tuned model with ``neurons`` projected, or, for entry
        units, the ``entry_masks`` entries restored) and rename it into place. Shards outside the
        edit group are hard-linked from ``parent``."""
        if not VERSION_NAME.match(name):
            raise ValueError(f"bad version name {name!r}")
        staging = self.root / f".staging-{name}"
        if staging.exists():
            shutil.rmtree(staging)
        reuse = self.path(parent) if parent else None
        if entry_masks is not None:
            outcome = write_entry_restored_checkpoint(
                trio, entry_masks, staging, band, spaces, max_shard_bytes=max_shard_bytes, reuse_from=reuse
            )
            os.rename(staging, self.path(name))
            fsync_dir(self.root)
            return outcome
        outcome = write_edited_checkpoint(
            trio,
            neurons,
            operator,
            staging,
            band,
            spaces,
            rank=rank,
            device=device,
            max_shard_bytes=max_shard_bytes,
            reuse_from=reuse,
        )
        os.rename(staging, self.path(name))
        fsync_dir(self.root)
        return outcome

    def publish(self, name: str) -> None:
        """Point ``current`` at ``name`` atomically."""
        if not self.path(name).is_dir():
            raise FileNotFoundError(f"version {name} does not exist")
        tmp = self.state_dir / ".current.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(Path("versions") / name, tmp)
        os.replace(tmp, self.current_link)
        fsync_dir(self.state_dir)

    def clean_staging(self) -> list[str]:
        removed = []
        for p in self.root.iterdir():
            if p.name.startswith(".staging-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        tmp = self.state_dir / ".current.tmp"
        if tmp.is_symlink():
            tmp.unlink()
        return removed

    def remove(self, name: str) -> None:
        """Delete a version folder that the registry does not know (a crash before its commit)."""
        if name == self.current():
            raise ValueError(f"refusing to delete the current version {name}")
        shutil.rmtree(self.path(name))
