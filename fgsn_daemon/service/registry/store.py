"""The registry API the daemon and the CLI call.

``Registry`` answers queries, each in its own short read transaction. Writes go through
``with registry.transaction() as tx:`` which yields a :class:`RegistryWriter` bound to one
transaction (``BEGIN IMMEDIATE`` on SQLite): everything done inside commits together or not at
all, which is how "record the result, claim the neurons, publish the version, finish the job"
becomes one atomic step. The daemon is the only writer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any, cast

from pydantic import BaseModel, ConfigDict
from sqlalchemy import CursorResult, Engine, Result, and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

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
from fgsn_daemon.service.registry.db import make_engine, require_head, upgrade_to_head, write_engine
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
    utc_now,
)

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


class StaleRegistryError(RegistryError):
    """A row the caller relied on has changed or vanished."""


# ---------------------------------------------------------------- read models


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class LineageInfo(_View):
    id: int
    base_fingerprint: str
    aligned_fingerprint: str
    finetuned_fingerprint: str
    created_at: datetime
    last_seen_at: datetime


class RevisionInfo(_View):
    id: int
    dimension: str
    number: int
    content_fingerprint: str
    status: RevisionStatus
    created_at: datetime
    updated_at: datetime
    error: str | None
    params: dict[str, Any] | None
    band: tuple[int, int] | None
    summary: dict[str, Any] | None
    selected: int  # candidates this revision moved
    skipped: int  # candidates already frozen by another dimension
    active_claims: int


class DimensionInfo(_View):
    id: int
    name: str
    created_at: datetime
    latest: RevisionInfo | None


class DimensionDetail(_View):
    id: int
    name: str
    created_at: datetime
    revisions: list[RevisionInfo]  # oldest first


class CandidateInfo(_View):
    revision_id: int
    layer: int
    space: str
    index: int
    harmful_score: float
    benign_score: float
    harmful_rank: int
    outcome: CandidateOutcome
    skipped_owner: str | None

    @property
    def neuron(self) -> NeuronId:
        return NeuronId(self.layer, self.space, self.index)


class ClaimInfo(_View):
    layer: int
    space: str
    index: int
    dimension: str
    revision_id: int
    revision_number: int
    claimed_at: datetime
    released_at: datetime | None


class VersionInfo(_View):
    id: int
    number: int
    path: str
    parent_id: int | None
    parent_number: int | None
    created_at: datetime
    current: bool
    revisions: list[str]  # "name#number", sorted


class JobInfo(_View):
    id: int
    lineage_id: int
    kind: JobKind
    state: JobState
    dimension: str | None
    dimension_id: int | None
    revision_id: int | None
    attempt: int
    created_at: datetime
    updated_at: datetime
    error: str | None
    details: dict[str, Any] | None


class EventInfo(_View):
    id: int
    occurred_at: datetime
    kind: str
    lineage_id: int | None
    dimension: str | None
    revision_id: int | None
    job_id: int | None
    details: dict[str, Any] | None


class StoredCurveInfo(_View):
    curve: LayerCurve
    band: Band
    created_at: datetime


class HeartbeatInfo(_View):
    pid: int
    hostname: str
    started_at: datetime
    heartbeat_at: datetime


class StatusInfo(_View):
    lineage: LineageInfo | None
    dimensions_by_status: dict[str, int]
    frozen_neurons: int
    current_version: VersionInfo | None
    active_jobs: list[JobInfo]
    last_event: EventInfo | None
    heartbeat: HeartbeatInfo | None


# ---------------------------------------------------------------- queries


class _Queries(ABC):
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
            )
            out = []
            for dim in dims.all():
                latest = s.scalar(
                    select(DimensionRevision)
                    .where(DimensionRevision.dimension_id == dim.id)
                    .order_by(DimensionRevision.number.desc())
                )
                info = None if latest is None else _revision_info(s, latest, dim.name)
                out.append(DimensionInfo(id=dim.id, name=dim.name, created_at=dim.created_at, latest=info))
            return out

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
                revisions=[_revision_info(s, rev, dim.name) for rev in revisions],
            )

    def revision(self, revision_id: int) -> RevisionInfo:
        with self._reading() as s:
            rev = s.get(DimensionRevision, revision_id)
            if rev is None:
                raise StaleRegistryError(f"revision {revision_id} does not exist")
            dim = s.get_one(Dimension, rev.dimension_id)
            return _revision_info(s, rev, dim.name)

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
            return [_revision_info(s, rev, name) for rev, name in rows]

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
            return [_version_info(s, row) for row in rows]

    def current_version(self, lineage_id: int) -> VersionInfo | None:
        with self._reading() as s:
            pointer = s.get(CurrentVersion, lineage_id)
            if pointer is None:
                return None
            return _version_info(s, s.get_one(CheckpointVersion, pointer.version_id))

    def job(self, job_id: int) -> JobInfo:
        with self._reading() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise StaleRegistryError(f"job {job_id} does not exist")
            return _job_info(s, job)

    def jobs(self, lineage_id: int, *, unfinished_only: bool = False) -> list[JobInfo]:
        with self._reading() as s:
            query = select(Job).where(Job.lineage_id == lineage_id)
            if unfinished_only:
                query = query.where(Job.state.not_in([state.value for state in FINAL_JOB_STATES]))
            return [_job_info(s, job) for job in s.scalars(query.order_by(Job.id)).all()]

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


# ---------------------------------------------------------------- reader


class Registry(_Queries):
    """A connection to the registry database. Use :meth:`open`."""

    def __init__(self, engine: Engine, url: str, *, read_only: bool) -> None:
        self.engine = engine
        self.url = url
        self.read_only = read_only

    @classmethod
    def open(cls, url: str, *, read_only: bool = False, migrate: bool = True) -> Registry:
        """Writers (the daemon) upgrade the schema to head first; readers require it to be at head."""
        engine = make_engine(url, read_only=read_only)
        try:
            if read_only or not migrate:
                require_head(engine, url)
            else:
                upgrade_to_head(url, engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, url, read_only=read_only)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def snapshot(self) -> Iterator[RegistrySnapshot]:
        """Several queries answered from one consistent view of the database."""
        engine = self.engine
        if engine.dialect.name == "postgresql":
            # READ COMMITTED would let each statement see newer commits; one snapshot for all.
            engine = engine.execution_options(isolation_level="REPEATABLE READ")
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield RegistrySnapshot(session)

    def status(self, lineage_id: int | None = None) -> StatusInfo:
        with self.snapshot() as view:
            return view.status(lineage_id)

    @contextmanager
    def transaction(self) -> Iterator[RegistryWriter]:
        """One write transaction: commits when the block ends, rolls back if it raises."""
        if self.read_only:
            raise RegistryError("this registry connection is read-only")
        with Session(write_engine(self.engine), expire_on_commit=False) as session, session.begin():
            yield RegistryWriter(session)


class RegistrySnapshot(_Queries):
    """Queries inside one read transaction (see :meth:`Registry.snapshot`)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        yield self.session


