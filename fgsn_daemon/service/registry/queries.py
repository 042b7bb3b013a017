"""Read queries over the registry, shared by the reader, a snapshot and the writer.

Lists are built with a fixed number of statements whatever their length (no query per row).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from fgsn_daemon.core.errors import RegistryError
from fgsn_daemon.core.records import (
    Band,
    LayerCurve,
    NeuronId,
)
from fgsn_daemon.service.registry.models import (
    FINAL_JOB_STATES,
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
)
from fgsn_daemon.service.registry.views import (
    CandidateInfo,
    ClaimInfo,
    DimensionDetail,
    DimensionInfo,
    EventInfo,
    HeartbeatInfo,
    JobInfo,
    LineageInfo,
    RevisionInfo,
    StatusInfo,
    StoredCurveInfo,
    VersionInfo,
)


class StaleRegistryError(RegistryError):
    """A row the caller relied on has changed or vanished."""


class Queries(ABC):
    """Read queries, shared by the reader (fresh transaction) and the writer (its own transaction)."""

    @abstractmethod
    def _reading(self) -> AbstractContextManager[Session]:
        """A session to read from: a fresh transaction, or the writer's own."""

    def lineages(self) -> list[LineageInfo]:
        with self._reading() as s:
            rows = s.scalars(select(Lineage).order_by(Lineage.id)).all()
            return [_lineage_info(row) for row in rows]

    def default_lineage_id(self) -> int | None:
        """The lineage the daemon used last (the one queries show unless told otherwise)."""
        with self._reading() as s:
            return s.scalar(select(Lineage.id).order_by(Lineage.last_seen_at.desc(), Lineage.id.desc()))

    def frozen_neurons(self, lineage_id: int) -> dict[NeuronId, str]:
        """Every actively claimed neuron of the lineage and the name of the dimension that owns it."""
        with self._reading() as s:
            rows = s.execute(
                select(NeuronClaim.layer, NeuronClaim.space, NeuronClaim.neuron_index, Dimension.name)
                .join(DimensionRevision, DimensionRevision.id == NeuronClaim.revision_id)
                .join(Dimension, Dimension.id == DimensionRevision.dimension_id)
                .where(NeuronClaim.lineage_id == lineage_id, NeuronClaim.released_at.is_(None))
            ).all()
            return {NeuronId(layer, space, index): name for layer, space, index, name in rows}

    def dimensions(self, lineage_id: int) -> list[DimensionInfo]:
        with self._reading() as s:
            dims = s.scalars(
                select(Dimension).where(Dimension.lineage_id == lineage_id).order_by(Dimension.id)
            ).all()
            newest = (
                select(DimensionRevision.dimension_id, func.max(DimensionRevision.number).label("number"))
                .join(Dimension, Dimension.id == DimensionRevision.dimension_id)
                .where(Dimension.lineage_id == lineage_id)
                .group_by(DimensionRevision.dimension_id)
                .subquery()
            )
            latest_rows = s.scalars(
                select(DimensionRevision).join(
                    newest,
                    and_(
                        DimensionRevision.dimension_id == newest.c.dimension_id,
                        DimensionRevision.number == newest.c.number,
                    ),
                )
            ).all()
            name_of = {dim.id: dim.name for dim in dims}
            infos = _revision_infos(s, [(rev, name_of[rev.dimension_id]) for rev in latest_rows])
            latest = {info.id: info for info in infos}
            by_dimension = {rev.dimension_id: latest[rev.id] for rev in latest_rows}
            return [
                DimensionInfo(
                    id=dim.id, name=dim.name, created_at=dim.created_at, latest=by_dimension.get(dim.id)
                )
                for dim in dims
            ]

    def dimension(self, lineage_id: int, name: str) -> DimensionDetail | None:
        with self._reading() as s:
            dim = s.scalar(
                select(Dimension).where(Dimension.lineage_id == lineage_id, Dimension.name == name)
            )
            if dim is None:
                return None
            revisions = s.scalars(
                select(DimensionRevision)
                .where(DimensionRevision.dimension_id == dim.id)
                .order_by(DimensionRevision.number)
            ).all()
            return DimensionDetail(
                id=dim.id,
                name=dim.name,
                created_at=dim.created_at,
                revisions=_revision_infos(s, [(rev, dim.name) for rev in revisions]),
            )

    def revision(self, revision_id: int) -> RevisionInfo:
        with self._reading() as s:
            rev = s.get(DimensionRevision, revision_id)
            if rev is None:
                raise StaleRegistryError(f"revision {revision_id} does not exist")
            dim = s.get_one(Dimension, rev.dimension_id)
            return _revision_infos(s, [(rev, dim.name)])[0]

    def revisions(self, lineage_id: int, *, status: RevisionStatus | None = None) -> list[RevisionInfo]:
        """Revisions of every dimension of the lineage, in the order they were added."""
        with self._reading() as s:
            query = (
                select(DimensionRevision, Dimension.name)
                .join(Dimension, Dimension.id == DimensionRevision.dimension_id)
                .where(Dimension.lineage_id == lineage_id)
            )
            if status is not None:
                query = query.where(DimensionRevision.status == status.value)
            rows = s.execute(query.order_by(DimensionRevision.id)).all()
            return _revision_infos(s, [(rev, name) for rev, name in rows])

    def revision_candidates(
        self, revision_id: int, outcome: CandidateOutcome | None = None
    ) -> list[CandidateInfo]:
        with self._reading() as s:
            query = select(RevisionCandidate).where(RevisionCandidate.revision_id == revision_id)
            if outcome is not None:
                query = query.where(RevisionCandidate.outcome == outcome.value)
            query = query.order_by(
                RevisionCandidate.layer, RevisionCandidate.space, RevisionCandidate.neuron_index
            )
            return [
                CandidateInfo(
                    revision_id=row.revision_id,
                    layer=row.layer,
                    space=row.space,
                    index=row.neuron_index,
                    harmful_score=row.harmful_score,
                    benign_score=row.benign_score,
                    harmful_rank=row.harmful_rank,
                    outcome=CandidateOutcome(row.outcome),
                    skipped_owner=row.skipped_owner,
                )
                for row in s.scalars(query).all()
            ]

    def neurons(
        self,
        lineage_id: int,
        *,
        dimension: str | None = None,
        layer: int | None = None,
        include_released: bool = False,
    ) -> list[ClaimInfo]:
        """Claimed neurons (active ones unless ``include_released``), by layer, space, index."""
        with self._reading() as s:
            query = (
                select(NeuronClaim, Dimension.name, DimensionRevision.number)
                .join(DimensionRevision, DimensionRevision.id == NeuronClaim.revision_id)
                .join(Dimension, Dimension.id == DimensionRevision.dimension_id)
                .where(NeuronClaim.lineage_id == lineage_id)
            )
            if not include_released:
                query = query.where(NeuronClaim.released_at.is_(None))
            if dimension is not None:
                query = query.where(Dimension.name == dimension)
            if layer is not None:
                query = query.where(NeuronClaim.layer == layer)
            query = query.order_by(
                NeuronClaim.layer, NeuronClaim.space, NeuronClaim.neuron_index, NeuronClaim.id
            )
            return [
                ClaimInfo(
                    layer=claim.layer,
                    space=claim.space,
                    index=claim.neuron_index,
                    dimension=name,
                    revision_id=claim.revision_id,
                    revision_number=number,
                    claimed_at=claim.claimed_at,
                    released_at=claim.released_at,
                )
                for claim, name, number in s.execute(query).all()
            ]

    def versions(self, lineage_id: int) -> list[VersionInfo]:
        with self._reading() as s:
            rows = s.scalars(
                select(CheckpointVersion)
                .where(CheckpointVersion.lineage_id == lineage_id)
                .order_by(CheckpointVersion.number)
            ).all()
            return _version_infos(s, rows)

    def current_version(self, lineage_id: int) -> VersionInfo | None:
        with self._reading() as s:
            pointer = s.get(CurrentVersion, lineage_id)
            if pointer is None:
                return None
            return _version_infos(s, [s.get_one(CheckpointVersion, pointer.version_id)])[0]

    def job(self, job_id: int) -> JobInfo:
        with self._reading() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise StaleRegistryError(f"job {job_id} does not exist")
            return _job_infos(s, [job])[0]

    def jobs(self, lineage_id: int, *, unfinished_only: bool = False) -> list[JobInfo]:
        with self._reading() as s:
            query = select(Job).where(Job.lineage_id == lineage_id)
            if unfinished_only:
                query = query.where(Job.state.not_in([state.value for state in FINAL_JOB_STATES]))
            return _job_infos(s, s.scalars(query.order_by(Job.id)).all())

    def events(
        self,
        *,
        lineage_id: int | None = None,
        after_id: int = 0,
        limit: int | None = None,
        kind: str | None = None,
    ) -> list[EventInfo]:
        """Events in the order they were appended (oldest first); ``limit`` keeps the newest."""
        with self._reading() as s:
            query = select(Event).where(Event.id > after_id)
            if lineage_id is not None:
                query = query.where(Event.lineage_id == lineage_id)
            if kind is not None:
                query = query.where(Event.kind == kind)
            if limit is not None:
                newest = s.scalars(query.order_by(Event.id.desc()).limit(limit)).all()
                rows = list(reversed(newest))
            else:
                rows = list(s.scalars(query.order_by(Event.id)).all())
            return [_event_info(row) for row in rows]

    def events_page(
        self, *, lineage_id: int | None = None, after_id: int = 0, size: int = 1000
    ) -> list[EventInfo]:
        """The oldest ``size`` events after ``after_id``: page through any history in bounded memory."""
        with self._reading() as s:
            query = select(Event).where(Event.id > after_id)
            if lineage_id is not None:
                query = query.where(Event.lineage_id == lineage_id)
            rows = s.scalars(query.order_by(Event.id).limit(size)).all()
            return [_event_info(row) for row in rows]

    def layer_curve(self, lineage_id: int, cache_key: str = "") -> StoredCurveInfo | None:
        with self._reading() as s:
            row = s.scalar(
                select(StoredLayerCurve).where(
                    StoredLayerCurve.lineage_id == lineage_id, StoredLayerCurve.cache_key == cache_key
                )
            )
            if row is None:
                return None
            return StoredCurveInfo(
                curve=LayerCurve.model_validate(row.curve),
                band=Band(start=row.band_start, end=row.band_end, source=row.band_source),
                created_at=row.created_at,
            )

    def heartbeat_info(self) -> HeartbeatInfo | None:
        with self._reading() as s:
            row = s.get(DaemonHeartbeat, 1)
            if row is None:
                return None
            return HeartbeatInfo(
                pid=row.pid, hostname=row.hostname, started_at=row.started_at, heartbeat_at=row.heartbeat_at
            )

    def status(self, lineage_id: int | None = None) -> StatusInfo:
        lineage_id = self.default_lineage_id() if lineage_id is None else lineage_id
        heartbeat = self.heartbeat_info()
        events = self.events(lineage_id=lineage_id, limit=1) if lineage_id is not None else []
        if lineage_id is None:
            return StatusInfo(
                lineage=None,
                dimensions_by_status={},
                frozen_neurons=0,
                current_version=None,
                active_jobs=[],
                last_event=None,
                heartbeat=heartbeat,
            )
        by_status: dict[str, int] = {}
        for dim in self.dimensions(lineage_id):
            key = "no revision" if dim.latest is None else dim.latest.status.value
            by_status[key] = by_status.get(key, 0) + 1
        lineage = next(info for info in self.lineages() if info.id == lineage_id)
        return StatusInfo(
            lineage=lineage,
            dimensions_by_status=by_status,
            frozen_neurons=len(self.frozen_neurons(lineage_id)),
            current_version=self.current_version(lineage_id),
            active_jobs=self.jobs(lineage_id, unfinished_only=True),
            last_event=events[-1] if events else None,
            heartbeat=heartbeat,
        )


