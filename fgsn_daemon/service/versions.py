"""Checkpoint versions on disk: staged, fsynced, renamed into place, published by a symlink swap.

Layout under the state folder::

    versions/v0001/ ...       complete, immutable checkpoint folders
    versions/.staging-v0002/  a version being written (deleted on restart)
    current -> versions/v0001 the published version (replaced atomically with os.replace)

A version folder appears under its final name only once every file in it is written and fsynced,
so a crash leaves either no folder or a complete one. Unchanged shards are hard links into the
parent version, so a version costs only the bytes of its edit shard(s). Every version carries a
sha256 manifest of its files (see ``integrity``); a damaged file is rebuilt from the inputs.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from fgsn_daemon.core.durable import fsync_dir
from fgsn_daemon.core.errors import DiskSpaceError, FGSNError
from fgsn_daemon.core.faults import fault_point
from fgsn_daemon.core.records import Band
from fgsn_daemon.engine.pipeline import CheckpointEdit, EditOutcome, ModelTrio
from fgsn_daemon.service.integrity import (
    FileEntry,
    Problem,
    check_version,
    read_manifest,
    sha256_file,
    write_manifest,
)

VERSION_NAME = re.compile(r"^v(\d{4,})$")


class VersionRepairError(FGSNError):
    """A damaged version cannot be rebuilt bit-identically from the immutable inputs."""


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
        inputs = CheckpointEdit(
            trio, neurons, operator, band, spaces, rank, device, max_shard_bytes, entry_masks
        )
        return self.build_version(name, inputs, parent)

    def build_version(self, name: str, inputs: CheckpointEdit, parent: str | None) -> EditOutcome:
        """``build`` with its inputs in one value (the daemon also hands them to ``repair``)."""
        if not VERSION_NAME.match(name):
            raise ValueError(f"bad version name {name!r}")
        staging = self._fresh_staging(name)
        reuse = self.path(parent) if parent else None
        try:
            outcome = inputs.write(staging, reuse)
            write_manifest(staging, parent=reuse)  # inside staging: a published version always has one
            fault_point("manifest_written")
        except BaseException as exc:  # a failed build leaves nothing behind (a crash: recovery does)
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise DiskSpaceError.enospc(f"version {name}", self.root) from None
            raise
        os.rename(staging, self.path(name))
        fault_point("version_renamed")
        fsync_dir(self.root)
        return outcome

    def check(self, name: str) -> list[Problem]:
        """The quick check of one version against its manifest (every file hashed)."""
        return check_version(self.path(name))

    def repair(self, name: str, damaged: Sequence[str], inputs: CheckpointEdit) -> list[Path]:
        """Rebuild version ``name`` in full (no hard links) from ``inputs``, require each ``damaged``
        file to come out bit-identical to the manifest, and swap it in, in this version and in every
        version sharing the damaged inode through a hard link. Each swap is one rename, so a crash
        leaves every file old or new; the next check finds what is left. Returns the paths replaced."""
        folder = self.path(name)
        try:
            manifest = read_manifest(folder)
        except ValueError as exc:
            raise VersionRepairError(str(exc)) from None
        if manifest is None:
            raise VersionRepairError(f"{name} has no manifest: its intended content is unknown")
        unknown = [f for f in damaged if f not in manifest]
        if unknown:
            raise VersionRepairError(f"{name}: {', '.join(unknown)} not in the manifest")
        staging = self._fresh_staging(f"repair-{name}")
        try:
            inputs.write(staging, reuse=None)
            for f in damaged:
                try:
                    actual = sha256_file(staging / f, fsync=True)
                except OSError as exc:
                    raise VersionRepairError(f"the rebuild of {name} did not produce {f}: {exc}") from None
                if actual != manifest[f].sha256:
                    raise VersionRepairError(
                        f"rebuilt {name}/{f} has sha256 {actual} but the manifest expects "
                        f"{manifest[f].sha256}: the models or settings differ from those {name} "
                        "was built with, or the manifest itself is damaged"
                    )
            replaced: list[Path] = []
            for f in damaged:
                replaced += self._swap_in(staging, f, self._sharing(name, f, manifest[f]))
            return replaced
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _sharing(self, name: str, fname: str, entry: FileEntry) -> list[Path]:
        """``name``'s file and its hard links in other versions that expect the same bytes."""
        target = self.path(name) / fname
        if not target.exists():
            return [target]
        out = [target]
        for other in self.names():
            path = self.path(other) / fname
            if other == name or not path.exists() or not os.path.samefile(path, target):
                continue
            try:
                theirs = (read_manifest(self.path(other)) or {}).get(fname)
            except ValueError:
                continue
            if theirs == entry:
                out.append(path)
        return out

    def _swap_in(self, staging: Path, fname: str, targets: Sequence[Path]) -> list[Path]:
        for i, target in enumerate(targets):
            tmp = staging / f".swap-{i}"  # a link beside the rebuilt file, renamed over the target
            os.link(staging / fname, tmp)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        return list(targets)

    def _fresh_staging(self, name: str) -> Path:
        staging = self.root / f".staging-{name}"
        if staging.exists():
            shutil.rmtree(staging)
        return staging

    def publish(self, name: str) -> None:
        """Point ``current`` at ``name`` atomically."""
        if not self.path(name).is_dir():
            raise FileNotFoundError(f"version {name} does not exist")
        tmp = self.state_dir / ".current.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(Path("versions") / name, tmp)
        fault_point("publish_link_staged")
        os.replace(tmp, self.current_link)
        fault_point("publish_swapped")
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