# ---------------------------------------------------------------- writer


class RegistryWriter(_Queries):
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
            include={"layer_counts", "modification", "output", "edited_tensors", "entry_masks", "entries"},
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


# ---------------------------------------------------------------- row -> view


def _updated_rows(result: Result[Any]) -> int:
    # A bulk UPDATE through the session returns a CursorResult, which carries the row count.
    return cast(CursorResult[Any], result).rowcount


def _lineage_info(row: Lineage) -> LineageInfo:
    return LineageInfo(
        id=row.id,
        base_fingerprint=row.base_fingerprint,
        aligned_fingerprint=row.aligned_fingerprint,
        finetuned_fingerprint=row.finetuned_fingerprint,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
    )


def _revision_info(s: Session, rev: DimensionRevision, dimension: str) -> RevisionInfo:
    counts = dict(
        s.execute(
            select(RevisionCandidate.outcome, func.count())
            .where(RevisionCandidate.revision_id == rev.id)
            .group_by(RevisionCandidate.outcome)
        ).all()
    )
    active = s.scalar(
        select(func.count())
        .select_from(NeuronClaim)
        .where(NeuronClaim.revision_id == rev.id, NeuronClaim.released_at.is_(None))
    )
    band = None if rev.band_start is None or rev.band_end is None else (rev.band_start, rev.band_end)
    return RevisionInfo(
        id=rev.id,
        dimension=dimension,
        number=rev.number,
        content_fingerprint=rev.content_fingerprint,
        status=RevisionStatus(rev.status),
        created_at=rev.created_at,
        updated_at=rev.updated_at,
        error=rev.error,
        params=rev.params,
        band=band,
        summary=rev.summary,
        selected=counts.get(CandidateOutcome.SELECTED.value, 0),
        skipped=counts.get(CandidateOutcome.SKIPPED.value, 0),
        active_claims=active or 0,
    )


def _version_info(s: Session, row: CheckpointVersion) -> VersionInfo:
    parent = aliased(CheckpointVersion)
    parent_number = (
        None if row.parent_id is None else s.scalar(select(parent.number).where(parent.id == row.parent_id))
    )
    pointer = s.get(CurrentVersion, row.lineage_id)
    names = s.execute(
        select(Dimension.name, DimensionRevision.number)
        .join(DimensionRevision, DimensionRevision.dimension_id == Dimension.id)
        .join(
            VersionRevision,
            and_(VersionRevision.revision_id == DimensionRevision.id, VersionRevision.version_id == row.id),
        )
    ).all()
    return VersionInfo(
        id=row.id,
        number=row.number,
        path=row.path,
        parent_id=row.parent_id,
        parent_number=parent_number,
        created_at=row.created_at,
        current=pointer is not None and pointer.version_id == row.id,
        revisions=sorted(f"{name}#{number}" for name, number in names),
    )


def _job_info(s: Session, job: Job) -> JobInfo:
    name = (
        None
        if job.dimension_id is None
        else s.scalar(select(Dimension.name).where(Dimension.id == job.dimension_id))
    )
    return JobInfo(
        id=job.id,
        lineage_id=job.lineage_id,
        kind=JobKind(job.kind),
        state=JobState(job.state),
        dimension=name,
        dimension_id=job.dimension_id,
        revision_id=job.revision_id,
        attempt=job.attempt,
        created_at=job.created_at,
        updated_at=job.updated_at,
        error=job.error,
        details=job.details,
    )


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
