"""Start-up recovery: staging leftovers, unknown versions, unfinished jobs, and the current version
checked against its manifest (and rebuilt bit-identically when damaged)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fgsn_daemon.core.faults import fault_point
from fgsn_daemon.service.daemon.state import (
    LOG,
    DaemonState,
    VersionCorruptedError,
)
from fgsn_daemon.service.integrity import REPAIRABLE, damaged_files
from fgsn_daemon.service.registry.models import JobState
from fgsn_daemon.service.versions import VersionRepairError


class Recovery(DaemonState):
    """Start-up recovery."""

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
