"""Exceptions with messages meant for the user (the CLI prints them as they are)."""

from __future__ import annotations

import shutil
from pathlib import Path


class FGSNError(Exception):
    """Base class: anything the user can fix by changing inputs or configuration."""


class CheckpointError(FGSNError):
    """A model folder is missing, unreadable, unsafe (pickle) or malformed."""


class DiskSpaceError(CheckpointError):
    """Not enough free space to write a checkpoint (found before writing, or ENOSPC while writing).
    ``needed`` is the bytes the write needs (None when unknown), ``free`` what the disk had."""

    def __init__(self, message: str, needed: int | None, free: int) -> None:
        super().__init__(message)
        self.needed, self.free = needed, free

    @classmethod
    def enospc(cls, what: str, folder: Path, needed: int | None = None) -> DiskSpaceError:
        """ENOSPC while writing ``what`` in ``folder``, with what the disk has left now."""
        free = shutil.disk_usage(folder).free
        wanted = "" if needed is None else f"the write needs about {needed} bytes, "
        return cls(
            f"no space left on device while writing {what} in {folder}: {wanted}{free} bytes are free",
            needed,
            free,
        )


class IncompatibleCheckpointsError(CheckpointError):
    """Base, aligned and fine-tuned checkpoints do not share architecture or shapes."""


class PromptFileError(FGSNError):
    """A prompt JSONL file is missing, empty, oversized or malformed."""


class ConfigError(FGSNError):
    """Bad parameters (band, percentages, operator names, ...)."""


class RegistryError(FGSNError):
    """The registry database is missing, at the wrong schema revision, or refused a change."""


class PolicyError(FGSNError):
    """A policy folder or dimension is malformed, unsafe (symlink out, oversized) or invalid."""
