"""The daemon's state and what every part of it shares: errors, constants, small helpers."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fgsn_daemon.core.errors import ConfigError, FGSNError, PolicyError
from fgsn_daemon.core.params import FGSNFields
from fgsn_daemon.core.policy import (
    POLICY_FILE,
    Dimension,
    load_dimension,
)
from fgsn_daemon.core.records import Band, NeuronId, SkippedNeuron
from fgsn_daemon.engine.localisation import Selection
from fgsn_daemon.engine.pipeline import (
    FGSNParams,
    Localiser,
    ModelTrio,
)
from fgsn_daemon.engine.scorings import get_scoring
from fgsn_daemon.service.registry import Registry
from fgsn_daemon.service.registry.models import JobState
from fgsn_daemon.service.settings import Settings
from fgsn_daemon.service.versions import VersionStore

if TYPE_CHECKING:
    from fgsn_daemon.engine.activations import ActivationStats
    from fgsn_daemon.engine.pipeline import CheckpointEdit
    from fgsn_daemon.service.registry.views import VersionInfo

LOG = logging.getLogger("fgsn.daemon")

LOCK_NAME = "daemon.lock"
MIN_BACKOFF_S, MAX_BACKOFF_S = 1.0, 60.0  # waiting for an unreachable registry
LINEAGE_MARKER = "LINEAGE.json"  # in lineage-N/: the registry lineage the folder was made for
WAITING_FOR_SPACE = "job.waiting_for_space"  # event: a job failed with DiskSpaceError


class StateMismatchError(FGSNError):
    """The registry and the state folder were not written together."""


class DaemonLockedError(FGSNError):
    """Another daemon holds the state folder."""


class VersionCorruptedError(FGSNError):
    """The current version differs from its manifest and could not be rebuilt bit-identically."""


class StopRequested(Exception):
    """Raised at a safe point after SIGTERM/SIGINT; the job is resumed at the next start."""


def load_policy(path: Path) -> Dimension:
    """A policy folder (``load_dimension``), with the method names its ``[fgsn]`` table chooses
    checked against the engine's registries: a misspelt scoring fails the revision when it is
    read, with the key in the message, not later in the job."""
    dim = load_dimension(path)
    fgsn = dim.spec.fgsn
    if fgsn is not None and fgsn.scoring is not None:
        try:
            get_scoring(fgsn.scoring)
        except ConfigError as exc:
            raise PolicyError(f"{path / POLICY_FILE}: key 'fgsn.scoring': {exc}") from None
    return dim


def engine_params(settings: Settings) -> FGSNParams:
    """The engine's parameters: every field of the parameters' one declaration (``core.params``),
    taken from the settings; the engine-only fields keep their defaults."""
    values = {name: getattr(settings.params, name) for name in FGSNFields.model_fields}
    values["spaces"] = tuple(values["spaces"])
    values["band"] = tuple(values["band"]) if values["band"] else None
    return FGSNParams(**values)


def raw_fingerprint(path: Path) -> str:
    """Identity of a folder that failed to load (names, sizes, mtimes), so its error is recorded once."""
    h = hashlib.sha256()
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        st = entry.stat(follow_symlinks=False)
        h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return "raw:" + h.hexdigest()


def newest_mtime(path: Path) -> float:
    times = [path.stat().st_mtime]
    for entry in os.scandir(path):
        times.append(entry.stat(follow_symlinks=False).st_mtime)
    return max(times)


def skip_frozen(selection: Selection, frozen: Mapping[NeuronId, str]) -> Selection:
    """The continual rule on a candidate list: frozen candidates are skipped with their owner."""
    selected = [c for c in selection.candidates if c.id not in frozen]
    skipped = [
        SkippedNeuron(layer=c.layer, space=c.space, index=c.index, owner=frozen[c.id])
        for c in selection.candidates
        if c.id in frozen
    ]
    return Selection(selection.candidates, selected, skipped, selection.counts)


def finish_job(tx: Any, job_id: int) -> None:
    """editing → publishing → done inside the transaction that records the version."""
    if not (
        tx.transition_job(job_id, JobState.EDITING, JobState.PUBLISHING)
        and tx.transition_job(job_id, JobState.PUBLISHING, JobState.DONE)
    ):
        raise FGSNError(f"job {job_id} changed state while it was running")


def now_dt() -> Any:
    from datetime import datetime

    return datetime.now().astimezone()


@dataclass
class DaemonState:
    """Fields shared by the daemon's parts (each part is a class in this package; ``Daemon``
    combines them)."""

    settings: Settings
    progress: Callable[[str], None] = field(default=lambda msg: LOG.info(msg))
    stop_event: threading.Event = field(default_factory=threading.Event)
    registry: Registry | None = None
    trio: ModelTrio | None = None
    localiser: Localiser | None = None
    lineage_id: int = 0
    versions: VersionStore | None = None
    band: Band | None = None
    _lock_fd: int | None = None
    _reported: set[str] = field(default_factory=set)
    _outage_since: float | None = None  # monotonic time the registry became unreachable
    _job_masks: dict[str, Any] = field(default_factory=dict)  # entry masks read during one job
    _backoff_s: float = 0.0
    _retry_at: float = 0.0

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    @property
    def masks_dir(self) -> Path:
        return self.state_dir / f"lineage-{self.lineage_id}" / "entry-masks"

    if TYPE_CHECKING:
        # What one part calls on another (each is defined in the part named beside it); declared
        # here for type checkers only, so the parts stay independent classes at run time.
        def open_registry(self) -> Registry: ...  # Lifecycle
        def check_stop(self) -> None: ...  # Lifecycle
        def check_registry_matches_state_folder(self) -> None: ...  # Lifecycle
        def _write_lineage_marker(self) -> None: ...  # Lifecycle
        def _point_top_level_link(self) -> None: ...  # Lifecycle
        def recover(self) -> None: ...  # Recovery
        def check_current(self) -> None: ...  # Recovery
        def scan(self, now: float | None = None) -> list[str]: ...  # Scanner
        def retry_after_space(self) -> list[int]: ...  # Scanner
        # Scanner
        def _report_once(self, key: str, kind: str, dimension: str | None, message: str) -> None: ...
        def drain(self) -> int: ...  # JobRunner
        def applied_order(self) -> list[int]: ...  # JobRunner
        def stored_candidates(self, revision_id: int) -> list[NeuronId]: ...  # JobRunner
        def current_claims(self, current: VersionInfo) -> dict[int, list[NeuronId]]: ...  # Publisher
        def version_inputs(self, claims: dict[int, list[NeuronId]]) -> CheckpointEdit: ...  # Publisher
        def claimed_entry_masks(self, claims: dict[int, list[NeuronId]]) -> dict[str, Any]: ...  # Publisher
        def _publish(  # Publisher
            self,
            order: Sequence[int],
            candidates: dict[int, list[NeuronId]],
            job_id: int | None,
            finish: Callable[[Any, int], None] | None,
            released: Sequence[int] = (),
        ) -> str: ...
        def open_models(self) -> ModelTrio: ...  # LineageResources
        def get_localiser(self) -> Localiser: ...  # LineageResources
        def ensure_band(self) -> Band: ...  # LineageResources
        def benign_stats(self) -> ActivationStats: ...  # LineageResources
        def models_available(self) -> bool: ...  # LineageResources
