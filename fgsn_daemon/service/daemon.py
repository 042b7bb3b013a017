"""The long-running service: lock, recover, scan the policy folder, run jobs, publish versions.

One job at a time, each a compare-and-set state machine (pending → scoring → editing → done, or
failed/discarded). Every version is computed from the immutable inputs and the *whole* current
claim assignment (``continual.assign_claims``), so applying, replacing and rolling back are the
same operation on a different revision order. The order of side effects makes crashes harmless:

1. the version folder is written under a staging name and renamed into place (complete or absent);
2. one registry transaction records claims, statuses, the version and "job done" together;
3. the ``current`` link is swapped.

On restart: staging leftovers are deleted, version folders the registry does not know are removed,
unfinished jobs go back to pending (their work is deterministic, so re-running is safe), and the
``current`` link is made to agree with the registry. Then ``current`` is checked against its sha256
manifest, and a damaged file is rebuilt bit-identically before anything is built on it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from fgsn_daemon.core.durable import write_text_durably
from fgsn_daemon.core.errors import ConfigError, DiskSpaceError, FGSNError, PolicyError
from fgsn_daemon.core.faults import fault_point
from fgsn_daemon.core.policy import (
    POLICY_FILE,
    Dimension,
    bundled_benign,
    list_dimension_dirs,
    load_dimension,
    reference_harmful_prompts,
)
from fgsn_daemon.core.prompts import load_prompts
from fgsn_daemon.core.records import ApplyResult, Band, NeuronId, SkippedNeuron
from fgsn_daemon.engine.activations import ActivationStats, resolve_device
from fgsn_daemon.engine.continual import assign_claims, neurons_by_unit
from fgsn_daemon.engine.entry_masks import StoredMaskUnion, save_masks
from fgsn_daemon.engine.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, folder_fingerprint
from fgsn_daemon.engine.localisation import Selection, choose_band
from fgsn_daemon.engine.pipeline import (
    CheckpointEdit,
    FGSNParams,
    Localiser,
    ModelTrio,
    entry_selection,
    unit_tensors,
)
from fgsn_daemon.engine.scorings import get_scoring
from fgsn_daemon.service.integrity import REPAIRABLE, damaged_files
from fgsn_daemon.service.registry import Registry, is_unavailable
from fgsn_daemon.service.registry.models import CandidateOutcome, JobKind, JobState, RevisionStatus
from fgsn_daemon.service.registry.views import JobInfo, LineageInfo, VersionInfo
from fgsn_daemon.service.settings import Settings, mask_database_url
from fgsn_daemon.service.versions import VersionRepairError, VersionStore

LOG = logging.getLogger("fgsn.daemon")


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


def engine_params(settings: Settings) -> FGSNParams:
    p = settings.params
    return FGSNParams(
        scoring=p.scoring,
        positions=p.positions,
        operator=p.operator,
        q=p.q,
        p=p.p,
        spaces=tuple(p.spaces),
        score_model=p.score_model,
        rank=p.rank,
        band=tuple(p.band) if p.band else None,  # type: ignore[arg-type]
        batch_size=p.batch_size,
        max_length=p.max_length,
        allocation=p.allocation,
        budget=p.budget,
        scope=p.scope,
        unit=p.unit,
        target_tokens=p.target_tokens,
        guard=p.guard,
        contrast=p.contrast,
        contrast_kind=p.contrast_kind,
        steps=p.steps,
        hard_rounds=p.hard_rounds,
        hard_weight=p.hard_weight,
    )


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


@dataclass
class Daemon:
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

    # ------------------------------------------------------------------ lifecycle

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    def acquire_lock(self) -> None:
        if self._lock_fd is not None:
            return  # flock is per open file: a second open in this process would block itself
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaemonLockedError(
                f"another fgsn daemon (pid {holder}) is already running on {self.state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def open_registry(self) -> Registry:
        if self.registry is None:
            self.registry = Registry.open(self.settings.database_url_value())
        return self.registry

    def open_models(self) -> ModelTrio:
        s = self.settings
        if s.base is None or s.aligned is None or s.finetuned is None:
            raise FGSNError("the base, aligned and finetuned model paths must all be configured")
        if self.trio is None:
            trio = ModelTrio.open(s.base, s.aligned, s.finetuned)
            reg = self.open_registry()
            fingerprints = (
                folder_fingerprint(s.base),
                folder_fingerprint(s.aligned),
                folder_fingerprint(s.finetuned),
            )
            try:
                self.check_registry_matches_state_folder()  # before anything is written to either
                with reg.transaction() as tx:
                    self.lineage_id = tx.ensure_lineage(*fingerprints)
                self.versions = VersionStore(self.state_dir / f"lineage-{self.lineage_id}")
                self._write_lineage_marker()
                self._point_top_level_link()
            except BaseException:
                trio.close()
                raise
            self.trio = trio
        return self.trio

    def _lineage_record(self, lineage: LineageInfo) -> dict[str, Any]:
        return {
            "lineage_id": lineage.id,
            "created_at": lineage.created_at.isoformat(),
            "base": lineage.base_fingerprint,
            "aligned": lineage.aligned_fingerprint,
            "finetuned": lineage.finetuned_fingerprint,
        }

    def check_registry_matches_state_folder(self) -> None:
        """Refuse a registry that is not the one this state folder was written with: one that
        records versions in another state folder, or one whose lineages differ from those the
        state folder's lineage folders were made for (e.g. a new, empty database). Starting on it
        would delete versions it does not know as crash leftovers."""
        reg = self.open_registry()
        here = self.state_dir.resolve()
        url = mask_database_url(self.settings.database_url_value())
        lineages = {lin.id: lin for lin in reg.lineages()}
        for lin in lineages.values():
            for v in reg.versions(lin.id):
                if not Path(v.path).resolve().is_relative_to(here):
                    raise StateMismatchError(
                        f"the registry at {url} records versions in another state folder ({v.path}), "
                        f"not in {self.state_dir}: point state_dir at that folder or use another database"
                    )
        for marker in sorted(self.state_dir.glob(f"lineage-*/{LINEAGE_MARKER}")):
            try:
                recorded = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise StateMismatchError(
                    f"{marker} is unreadable ({exc}); restore it from a backup"
                ) from None
            lin = lineages.get(recorded.get("lineage_id"))
            if lin is None or self._lineage_record(lin) != recorded:
                raise StateMismatchError(
                    f"{marker.parent} was written with another registry (lineage "
                    f"{recorded.get('lineage_id')} created {recorded.get('created_at')}); "
                    f"the registry at {url} "
                    + ("has no such lineage" if lin is None else "holds a different lineage under that id")
                    + ": point database_url at the registry this state folder was written with, or use a "
                    "new state folder"
                )

    def _write_lineage_marker(self) -> None:
        """Tie ``lineage-N/`` to the registry's lineage N (see ``check_registry_matches_state_folder``)."""
        marker = self.state_dir / f"lineage-{self.lineage_id}" / LINEAGE_MARKER
        if marker.exists():
            return
        lin = next(x for x in self.open_registry().lineages() if x.id == self.lineage_id)
        write_text_durably(marker, json.dumps(self._lineage_record(lin), indent=1) + "\n")

    def _point_top_level_link(self) -> None:
        link, target = self.state_dir / "current", Path(f"lineage-{self.lineage_id}") / "current"
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        tmp = self.state_dir / ".current-lineage.tmp"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)

    def get_localiser(self) -> Localiser:
        if self.localiser is None:
            trio = self.open_models()
            s = self.settings
            benign = load_prompts(s.benign) if s.benign is not None else bundled_benign("train")
            self.localiser = Localiser(
                trio,
                engine_params(s),
                resolve_device(s.device),
                benign,
                progress=self.progress,
                placement=s.placement(),
                dtype=s.torch_dtype(),
                # the contrast's refusal targets: the lineage's reference set (as the band's)
                refusal_reference=reference_harmful_prompts(s.band_reference),
            )
        return self.localiser

    def close(self) -> None:
        if self.trio is not None:
            self.trio.close()
            self.trio = None
        if self.registry is not None:
            self.registry.close()
            self.registry = None
        self.release_lock()

    def check_stop(self) -> None:
        if self.stop_event.is_set():
            raise StopRequested

    # ------------------------------------------------------------------ start-up

    def start(self) -> None:
        """Lock, migrate, open models, recover from any crash, and make sure a first version exists."""
        self.acquire_lock()
        reg = self.open_registry()
        self.open_models()
        self.recover()
        self.ensure_band()
        self.check_current()  # never build on a damaged parent
        if reg.current_version(self.lineage_id) is None:
            self.progress("writing the initial version (the fine-tuned model, re-sharded)")
            self._publish([], {}, job_id=None, finish=None)

    def recover(self) -> None:
        reg, store = self.open_registry(), self.versions
        assert store is not None
        removed = store.clean_staging()
        fault_point("recover_staging_cleaned")
        known = {Path(v.path).name for v in reg.versions(self.lineage_id)}
        for name in store.names():
            if name not in known:
                store.remove(name)
                removed.append(name)
        fault_point("recover_orphans_removed")
        requeued = []
        with reg.transaction() as tx:
            for job in tx.jobs(self.lineage_id, unfinished_only=True):
                if job.state != JobState.PENDING:
                    tx.transition_job(job.id, job.state, JobState.PENDING)
                    requeued.append(job.id)
            if removed or requeued:
                tx.append_event(
                    "daemon.recovered",
                    lineage_id=self.lineage_id,
                    details={"removed": removed, "requeued_jobs": requeued},
                )
        fault_point("recover_jobs_requeued")
        current = reg.current_version(self.lineage_id)
        if current is not None and store.current() != Path(current.path).name:
            store.publish(Path(current.path).name)
        if removed or requeued:
            LOG.warning("recovered after an interruption: removed %s, requeued jobs %s", removed, requeued)

    def check_current(self) -> None:
        """Start-up quick check of ``current`` against its manifest. Damaged or missing files are
        rebuilt from the immutable inputs and the registry's claims (they must come out
        bit-identical to the manifest); otherwise the daemon refuses to start, naming the file."""
        reg, store = self.open_registry(), self.versions
        assert store is not None
        current = reg.current_version(self.lineage_id)
        if current is None:
            return
        name = Path(current.path).name
        problems = store.check(name)
        fatal = [p for p in problems if p.fatal]
        for p in problems:
            (LOG.error if p.fatal else LOG.warning)("integrity check of %s: %s", name, p)
        if not fatal:
            return
        self._record_integrity("version.corrupted", name, {"problems": [p.to_json() for p in fatal]})
        damaged = damaged_files(fatal)
        try:
            unrepairable = [str(p) for p in fatal if p.kind not in REPAIRABLE]
            if unrepairable:
                raise VersionRepairError("; ".join(unrepairable))
            self.progress(f"rebuilding {', '.join(damaged)} of {name} from the models and the registry")
            replaced = store.repair(name, damaged, self.version_inputs(self.current_claims(current)))
            left = [str(p) for p in store.check(name) if p.fatal]
            if left:
                raise VersionRepairError("still damaged after the rebuild: " + "; ".join(left))
        except VersionRepairError as exc:
            raise VersionCorruptedError(
                f"the current version {name} is damaged ({fatal[0]}) and was not repaired: {exc}. "
                f"Nothing is built on it. Run `fgsn verify --deep --state-dir {self.state_dir}` for every "
                "problem; restore the models and settings it was built with (or the file from a backup) "
                "and restart"
            ) from None
        done = [str(p.relative_to(store.root)) for p in replaced]
        self._record_integrity("version.repaired", name, {"files": damaged, "replaced": done})
        LOG.warning("repaired %s: rebuilt %s bit-identically (replaced %s)", name, damaged, done)

    def _record_integrity(self, kind: str, version: str, details: dict[str, Any]) -> None:
        with self.open_registry().transaction() as tx:
            tx.append_event(kind, lineage_id=self.lineage_id, details={"version": version, **details})

    def current_claims(self, current: VersionInfo) -> dict[int, list[NeuronId]]:
        """The claims the current version was built from (the same rule ``_publish`` applies)."""
        reg = self.open_registry()
        order = self.applied_order()
        label = {f"{r.dimension}#{r.number}": r.id for r in reg.revisions(self.lineage_id)}
        if {label.get(x) for x in current.revisions} != set(order):
            raise VersionRepairError(
                f"the registry's applied revisions {order} are not those of version {current.number} "
                f"({', '.join(current.revisions) or 'none'})"
            )
        return assign_claims(order, {r: self.stored_candidates(r) for r in order})

    def version_inputs(self, claims: dict[int, list[NeuronId]]) -> CheckpointEdit:
        """What a version is computed from: the trio, ``claims``, the band and the edit settings."""
        params = engine_params(self.settings)
        return CheckpointEdit(
            trio=self.open_models(),
            neurons=neurons_by_unit(claims),
            operator=params.operator,
            band=self.ensure_band(),
            spaces=params.spaces,
            rank=params.rank,
            device=resolve_device(self.settings.device),
            max_shard_bytes=DEFAULT_MAX_SHARD_BYTES,
            entry_masks=self.claimed_entry_masks(claims) if params.unit == "entry" else None,
        )

    def ensure_band(self) -> Band:
        """The lineage's layer curve and band, computed once (forward passes) and cached in the DB."""
        if self.band is not None:
            return self.band
        reg = self.open_registry()
        params = engine_params(self.settings)
        key = f"benign+reference:{params.score_model}:{params.max_length}"
        loc = self.get_localiser()
        # the lineage's reference set, read once with the Localiser (it also gives the contrast's
        # targets); a custom set keys its own curve
        prompts = list(loc.refusal_reference or ())
        if self.settings.band_reference is not None:
            key += ":" + hashlib.sha256("\0".join(prompts).encode()).hexdigest()[:16]
        stored = reg.layer_curve(self.lineage_id, key)
        if stored is not None:
            loc.curve, loc.band = stored.curve, choose_band(stored.curve, params.band)
        else:
            loc.establish_band(prompts)
            assert loc.curve is not None and loc.band is not None
            with reg.transaction() as tx:
                tx.save_layer_curve(self.lineage_id, loc.curve, loc.band, key)
        self.band = loc.band
        assert self.band is not None
        return self.band

    def benign_stats(self) -> ActivationStats:
        """Benign statistics in the band: computed once, kept in memory and cached on disk."""
        loc = self.get_localiser()
        band = self.ensure_band()
        params = loc.params
        key = repr((band, params.spaces, params.max_length, params.score_model, list(loc.benign_prompts)))
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        cache = self.state_dir / f"lineage-{self.lineage_id}" / f"benign-stats-{digest}.safetensors"
        if loc.has_benign({(layer, space) for layer in band.layers for space in params.spaces}):
            if not cache.exists():  # computed with the layer curve: keep it for the next start
                loc.benign_stats.save(cache)
        elif cache.exists():
            loc.set_benign(ActivationStats.load(cache))
        else:
            self.progress("benign forward pass (band only; reused for every dimension)")
            loc.set_benign(loc.collect(loc.benign_prompts, band.layers))
            loc.benign_stats.save(cache)
        return loc.benign_stats

    # ------------------------------------------------------------------ scanning

    def scan(self, now: float | None = None) -> list[str]:
        """Turn new or changed, settled dimension folders into revisions with pending apply jobs."""
        now = time.time() if now is None else now
        reg = self.open_registry()
        root = self.settings.policy_dir
        if not root.is_dir():
            self._report_once(
                f"policy-dir:{root}", "policy.folder_missing", None, f"policy folder {root} does not exist"
            )
            return []
        dirs, invalid = list_dimension_dirs(root)
        for entry in invalid:
            self._report_once(
                f"invalid:{entry.path.name}:{entry.reason}",
                "policy.invalid_entry",
                None,
                f"{entry.path.name}: {entry.reason}",
            )
        queued = []
        latest = {d.name: d.latest for d in reg.dimensions(self.lineage_id)}
        for path in dirs:
            try:
                if now - newest_mtime(path) < self.settings.settle_s:
                    continue  # still being written
            except FileNotFoundError:
                continue
            name = path.name
            error: str | None = None
            try:
                dim = load_policy(path)
                fp = dim.fingerprint
            except FGSNError as exc:
                error = str(exc)
                try:
                    fp = raw_fingerprint(path)
                except OSError:
                    continue
            last = latest.get(name)
            if last is not None and last.content_fingerprint == fp:
                continue
            with reg.transaction() as tx:
                if error is not None:
                    rev = tx.add_revision(
                        self.lineage_id, name, fp, status=RevisionStatus.FAILED, error=error
                    )
                    tx.append_event(
                        "dimension.rejected",
                        lineage_id=self.lineage_id,
                        dimension_name=name,
                        revision_id=rev,
                        details={"error": error},
                    )
                    LOG.error("dimension %s rejected: %s", name, error)
                    continue
                rev = tx.add_revision(self.lineage_id, name, fp)
                tx.create_job(
                    self.lineage_id,
                    JobKind.APPLY,
                    dimension_id=tx.ensure_dimension(self.lineage_id, name),
                    revision_id=rev,
                )
            fault_point("scan_revision_recorded")
            LOG.info("dimension %s: new revision queued", name)
            queued.append(name)
        return queued

    def _report_once(self, key: str, kind: str, dimension: str | None, message: str) -> None:
        if key in self._reported:
            return
        self._reported.add(key)
        LOG.error(message)
        with self.open_registry().transaction() as tx:
            tx.append_event(
                kind, lineage_id=self.lineage_id or None, dimension_name=dimension, details={"error": message}
            )

    # ------------------------------------------------------------------ jobs

    def drain(self) -> int:
        """Run pending jobs one at a time, oldest first. Returns how many finished."""
        reg = self.open_registry()
        done = 0
        while not self.stop_event.is_set():
            pending = [
                j for j in reg.jobs(self.lineage_id, unfinished_only=True) if j.state == JobState.PENDING
            ]
            if not pending:
                break
            job = min(pending, key=lambda j: j.id)
            if not self.models_available():
                break
            try:
                self.run_job(job)
                done += 1
            except StopRequested:
                LOG.info("stopping: job %s will resume at the next start", job.id)
                break
        return done

    def run_job(self, job: JobInfo) -> None:
        """Run one job. An FGSNError fails it with the error recorded (never retried on every
        tick); a lack of disk space also records what it needed, for ``retry_after_space``."""
        reg = self.open_registry()
        try:
            if job.kind == JobKind.APPLY:
                self.run_apply(job.id)
            else:
                self.run_rollback(job.id)
        except FGSNError as exc:
            state = reg.job(job.id).state
            if state in (JobState.DONE, JobState.FAILED, JobState.DISCARDED):
                return
            space = isinstance(exc, DiskSpaceError)
            message = str(exc) + ("; the job is retried once enough space is free" if space else "")
            self._fail_job(job.id, state, job.revision_id if job.kind == JobKind.APPLY else None, message)
            if isinstance(exc, DiskSpaceError):
                with reg.transaction() as tx:
                    tx.append_event(
                        WAITING_FOR_SPACE,
                        lineage_id=self.lineage_id,
                        dimension_name=job.dimension,
                        revision_id=job.revision_id,
                        job_id=job.id,
                        details={"needed": exc.needed, "free": exc.free},
                    )
        finally:
            self._job_masks.clear()  # scoring and publishing shared them; the next job reads afresh

    def retry_after_space(self) -> list[int]:
        """New jobs for the jobs that failed for lack of disk space, once the state folder's file
        system has the bytes they needed (or, when that was unknown, more than it had then). An
        apply is retried only while its revision is still the dimension's latest."""
        reg, store = self.open_registry(), self.versions
        assert store is not None
        # every tick: only this kind of event is read, not the whole history
        waiting = reg.events(lineage_id=self.lineage_id, kind=WAITING_FOR_SPACE)
        if not waiting:
            return []
        jobs = reg.jobs(self.lineage_id)
        free = shutil.disk_usage(store.root).free
        retried = []
        for event in waiting:
            assert event.job_id is not None
            failed = reg.job(event.job_id)
            target = (
                failed.revision_id
                if failed.kind == JobKind.APPLY
                else (failed.details or {}).get("dimension")
            )
            if failed.state != JobState.FAILED or any(
                j.id > failed.id
                and j.kind == failed.kind
                and target
                == (j.revision_id if j.kind == JobKind.APPLY else (j.details or {}).get("dimension"))
                for j in jobs
            ):
                continue  # already retried
            details = event.details or {}
            needed = details.get("needed")
            if (free < needed) if needed is not None else (free <= details.get("free", 0)):
                continue
            with reg.transaction() as tx:
                if failed.kind == JobKind.APPLY:
                    assert failed.revision_id is not None
                    rev = tx.revision(failed.revision_id)
                    latest = tx.dimension(self.lineage_id, rev.dimension)
                    if latest is None or latest.revisions[-1].id != rev.id:
                        continue
                    if not tx.set_revision_status(
                        rev.id, RevisionStatus.PENDING, expected=RevisionStatus.FAILED
                    ):
                        continue
                    job_id = tx.create_job(self.lineage_id, JobKind.APPLY, revision_id=rev.id)
                else:
                    job_id = tx.create_job(self.lineage_id, JobKind.ROLLBACK, details=failed.details)
                tx.append_event(
                    "job.retried",
                    lineage_id=self.lineage_id,
                    dimension_name=failed.dimension,
                    job_id=job_id,
                    details={"after": failed.id, "reason": f"disk space freed ({free} bytes free)"},
                )
            LOG.info(
                "job %s failed for lack of space; %d bytes are free now: retried as job %s",
                failed.id,
                free,
                job_id,
            )
            retried.append(job_id)
        return retried

    def models_available(self) -> bool:
        s = self.settings
        missing = [str(p) for p in (s.base, s.aligned, s.finetuned) if p is None or not Path(p).exists()]
        if missing:
            self._report_once(
                f"models-missing:{missing}",
                "daemon.model_missing",
                None,
                f"model path(s) missing: {', '.join(missing)}; jobs wait until they are back",
            )
            return False
        return True

    def _fail_job(self, job_id: int, state: JobState, revision_id: int | None, error: str) -> None:
        LOG.error("job %s failed: %s", job_id, error)
        with self.open_registry().transaction() as tx:
            tx.transition_job(job_id, state, JobState.FAILED, error=error)
            if revision_id is not None:
                tx.set_revision_status(revision_id, RevisionStatus.FAILED, error=error)

    def applied_order(self) -> list[int]:
        """Applied revisions in the order they were applied (by the job that applied them)."""
        reg = self.open_registry()
        applied = {r.id for r in reg.revisions(self.lineage_id, status=RevisionStatus.APPLIED)}
        jobs = [j for j in reg.jobs(self.lineage_id) if j.kind == JobKind.APPLY and j.state == JobState.DONE]
        order = [j.revision_id for j in sorted(jobs, key=lambda j: j.id) if j.revision_id in applied]
        return list(dict.fromkeys(r for r in order if r is not None))

    def stored_candidates(self, revision_id: int) -> list[NeuronId]:
        return [
            c.neuron
            for c in self.open_registry().revision_candidates(revision_id)
            if c.outcome in (CandidateOutcome.SELECTED, CandidateOutcome.SKIPPED)
        ]

    def run_apply(self, job_id: int) -> None:
        reg = self.open_registry()
        with reg.transaction() as tx:
            if not tx.transition_job(job_id, JobState.PENDING, JobState.SCORING):
                return
        fault_point("job_scoring_started")
        job = reg.job(job_id)
        assert job.revision_id is not None
        rev = reg.revision(job.revision_id)
        try:
            dim = load_policy(self.settings.policy_dir / rev.dimension)
        except (FGSNError, OSError) as exc:
            self._fail_job(job_id, JobState.SCORING, rev.id, f"cannot read dimension {rev.dimension}: {exc}")
            return
        if dim.fingerprint != rev.content_fingerprint:
            with reg.transaction() as tx:
                tx.transition_job(
                    job_id,
                    JobState.SCORING,
                    JobState.DISCARDED,
                    error="the dimension changed before it was applied; a new revision follows",
                )
            return
        try:
            result = self.localise(dim, rev.id)
        except FGSNError as exc:
            self._fail_job(job_id, JobState.SCORING, rev.id, str(exc))
            return
        fault_point("after_scoring")
        self.check_stop()
        with reg.transaction() as tx:
            tx.record_revision_result(rev.id, result)
            tx.transition_job(job_id, JobState.SCORING, JobState.EDITING)
        fault_point("job_result_recorded")
        # a changed dimension replaces its applied revision in the same version
        replaced = [
            r.id
            for r in reg.revisions(self.lineage_id, status=RevisionStatus.APPLIED)
            if r.dimension == rev.dimension
        ]
        order = [r for r in self.applied_order() if r not in replaced] + [rev.id]
        candidates = {r: self.stored_candidates(r) for r in order if r != rev.id}
        candidates[rev.id] = [c.id for c in result.candidates]
        self.check_stop()

        def finish(tx: Any, version_id: int) -> None:
            for old in replaced:
                tx.set_revision_status(old, RevisionStatus.SUPERSEDED)
            tx.set_revision_status(rev.id, RevisionStatus.APPLIED)
            _finish_job(tx, job_id)
            tx.append_event(
                "dimension.applied",
                lineage_id=self.lineage_id,
                dimension_name=rev.dimension,
                revision_id=rev.id,
                job_id=job_id,
                details={
                    "selected": len(result.selected),
                    "skipped": len(result.skipped),
                    "replaced": replaced,
                    "modified_ratio": result.modification.ratio,
                },
            )

        self._publish(order, candidates, job_id=job_id, finish=finish, released=replaced)
        LOG.info(
            "applied %s: %d neurons selected, %d skipped",
            rev.dimension,
            len(result.selected),
            len(result.skipped),
        )

    def localise(self, dim: Dimension, revision_id: int) -> ApplyResult:
        """This dimension's candidates and selection (frozen = neurons owned by other dimensions)."""
        loc = self.get_localiser()
        params = loc.params
        fgsn = dim.spec.fgsn
        q = fgsn.q if fgsn and fgsn.q is not None else params.q
        p = fgsn.p if fgsn and fgsn.p is not None else params.p
        harmful = list(dim.harmful)
        if fgsn and fgsn.max_prompts:
            harmful = harmful[: fgsn.max_prompts]
        self.ensure_band()
        scoring = fgsn.scoring if fgsn and fgsn.scoring else params.scoring
        positions = fgsn.positions if fgsn and fgsn.positions else params.positions
        budget = fgsn.budget if fgsn and fgsn.budget is not None else params.budget
        contrast = fgsn.contrast if fgsn and fgsn.contrast is not None else params.contrast
        loc.params = replace(params, scoring=scoring, positions=positions, budget=budget, contrast=contrast)
        self.progress(f"{dim.name}: scoring {len(harmful)} harmful prompts ({scoring})")
        try:
            # the dimension's own benign prompts, when given, replace the shared set for it
            benign_stats = None
            if not dim.benign and get_scoring(scoring).uses_activation_stats:
                benign_stats = self.benign_stats()
            reg = self.open_registry()
            frozen = {
                n: owner for n, owner in reg.frozen_neurons(self.lineage_id).items() if owner != dim.name
            }
            masks_digest, entries = None, None
            if params.unit == "entry":
                masks = loc.localise_entries(harmful, list(dim.benign) if dim.benign else None)
                selection = skip_frozen(entry_selection(loc, masks), frozen)
                masks_digest = save_masks(
                    self.masks_dir,
                    masks,
                    unit_tensors(self.open_models(), range(self.open_models().num_layers), params.spaces),
                )
                entries = sum(int(m.sum()) for m in masks.values())
            else:
                scores = loc.score_prompts(
                    harmful,
                    scoring_name=scoring,
                    positions=positions,
                    benign=benign_stats,
                    benign_prompts=list(dim.benign) if dim.benign else None,
                )
                selection = loc.select(scores, q, p, frozen)
        finally:
            loc.params = params
        self._warn_truncated(dim.name, revision_id, harmful, loc)
        trio = self.open_models()
        from fgsn_daemon.engine.pipeline import count_entry_modification, count_modification

        if masks_digest is not None:
            # this revision's own entries: its candidates that no other applied dimension restores
            others = [r for r in self.applied_order() if reg.revision(r).dimension != dim.name]
            taken = self.claimed_entry_masks({r: [] for r in others})
            mine = {n: m & ~taken[n] if n in taken else m for n, m in masks.items()}
            modification = count_entry_modification(trio, mine, loc.band, params.spaces)
        else:
            modification = count_modification(
                trio,
                neurons_by_unit({0: [n.id for n in selection.selected]}),
                loc.band,
                params.spaces,  # type: ignore[arg-type]
            )
        rec = params.record().model_copy(
            update={
                "q": q,
                "p": p,
                "scoring": scoring,
                "positions": positions,
                "budget": budget,
                "contrast": contrast,
            }
        )
        assert loc.curve is not None and loc.band is not None
        return ApplyResult(
            params=rec,
            curve=loc.curve,
            band=loc.band,
            layer_counts=selection.counts,
            candidates=selection.candidates,
            selected=selection.selected,
            skipped=selection.skipped,
            modification=modification,
            output=None,
            edited_tensors=[],
            entry_masks=masks_digest,
            entries=entries,
        )

    def _warn_truncated(self, name: str, revision_id: int, prompts: Sequence[str], loc: Localiser) -> None:
        """Prompts longer than ``max_length`` tokens are scored on their first ``max_length``
        tokens: said once per revision, in the log and the history, rather than failing."""
        if loc.tokenizer is None:
            return
        limit = loc.params.max_length
        lengths = [len(ids) for ids in loc.tokenizer(list(prompts))["input_ids"]]
        cut = sum(n > limit for n in lengths)
        if not cut:
            return
        message = f"{name}: {cut} prompt(s) longer than {limit} tokens (up to {max(lengths)}) were truncated"
        LOG.warning(message)
        with self.open_registry().transaction() as tx:
            tx.append_event(
                "dimension.prompts_truncated",
                lineage_id=self.lineage_id,
                dimension_name=name,
                revision_id=revision_id,
                details={"prompts": cut, "max_length": limit, "longest": max(lengths), "message": message},
            )

    def plan_rollback(
        self, dimension: str
    ) -> tuple[int, list[int], dict[int, list[NeuronId]], dict[int, list[NeuronId]]]:
        """(revision rolled back, remaining order, claims before, claims after) — no side effects."""
        reg = self.open_registry()
        applied = [
            r
            for r in reg.revisions(self.lineage_id, status=RevisionStatus.APPLIED)
            if r.dimension == dimension
        ]
        if not applied:
            raise FGSNError(f"dimension {dimension!r} has no applied revision to roll back")
        target = applied[-1].id
        order = self.applied_order()
        candidates = {r: self.stored_candidates(r) for r in order}
        before = assign_claims(order, candidates)
        remaining = [r for r in order if r != target]
        after = assign_claims(remaining, candidates)
        return target, remaining, before, after

    def run_rollback(self, job_id: int) -> None:
        reg = self.open_registry()
        with reg.transaction() as tx:  # no scoring phase: candidates come from the registry
            if not (
                tx.transition_job(job_id, JobState.PENDING, JobState.SCORING)
                and tx.transition_job(job_id, JobState.SCORING, JobState.EDITING)
            ):
                return
        fault_point("rollback_started")
        job = reg.job(job_id)
        name = (job.details or {}).get("dimension") or job.dimension
        try:
            target, remaining, _, _ = self.plan_rollback(str(name))
        except FGSNError as exc:
            self._fail_job(job_id, JobState.EDITING, None, str(exc))
            return
        candidates = {r: self.stored_candidates(r) for r in remaining}

        def finish(tx: Any, version_id: int) -> None:
            tx.set_revision_status(target, RevisionStatus.ROLLED_BACK)
            _finish_job(tx, job_id)
            tx.append_event(
                "dimension.rolled_back",
                lineage_id=self.lineage_id,
                dimension_name=str(name),
                revision_id=target,
                job_id=job_id,
            )

        self._publish(remaining, candidates, job_id=job_id, finish=finish, released=[target])
        LOG.info("rolled back %s", name)

    def _publish(
        self,
        order: Sequence[int],
        candidates: dict[int, list[NeuronId]],
        job_id: int | None,
        finish: Callable[[Any, int], None] | None,
        released: Sequence[int] = (),
    ) -> str:
        """Write the version for ``order``, commit claims + version + job outcome, swap ``current``."""
        reg, store = self.open_registry(), self.versions
        assert store is not None
        claims = assign_claims(order, candidates)
        current = reg.current_version(self.lineage_id)
        name = store.next_name()
        self.progress(f"writing version {name} ({sum(len(v) for v in claims.values())} frozen neurons)")
        inputs = self.version_inputs(claims)
        fault_point("before_build")
        store.build_version(name, inputs, parent=Path(current.path).name if current else None)
        fault_point("after_build")
        self.check_stop()
        with reg.transaction() as tx:
            self._sync_claims(tx, claims, candidates, released)
            version_id = tx.add_version(
                self.lineage_id,
                str(store.path(name)),
                list(order),
                parent_id=current.id if current else None,
                make_current=True,
            )
            if finish is not None:
                finish(tx, version_id)
            fault_point("claims_synced_uncommitted")
        fault_point("after_commit")
        store.publish(name)
        fault_point("after_publish")
        return name

    @property
    def masks_dir(self) -> Path:
        return self.state_dir / f"lineage-{self.lineage_id}" / "entry-masks"

    def claimed_entry_masks(self, claims: dict[int, list[NeuronId]]) -> dict[str, Any]:
        """Entry units are owned one by one: an entry belongs to the first applied revision whose
        candidate mask holds it, so the version restores the union of the applied revisions'
        masks. A later dimension never changes an entry an earlier one restored (restoring is a copy
        of the aligned value) and still restores its own new entries inside neurons first claimed by
        an earlier dimension; a rollback drops the revision's mask from the union, which equals a
        run without it."""
        reg = self.open_registry()
        digests = []
        for rev in claims:
            info = reg.revision(rev)
            digest = (info.summary or {}).get("entry_masks")
            if not digest:
                raise FGSNError(
                    f"{info.dimension} (revision {rev}) was applied with neuron units; entry units need an "
                    "entry mask for every applied revision: roll it back and re-apply it, or use unit=neuron"
                )
            digests.append(digest)
        key = "\0".join(digests)
        if key not in self._job_masks:  # content-addressed: the union of these digests never changes
            self._job_masks[key] = StoredMaskUnion(self.masks_dir, digests)
        return self._job_masks[key]

    def _sync_claims(
        self,
        tx: Any,
        claims: dict[int, list[NeuronId]],
        candidates: dict[int, list[NeuronId]],
        released: Sequence[int],
    ) -> None:
        """Make the registry's active claims equal ``claims``, touching only revisions that change."""
        held: dict[int, set[NeuronId]] = {}
        for c in tx.neurons(self.lineage_id):
            held.setdefault(c.revision_id, set()).add(NeuronId(c.layer, c.space, c.index))
        changed = [r for r in claims if set(claims[r]) != held.get(r, set())]
        for rev in {*released, *changed}:  # release first: a neuron may move between revisions
            if held.get(rev):
                tx.release_claims(rev)
        owner_name = {r: tx.revision(r).dimension for r in claims}
        owner_of = {n: r for r, ns in claims.items() for n in ns}
        for rev in changed:
            tx.claim_neurons(rev, claims[rev])
            tx.set_candidate_outcomes(rev, claims[rev], CandidateOutcome.SELECTED)
            mine = set(claims[rev])
            by_owner: dict[str, list[NeuronId]] = {}
            for n in candidates[rev]:
                if n not in mine and n in owner_of:
                    by_owner.setdefault(owner_name[owner_of[n]], []).append(n)
            for name, neurons in by_owner.items():
                tx.set_candidate_outcomes(rev, neurons, CandidateOutcome.SKIPPED, skipped_owner=name)

    # ------------------------------------------------------------------ loops

    def tick(self) -> None:
        """One scan + drain; exceptions are logged and recorded, never fatal to the service. When
        the registry is unreachable (server down, connection lost, SQLite locked) the tick backs
        off; the first tick that reaches it again runs start-up recovery before anything else, so
        a job cut off mid-way is redone and a version built but never recorded is deleted — a
        version is published only after the registry has committed it."""
        if time.monotonic() < self._retry_at:
            return
        try:
            if self._outage_since is not None:
                self._registry_back()
            reg = self.open_registry()
            with reg.transaction() as tx:
                tx.heartbeat(os.getpid(), socket.gethostname())
            self.scan()
            self.retry_after_space()
            self.drain()
        except StopRequested:
            pass
        except Exception as exc:
            if is_unavailable(exc):
                self._registry_lost(exc)
                return
            try:
                if isinstance(exc, FGSNError):
                    self._report_once(f"tick:{exc}", "daemon.error", None, str(exc))
                else:  # a bug must not kill a long-running service; it is recorded
                    LOG.exception("unexpected error in the daemon loop")
                    self._report_once(
                        f"tick:{type(exc).__name__}:{exc}",
                        "daemon.error",
                        None,
                        f"{type(exc).__name__}: {exc}",
                    )
            except Exception as again:
                if not is_unavailable(again):
                    raise
                self._registry_lost(again)

    @property
    def registry_unreachable(self) -> bool:
        return self._outage_since is not None

    def _registry_lost(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since, self._backoff_s = now, 0.0
        self._backoff_s = min(MAX_BACKOFF_S, max(MIN_BACKOFF_S, 2 * self._backoff_s))
        self._retry_at = now + self._backoff_s
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        LOG.error(
            "registry unreachable (%s): nothing is published meanwhile; retrying in %.0f s",
            first_line[:300],
            self._backoff_s,
        )

    def _registry_back(self) -> None:
        assert self._outage_since is not None
        self.recover()
        seconds = time.monotonic() - self._outage_since
        with self.open_registry().transaction() as tx:
            tx.append_event(
                "daemon.registry_reconnected",
                lineage_id=self.lineage_id,
                details={"outage_s": round(seconds, 1)},
            )
        LOG.warning("registry reachable again after %.0f s; recovered as after a restart", seconds)
        self._outage_since, self._backoff_s, self._retry_at = None, 0.0, 0.0

    def run_once(self) -> None:
        self.tick()

    def run_forever(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
        )
        scheduler.add_job(
            self.tick, "interval", seconds=self.settings.scan_interval_s, id="tick", next_run_time=_now_dt()
        )
        scheduler.start()
        try:
            while not self.stop_event.wait(0.5):
                pass
        finally:
            scheduler.shutdown(wait=True)

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            if self.stop_event.is_set():
                LOG.warning("second signal: exiting now")
                os._exit(130)
            LOG.info("signal %s: stopping at the next safe point", signum)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def skip_frozen(selection: Selection, frozen: Mapping[NeuronId, str]) -> Selection:
    """The continual rule on a candidate list: frozen candidates are skipped with their owner."""
    selected = [c for c in selection.candidates if c.id not in frozen]
    skipped = [
        SkippedNeuron(layer=c.layer, space=c.space, index=c.index, owner=frozen[c.id])
        for c in selection.candidates
        if c.id in frozen
    ]
    return Selection(selection.candidates, selected, skipped, selection.counts)


def _finish_job(tx: Any, job_id: int) -> None:
    """editing → publishing → done inside the transaction that records the version."""
    if not (
        tx.transition_job(job_id, JobState.EDITING, JobState.PUBLISHING)
        and tx.transition_job(job_id, JobState.PUBLISHING, JobState.DONE)
    ):
        raise FGSNError(f"job {job_id} changed state while it was running")


def _now_dt() -> Any:
    from datetime import datetime

    return datetime.now().astimezone()