# ---------------------------------------------------------------- row -> view


def _lineage_info(row: Lineage) -> LineageInfo:
    return LineageInfo(
        id=row.id,
        base_fingerprint=row.base_fingerprint,
        aligned_fingerprint=row.aligned_fingerprint,
        finetuned_fingerprint=row.finetuned_fingerprint,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
    )


# A list view costs a fixed number of statements per ``_CHUNK`` rows, not one per row; chunks keep
# the IN lists inside every backend's bound-parameter limit.
_CHUNK = 500


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for lo in range(0, len(ids), _CHUNK):
        yield ids[lo : lo + _CHUNK]


def _revision_infos(s: Session, rows: Sequence[tuple[DimensionRevision, str]]) -> list[RevisionInfo]:
    """Views of (revision, dimension name) rows, with their candidate and active-claim counts."""
    ids = sorted({rev.id for rev, _ in rows})
    outcomes: dict[tuple[int, str], int] = {}
    active: dict[int, int] = {}
    for chunk in _chunks(ids):
        for revision_id, outcome, n in s.execute(
            select(RevisionCandidate.revision_id, RevisionCandidate.outcome, func.count())
            .where(RevisionCandidate.revision_id.in_(chunk))
            .group_by(RevisionCandidate.revision_id, RevisionCandidate.outcome)
        ).all():
            outcomes[(revision_id, outcome)] = n
        for revision_id, n in s.execute(
            select(NeuronClaim.revision_id, func.count())
            .where(NeuronClaim.revision_id.in_(chunk), NeuronClaim.released_at.is_(None))
            .group_by(NeuronClaim.revision_id)
        ).all():
            active[revision_id] = n
    return [
        RevisionInfo(
            id=rev.id,
            dimension=dimension,
            number=rev.number,
            content_fingerprint=rev.content_fingerprint,
            status=RevisionStatus(rev.status),
            created_at=rev.created_at,
            updated_at=rev.updated_at,
            error=rev.error,
            params=rev.params,
            band=None if rev.band_start is None or rev.band_end is None else (rev.band_start, rev.band_end),
            summary=rev.summary,
            selected=outcomes.get((rev.id, CandidateOutcome.SELECTED.value), 0),
            skipped=outcomes.get((rev.id, CandidateOutcome.SKIPPED.value), 0),
            active_claims=active.get(rev.id, 0),
        )
        for rev, dimension in rows
    ]


