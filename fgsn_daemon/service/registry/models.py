"""SQLAlchemy 2 typed models of the registry.

Portable on purpose (integers, text, JSON, timestamps): one Alembic tree serves SQLite and
PostgreSQL. Constraint names come from the naming convention, so SQLite batch migrations can
drop or alter them later. Neurons use the column name ``neuron_index`` because ``index`` is
an SQL keyword.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utc_now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("registry timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class RevisionStatus(StrEnum):
    PENDING = "pending"  # discovered, not applied yet
    APPLIED = "applied"  # its selected neurons are claimed and in the current version
    FAILED = "failed"  # bad input or a failed job; ``error`` says why
    SUPERSEDED = "superseded"  # replaced by a newer revision of the same dimension
    ROLLED_BACK = "rolled_back"  # removed by the user; its claims are released


class JobState(StrEnum):
    PENDING = "pending"
    SCORING = "scoring"
    EDITING = "editing"
    PUBLISHING = "publishing"
    DONE = "done"
    FAILED = "failed"
    DISCARDED = "discarded"


class JobKind(StrEnum):
    APPLY = "apply"
    ROLLBACK = "rollback"


class CandidateOutcome(StrEnum):
    SELECTED = "selected"  # moved by this revision (and claimed while it is applied)
    SKIPPED = "skipped"  # already frozen by ``skipped_owner`` when this revision ran
    UNSELECTED = "unselected"  # a candidate the engine neither selected nor skipped


FINAL_JOB_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.DISCARDED})


def _in(values: type[StrEnum]) -> str:
    return ", ".join(f"'{member.value}'" for member in values)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class Lineage(Base):
    """One (base, aligned, fine-tuned) input trio, identified by content fingerprints."""

    __tablename__ = "lineages"
    __table_args__ = (UniqueConstraint("base_fingerprint", "aligned_fingerprint", "finetuned_fingerprint"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    base_fingerprint: Mapped[str] = mapped_column(String(128))
    aligned_fingerprint: Mapped[str] = mapped_column(String(128))
    finetuned_fingerprint: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    last_seen_at: Mapped[datetime] = mapped_column(default=utc_now)


class Dimension(Base):
    __tablename__ = "dimensions"
    __table_args__ = (UniqueConstraint("lineage_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    lineage_id: Mapped[int] = mapped_column(ForeignKey("lineages.id"))
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class DimensionRevision(Base):
    """One content version of a dimension's policy folder, and what applying it did."""

    __tablename__ = "dimension_revisions"
    __table_args__ = (
        UniqueConstraint("dimension_id", "number"),
        CheckConstraint(f"status IN ({_in(RevisionStatus)})", name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    dimension_id: Mapped[int] = mapped_column(ForeignKey("dimensions.id"))
    number: Mapped[int]  # 1, 2, ... within the dimension
    content_fingerprint: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)
    error: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any] | None]  # ApplyParams as JSON
    band_start: Mapped[int | None]
    band_end: Mapped[int | None]
    summary: Mapped[dict[str, Any] | None]  # layer counts, modification ratio, edited tensors, output


class RevisionCandidate(Base):
    """Every candidate neuron of a revision (frozen ones included), so rollback needs no forward pass."""

    __tablename__ = "revision_candidates"

    revision_id: Mapped[int] = mapped_column(ForeignKey("dimension_revisions.id"), primary_key=True)
    layer: Mapped[int] = mapped_column(primary_key=True)
    space: Mapped[str] = mapped_column(String(16), primary_key=True)
    neuron_index: Mapped[int] = mapped_column(primary_key=True)
    harmful_score: Mapped[float]
    benign_score: Mapped[float]
    harmful_rank: Mapped[int]
    outcome: Mapped[str] = mapped_column(
        String(16), CheckConstraint(f"outcome IN ({_in(CandidateOutcome)})", name="outcome")
    )
    skipped_owner: Mapped[str | None] = mapped_column(String(128))  # dimension that owned it


class NeuronClaim(Base):
    """Ownership of a neuron by a revision. ``released_at IS NULL`` means active (frozen)."""

    __tablename__ = "neuron_claims"
    __table_args__ = (
        # At most one active claim per neuron, enforced by the database on both backends.
        Index(
            "uq_neuron_claims_active",
            "lineage_id",
            "layer",
            "space",
            "neuron_index",
            unique=True,
            sqlite_where=text("released_at IS NULL"),
            postgresql_where=text("released_at IS NULL"),
        ),
        Index("ix_neuron_claims_revision_id", "revision_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    lineage_id: Mapped[int] = mapped_column(ForeignKey("lineages.id"))
    layer: Mapped[int]
    space: Mapped[str] = mapped_column(String(16))
    neuron_index: Mapped[int]
    revision_id: Mapped[int] = mapped_column(ForeignKey("dimension_revisions.id"))
    claimed_at: Mapped[datetime] = mapped_column(default=utc_now)
    released_at: Mapped[datetime | None]


class StoredLayerCurve(Base):
    """The per-lineage safety-layer curve and band, cached under a key (e.g. benign prompt hash)."""

    __tablename__ = "layer_curves"
    __table_args__ = (UniqueConstraint("lineage_id", "cache_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    lineage_id: Mapped[int] = mapped_column(ForeignKey("lineages.id"))
    cache_key: Mapped[str] = mapped_column(String(128))
    curve: Mapped[dict[str, Any]]  # LayerCurve as JSON
    band_start: Mapped[int]
    band_end: Mapped[int]
    band_source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class CheckpointVersion(Base):
    __tablename__ = "checkpoint_versions"
    __table_args__ = (UniqueConstraint("lineage_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    lineage_id: Mapped[int] = mapped_column(ForeignKey("lineages.id"))
    number: Mapped[int]  # 1, 2, ... within the lineage
    path: Mapped[str] = mapped_column(Text)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoint_versions.id"))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class VersionRevision(Base):
    """The revisions whose edits a checkpoint version contains."""

    __tablename__ = "version_revisions"

    version_id: Mapped[int] = mapped_column(ForeignKey("checkpoint_versions.id"), primary_key=True)
    revision_id: Mapped[int] = mapped_column(ForeignKey("dimension_revisions.id"), primary_key=True)


class CurrentVersion(Base):
    """Pointer to the current version of a lineage: one row, swapped in the publishing transaction."""

    __tablename__ = "current_versions"

    lineage_id: Mapped[int] = mapped_column(ForeignKey("lineages.id"), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("checkpoint_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"state IN ({_in(JobState)})", name="state"),
        CheckConstraint(f"kind IN ({_in(JobKind)})", name="kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    lineage_id: Mapped[int] = mapped_column(ForeignKey("lineages.id"))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    dimension_id: Mapped[int | None] = mapped_column(ForeignKey("dimensions.id"))
    revision_id: Mapped[int | None] = mapped_column(ForeignKey("dimension_revisions.id"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)
    error: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None]


class Event(Base):
    """Append-only history; database triggers (see the initial migration) refuse UPDATE and DELETE."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(default=utc_now)
    kind: Mapped[str] = mapped_column(String(64))
    lineage_id: Mapped[int | None] = mapped_column(ForeignKey("lineages.id"))
    dimension_name: Mapped[str | None] = mapped_column(String(128))
    revision_id: Mapped[int | None] = mapped_column(ForeignKey("dimension_revisions.id"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    details: Mapped[dict[str, Any] | None]


class DaemonHeartbeat(Base):
    """Single row the daemon refreshes, so ``fgsn status`` can tell whether it is alive."""

    __tablename__ = "daemon_heartbeat"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    pid: Mapped[int]
    hostname: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
