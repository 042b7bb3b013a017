"""Scanning the policy folder: new, changed and removed dimensions become revisions and jobs; bad input
is recorded once."""

from __future__ import annotations

import shutil
import time

from fgsn_daemon.core.errors import FGSNError
from fgsn_daemon.core.faults import fault_point
from fgsn_daemon.core.policy import (
    list_dimension_dirs,
)
from fgsn_daemon.service.daemon.state import (
    LOG,
    WAITING_FOR_SPACE,
    DaemonState,
    load_policy,
    newest_mtime,
    raw_fingerprint,
)
from fgsn_daemon.service.registry.models import JobKind, JobState, RevisionStatus


class Scanner(DaemonState):
    """Scanning the policy folder."""

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
