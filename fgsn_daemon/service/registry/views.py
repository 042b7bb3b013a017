"""Read models: what registry queries return (frozen pydantic views of the rows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from fgsn_daemon.core.records import (
    Band,
    LayerCurve,
    NeuronId,
)
from fgsn_daemon.service.registry.models import (
    CandidateOutcome,
    JobKind,
    JobState,
    RevisionStatus,
)


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