def _version_infos(s: Session, rows: Sequence[CheckpointVersion]) -> list[VersionInfo]:
    """Views of version rows, with their parent's number, current flag and revisions."""
    ids = sorted({row.id for row in rows})
    parent_ids = sorted({row.parent_id for row in rows if row.parent_id is not None})
    numbers: dict[int, int] = {}
    for chunk in _chunks(parent_ids):
        numbers.update(
            s.execute(
                select(CheckpointVersion.id, CheckpointVersion.number).where(CheckpointVersion.id.in_(chunk))
            )
            .tuples()
            .all()
        )
    lineages = sorted({row.lineage_id for row in rows})
    current = set(
        s.scalars(select(CurrentVersion.version_id).where(CurrentVersion.lineage_id.in_(lineages))).all()
    )
    revisions: dict[int, list[str]] = {}
    for chunk in _chunks(ids):
        for version_id, name, number in s.execute(
            select(VersionRevision.version_id, Dimension.name, DimensionRevision.number)
            .join(DimensionRevision, DimensionRevision.id == VersionRevision.revision_id)
            .join(Dimension, Dimension.id == DimensionRevision.dimension_id)
            .where(VersionRevision.version_id.in_(chunk))
        ).all():
            revisions.setdefault(version_id, []).append(f"{name}#{number}")
    return [
        VersionInfo(
            id=row.id,
            number=row.number,
            path=row.path,
            parent_id=row.parent_id,
            parent_number=None if row.parent_id is None else numbers.get(row.parent_id),
            created_at=row.created_at,
            current=row.id in current,
            revisions=sorted(revisions.get(row.id, [])),
        )
        for row in rows
    ]


def _job_infos(s: Session, jobs: Sequence[Job]) -> list[JobInfo]:
    """Views of job rows, with their dimension's name."""
    dimension_ids = sorted({job.dimension_id for job in jobs if job.dimension_id is not None})
    names: dict[int, str] = {}
    for chunk in _chunks(dimension_ids):
        names.update(
            s.execute(select(Dimension.id, Dimension.name).where(Dimension.id.in_(chunk))).tuples().all()
        )
    return [
        JobInfo(
            id=job.id,
            lineage_id=job.lineage_id,
            kind=JobKind(job.kind),
            state=JobState(job.state),
            dimension=None if job.dimension_id is None else names.get(job.dimension_id),
            dimension_id=job.dimension_id,
            revision_id=job.revision_id,
            attempt=job.attempt,
            created_at=job.created_at,
            updated_at=job.updated_at,
            error=job.error,
            details=job.details,
        )
        for job in jobs
    ]


def _event_info(row: Event) -> EventInfo:
    return EventInfo(
        id=row.id,
        occurred_at=row.occurred_at,
        kind=row.kind,
        lineage_id=row.lineage_id,
        dimension=row.dimension_name,
        revision_id=row.revision_id,
        job_id=row.job_id,
        details=row.details,
    )
