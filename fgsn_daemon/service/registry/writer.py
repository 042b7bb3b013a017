"""Registry writes, inside one transaction (see :meth:`Registry.transaction`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Result, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fgsn_daemon.core.errors import RegistryError
from fgsn_daemon.core.records import (
    ApplyParams,
    ApplyResult,
    Band,
    LayerCurve,
    NeuronId,
    ScoredNeuron,
    SkippedNeuron,
)
from fgsn_daemon.service.registry.models import (
    CandidateOutcome,
    CheckpointVersion,
    CurrentVersion,
    DaemonHeartbeat,
    Dimension,
    DimensionRevision,
    Event,
    Job,
    JobKind,
    JobState,
    Lineage,
    NeuronClaim,
    RevisionCandidate,
    RevisionStatus,
    StoredLayerCurve,
    VersionRevision,
    utc_now,
)
from fgsn_daemon.service.registry.queries import Queries, StaleRegistryError

# Allowed job transitions. Non-final states may also go back to PENDING, which is how restart
# after a crash re-runs an interrupted job from its immutable inputs.
JOB_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.SCORING, JobState.FAILED, JobState.DISCARDED}),
    JobState.SCORING: frozenset({JobState.EDITING, JobState.PENDING, JobState.FAILED, JobState.DISCARDED}),
    JobState.EDITING: frozenset({JobState.PUBLISHING, JobState.PENDING, JobState.FAILED, JobState.DISCARDED}),
    JobState.PUBLISHING: frozenset({JobState.DONE, JobState.PENDING, JobState.FAILED, JobState.DISCARDED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.DISCARDED: frozenset(),
}


class NeuronAlreadyClaimedError(RegistryError):
    """A neuron that another revision actively owns was claimed again."""


class RegistryWriter(Queries):
    """Writes inside one transaction; queries here see the transaction's own changes."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        self.session.flush()
        # Bulk UPDATEs bypass the identity map; reload rows instead of trusting cached objects.
        self.session.expire_all()
        yield self.session

    # -- lineage and dimensions

    def ensure_lineage(
        self, base_fingerprint: str, aligned_fingerprint: str, finetuned_fingerprint: str
    ) -> int:
        """The lineage of these three inputs, created on first sight; marks it the most recently used."""
        s = self.session
        row = s.scalar(
            select(Lineage).where(
                Lineage.base_fingerprint == base_fingerprint,
                Lineage.aligned_fingerprint == aligned_fingerprint,
                Lineage.finetuned_fingerprint == finetuned_fingerprint,
            )
        )
        if row is None:
            row = Lineage(
                base_fingerprint=base_fingerprint,
                aligned_fingerprint=aligned_fingerprint,
                finetuned_fingerprint=finetuned_fingerprint,
            )
            s.add(row)
            s.flush()
            self.append_event(
                "lineage.created",
                lineage_id=row.id,
                details={
                    "base": base_fingerprint,
                    "aligned": aligned_fingerprint,
                    "finetuned": finetuned_fingerprint,
                },
            )
        else:
            row.last_seen_at = utc_now()
        s.flush()
        return row.id

    def ensure_dimension(self, lineage_id: int, name: str) -> int:
        s = self.session
        dim_id = s.scalar(
            select(Dimension.id).where(Dimension.lineage_id == lineage_id, Dimension.name == name)
        )
        if dim_id is not None:
            return dim_id
        dim = Dimension(lineage_id=lineage_id, name=name)
        s.add(dim)
        s.flush()
        return dim.id

    def add_revision(
        self,
        lineage_id: int,
        dimension: str,
        content_fingerprint: str,
        *,
        status: RevisionStatus = RevisionStatus.PENDING,
        error: str | None = None,
        params: ApplyParams | None = None,
    ) -> int:
        """A new revision (numbered after the dimension's last one); creates the dimension if needed."""
        s = self.session
        dim_id = self.ensure_dimension(lineage_id, dimension)
        last = s.scalar(
            select(func.max(DimensionRevision.number)).where(DimensionRevision.dimension_id == dim_id)
        )
        rev = DimensionRevision(
            dimension_id=dim_id,
            number=(last or 0) + 1,
            content_fingerprint=content_fingerprint,
            status=status.value,
            error=error,
            params=None if params is None else params.model_dump(mode="json"),
        )
        s.add(rev)
        s.flush()
        details: dict[str, Any] = {"number": rev.number, "fingerprint": content_fingerprint}
        if error is not None:
            details["error"] = error
        self.append_event(
            "revision.added",
            lineage_id=lineage_id,
            dimension_name=dimension,
            revision_id=rev.id,
            details=details,
        )
        return rev.id

    def set_revision_status(
        self,
        revision_id: int,
        status: RevisionStatus,
        *,
        expected: RevisionStatus | None = None,
        error: str | None = None,
    ) -> bool:
        """Set a revision's status (compare-and-set when ``expected`` is given); False if it was stale."""
        query = update(DimensionRevision).where(DimensionRevision.id == revision_id)
        if expected is not None:
            query = query.where(DimensionRevision.status == expected.value)
        result = self.session.execute(
            query.values(status=status.value, error=error, updated_at=utc_now()),
            execution_options={"synchronize_session": False},
        )
        if _updated_rows(result) != 1:
            return False
        lineage_id, name = self._revision_owner(revision_id)
        details: dict[str, Any] = {"status": status.value}
        if error is not None:
            details["error"] = error
        self.append_event(
            "revision.status",
            lineage_id=lineage_id,
            dimension_name=name,
            revision_id=revision_id,
            details=details,
        )
        return True

    # -- results and claims

    def record_revision_result(self, revision_id: int, result: ApplyResult) -> None:
        """Store what applying the revision found: params, band, candidates (with outcome), summary."""
        self.record_candidates(revision_id, result.candidates, result.selected, result.skipped)
        summary = result.model_dump(
            mode="json",
            include={
                "layer_counts",
                "modification",
                "output",
                "edited_tensors",
                "entry_masks",
                "entries",
                "benign",
                "contrast",
                "calibration",
            },
        )
        self.session.execute(
            update(DimensionRevision)
            .where(DimensionRevision.id == revision_id)
            .values(
                params=result.params.model_dump(mode="json"),
                band_start=result.band.start,
                band_end=result.band.end,
                summary=summary,
                updated_at=utc_now(),
            ),
            execution_options={"synchronize_session": False},
        )

    def record_candidates(
        self,
        revision_id: int,
        candidates: Sequence[ScoredNeuron],
        selected: Iterable[ScoredNeuron | NeuronId],
        skipped: Iterable[SkippedNeuron],
    ) -> None:
        """Replace the revision's stored candidates; selected/skipped decide each one's outcome."""
        selected_ids = {item if isinstance(item, NeuronId) else item.id for item in selected}
        owners = {item.id: item.owner for item in skipped}
        candidate_ids = {c.id for c in candidates}
        missing = (selected_ids | owners.keys()) - candidate_ids
        if missing:
            raise RegistryError(
                f"{len(missing)} selected/skipped neurons are not candidates, e.g. {min(missing)}"
            )
        rows = []
        for c in candidates:
            if c.id in selected_ids:
                outcome = CandidateOutcome.SELECTED
            elif c.id in owners:
                outcome = CandidateOutcome.SKIPPED
            else:
                outcome = CandidateOutcome.UNSELECTED
            rows.append(
                {
                    "revision_id": revision_id,
                    "layer": c.layer,
                    "space": c.space,
                    "neuron_index": c.index,
                    "harmful_score": c.harmful_score,
                    "benign_score": c.benign_score,
                    "harmful_rank": c.harmful_rank,
                    "outcome": outcome.value,
                    "skipped_owner": owners.get(c.id),
                }
            )
        s = self.session
        s.query(RevisionCandidate).filter(RevisionCandidate.revision_id == revision_id).delete(
            synchronize_session=False
        )
        if rows:
            s.execute(insert(RevisionCandidate), rows)

    def set_candidate_outcomes(
        self,
        revision_id: int,
        neurons: Iterable[NeuronId],
        outcome: CandidateOutcome,
        *,
        skipped_owner: str | None = None,
    ) -> int:
        """Re-mark stored candidates, e.g. skipped -> selected when a rollback frees their owner's
        neurons, so the registry reads as if the rolled-back dimension never ran. Returns rows changed."""
        if (outcome is CandidateOutcome.SKIPPED) != (skipped_owner is not None):
            raise RegistryError("skipped_owner must be given exactly when the outcome is 'skipped'")
        changed = 0
        for neuron in sorted(set(neurons)):
            result = self.session.execute(
                update(RevisionCandidate)
                .where(
                    RevisionCandidate.revision_id == revision_id,
                    RevisionCandidate.layer == neuron.layer,
                    RevisionCandidate.space == neuron.space,
                    RevisionCandidate.neuron_index == neuron.index,
                )
                .values(outcome=outcome.value, skipped_owner=skipped_owner),
                execution_options={"synchronize_session": False},
            )
            changed += _updated_rows(result)
        return changed

    def claim_neurons(self, revision_id: int, neurons: Iterable[NeuronId]) -> int:
        """Make the revision the active owner of ``neurons``; refused if any is already owned."""
        wanted = sorted(set(neurons))
        if not wanted:
            return 0
        lineage_id, name = self._revision_owner(revision_id)
        frozen = self.frozen_neurons(lineage_id)
        taken = [n for n in wanted if n in frozen]
        if taken:
            owners = sorted({frozen[n] for n in taken})
            raise NeuronAlreadyClaimedError(
                f"{len(taken)} neuron(s) wanted by {name!r} are already frozen by {', '.join(owners)}, "
                f"e.g. {taken[0].key()}"
            )
        now = utc_now()
        rows = [
            {
                "lineage_id": lineage_id,
                "layer": n.layer,
                "space": n.space,
                "neuron_index": n.index,
                "revision_id": revision_id,
                "claimed_at": now,
            }
            for n in wanted
        ]
        try:
            # A savepoint, so a refused insert leaves the caller's transaction usable (PostgreSQL).
            with self.session.begin_nested():
                self.session.execute(insert(NeuronClaim), rows)
        except IntegrityError as exc:  # the partial unique index caught a concurrent claim
            raise NeuronAlreadyClaimedError(f"neurons wanted by {name!r} are already frozen") from exc
        self.append_event(
            "neurons.claimed",
            lineage_id=lineage_id,
            dimension_name=name,
            revision_id=revision_id,
            details={"count": len(rows)},
        )
        return len(rows)

    def release_claims(self, revision_id: int) -> list[NeuronId]:
        """Release every active claim of the revision (rollback); returns the released neurons."""
        s = self.session
        active = s.execute(
            select(NeuronClaim.id, NeuronClaim.layer, NeuronClaim.space, NeuronClaim.neuron_index).where(
                NeuronClaim.revision_id == revision_id, NeuronClaim.released_at.is_(None)
            )
        ).all()
        if not active:
            return []
        s.execute(
            update(NeuronClaim)
            .where(NeuronClaim.revision_id == revision_id, NeuronClaim.released_at.is_(None))
            .values(released_at=utc_now()),
            execution_options={"synchronize_session": False},
        )
        lineage_id, name = self._revision_owner(revision_id)
        self.append_event(
            "neurons.released",
            lineage_id=lineage_id,
            dimension_name=name,
            revision_id=revision_id,
            details={"count": len(active)},
        )
        return sorted(NeuronId(layer, space, index) for _id, layer, space, index in active)

    def save_layer_curve(self, lineage_id: int, curve: LayerCurve, band: Band, cache_key: str = "") -> None:
        """Store (or replace) the lineage's layer curve and band under ``cache_key``."""
        s = self.session
        row = s.scalar(
            select(StoredLayerCurve).where(
                StoredLayerCurve.lineage_id == lineage_id, StoredLayerCurve.cache_key == cache_key
            )
        )
        if row is None:
            row = StoredLayerCurve(lineage_id=lineage_id, cache_key=cache_key)
            s.add(row)
        row.curve = curve.model_dump(mode="json")
        row.band_start, row.band_end, row.band_source = band.start, band.end, band.source
        row.created_at = utc_now()
        s.flush()

    # -- jobs

    def create_job(
        self,
        lineage_id: int,
        kind: JobKind,
        *,
        dimension_id: int | None = None,
        revision_id: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> int:
        if dimension_id is None and revision_id is not None:
            dimension_id = self.session.scalar(
                select(DimensionRevision.dimension_id).where(DimensionRevision.id == revision_id)
            )
        job = Job(
            lineage_id=lineage_id,
            kind=kind.value,
            state=JobState.PENDING.value,
            dimension_id=dimension_id,
            revision_id=revision_id,
            details=details,
        )
        self.session.add(job)
        self.session.flush()
        self.append_event(
            f"job.{JobState.PENDING.value}",
            lineage_id=lineage_id,
            dimension_name=self._dimension_name(dimension_id),
            revision_id=revision_id,
            job_id=job.id,
            details={"kind": kind.value},
        )
        return job.id

    def transition_job(
        self, job_id: int, expected: JobState, new: JobState, *, error: str | None = None
    ) -> bool:
        """Compare-and-set: move the job from ``expected`` to ``new``; False if it was not in ``expected``.

        Leaving PENDING counts as a new attempt. Transitions outside JOB_TRANSITIONS are bugs and raise.
        """
        if new not in JOB_TRANSITIONS[expected]:
            raise RegistryError(f"job transition {expected.value} -> {new.value} is not allowed")
        values: dict[str, Any] = {"state": new.value, "updated_at": utc_now(), "error": error}
        if expected is JobState.PENDING:
            values["attempt"] = Job.attempt + 1
        result = self.session.execute(
            update(Job).where(Job.id == job_id, Job.state == expected.value).values(**values),
            execution_options={"synchronize_session": False},
        )
        if _updated_rows(result) != 1:
            return False
        job = self.job(job_id)
        details: dict[str, Any] = {"from": expected.value, "attempt": job.attempt}
        if error is not None:
            details["error"] = error
        self.append_event(
            f"job.{new.value}",
            lineage_id=job.lineage_id,
            dimension_name=job.dimension,
            revision_id=job.revision_id,
            job_id=job_id,
            details=details,
        )
        return True

    # -- versions

    def add_version(
        self,
        lineage_id: int,
        path: str,
        revision_ids: Iterable[int],
        *,
        parent_id: int | None,
        make_current: bool = True,
    ) -> int:
        """Record a published checkpoint version containing ``revision_ids``; numbered per lineage."""
        s = self.session
        last = s.scalar(
            select(func.max(CheckpointVersion.number)).where(CheckpointVersion.lineage_id == lineage_id)
        )
        version = CheckpointVersion(
            lineage_id=lineage_id, number=(last or 0) + 1, path=path, parent_id=parent_id
        )
        s.add(version)
        s.flush()
        revisions = sorted(set(revision_ids))
        if revisions:
            s.execute(
                insert(VersionRevision), [{"version_id": version.id, "revision_id": r} for r in revisions]
            )
        self.append_event(
            "version.created",
            lineage_id=lineage_id,
            details={"version": version.number, "path": path, "revisions": revisions},
        )
        if make_current:
            self.set_current_version(lineage_id, version.id)
        return version.id

    def set_current_version(self, lineage_id: int, version_id: int) -> None:
        s = self.session
        version = s.get(CheckpointVersion, version_id)
        if version is None or version.lineage_id != lineage_id:
            raise StaleRegistryError(f"version {version_id} does not belong to lineage {lineage_id}")
        pointer = s.get(CurrentVersion, lineage_id)
        if pointer is None:
            s.add(CurrentVersion(lineage_id=lineage_id, version_id=version_id))
        else:
            pointer.version_id, pointer.updated_at = version_id, utc_now()
        s.flush()
        self.append_event(
            "version.current",
            lineage_id=lineage_id,
            details={"version": version.number, "path": version.path},
        )

    # -- history and liveness

    def append_event(
        self,
        kind: str,
        *,
        lineage_id: int | None = None,
        dimension_name: str | None = None,
        revision_id: int | None = None,
        job_id: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> int:
        event = Event(
            kind=kind,
            lineage_id=lineage_id,
            dimension_name=dimension_name,
            revision_id=revision_id,
            job_id=job_id,
            details=details,
        )
        self.session.add(event)
        self.session.flush()
        return event.id

    def heartbeat(self, pid: int, hostname: str, *, started_at: datetime | None = None) -> None:
        """Refresh the daemon's liveness row (``started_at`` given once, at start-up)."""
        s = self.session
        now = utc_now()
        row = s.get(DaemonHeartbeat, 1)
        if row is None:
            s.add(
                DaemonHeartbeat(
                    id=1, pid=pid, hostname=hostname, started_at=started_at or now, heartbeat_at=now
                )
            )
        else:
            row.pid, row.hostname, row.heartbeat_at = pid, hostname, now
            if started_at is not None:
                row.started_at = started_at
        s.flush()

    # -- helpers

    def _revision_owner(self, revision_id: int) -> tuple[int, str]:
        row = self.session.execute(
            select(Dimension.lineage_id, Dimension.name)
            .join(DimensionRevision, DimensionRevision.dimension_id == Dimension.id)
            .where(DimensionRevision.id == revision_id)
        ).one_or_none()
        if row is None:
            raise StaleRegistryError(f"revision {revision_id} does not exist")
        return row[0], row[1]

    def _dimension_name(self, dimension_id: int | None) -> str | None:
        if dimension_id is None:
            return None
        return self.session.scalar(select(Dimension.name).where(Dimension.id == dimension_id))


def _updated_rows(result: Result[Any]) -> int:
    # A bulk UPDATE through the session returns a CursorResult, which carries the row count.
    return cast(CursorResult[Any], result).rowcount
