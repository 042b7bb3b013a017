"""The persistent frozen-neuron registry: models, engines and migrations, and the store API."""

from fgsn_daemon.service.registry.db import (
    current_revision,
    head_revision,
    is_unavailable,
    make_engine,
    upgrade_to_head,
)
from fgsn_daemon.service.registry.models import CandidateOutcome, JobKind, JobState, RevisionStatus
from fgsn_daemon.service.registry.queries import StaleRegistryError
from fgsn_daemon.service.registry.store import Registry, RegistrySnapshot
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
from fgsn_daemon.service.registry.writer import JOB_TRANSITIONS, NeuronAlreadyClaimedError, RegistryWriter

__all__ = [
    "JOB_TRANSITIONS",
    "CandidateInfo",
    "CandidateOutcome",
    "ClaimInfo",
    "DimensionDetail",
    "DimensionInfo",
    "EventInfo",
    "HeartbeatInfo",
    "JobInfo",
    "JobKind",
    "JobState",
    "LineageInfo",
    "NeuronAlreadyClaimedError",
    "Registry",
    "RegistrySnapshot",
    "RegistryWriter",
    "RevisionInfo",
    "RevisionStatus",
    "StaleRegistryError",
    "StatusInfo",
    "StoredCurveInfo",
    "VersionInfo",
    "current_revision",
    "head_revision",
    "is_unavailable",
    "make_engine",
    "upgrade_to_head",
]
