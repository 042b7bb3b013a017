"""Rolling a dimension back on the user's request: the plan (no side effects) and the request
itself, run here when no daemon holds the state folder, handed to the running daemon otherwise.

The daemon does the work (``Daemon.run_rollback``, one job); this module is the bookkeeping the
CLI used to carry: which revision goes, which later dimensions take over its neurons, which job to
run or wait for.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from fgsn_daemon.core.errors import FGSNError
from fgsn_daemon.service.registry.models import FINAL_JOB_STATES, JobKind, JobState

if TYPE_CHECKING:
    from fgsn_daemon.service.daemon import Daemon


class RollbackPlan(BaseModel):
    """What rolling ``dimension`` back would change."""

    model_config = ConfigDict(frozen=True)

    dimension: str
    revision: int
    released: int  # neurons that return to their fine-tuned values
    taken_over_by: dict[str, int]  # later dimension -> neurons it takes over
    frozen_after: int


class RollbackDone(BaseModel):
    model_config = ConfigDict(frozen=True)

    dimension: str
    job: int
    current_version: int | None  # None when a running daemon did the work (it reports its own)
    queued: bool  # handed to a running daemon


def attach_default_lineage(daemon: Daemon) -> None:
    """Point ``daemon`` at the lineage the state folder's daemon used last."""
    lineage = daemon.open_registry().default_lineage_id()
    if lineage is None:
        raise FGSNError(f"no daemon has run on {daemon.settings.state_dir} yet: nothing to roll back")
    daemon.lineage_id = int(lineage)


def plan(daemon: Daemon, dimension: str) -> RollbackPlan:
    target, remaining, before, after = daemon.plan_rollback(dimension)
    reg = daemon.open_registry()
    gains = {
        reg.revision(r).dimension: len(set(after[r]) - set(before[r]))
        for r in remaining
        if set(after[r]) != set(before[r])
    }
    return RollbackPlan(
        dimension=dimension,
        revision=target,
        released=len(before[target]),
        taken_over_by=gains,
        frozen_after=sum(len(v) for v in after.values()),
    )


def queue(daemon: Daemon, dimension: str) -> int:
    """Hand the rollback to the running daemon (the single writer of versions): its job id."""
    daemon.plan_rollback(dimension)  # fail now on an unknown dimension
    with daemon.open_registry().transaction() as tx:
        return tx.create_job(daemon.lineage_id, JobKind.ROLLBACK, details={"dimension": dimension})


def wait_for(daemon: Daemon, dimension: str, job: int, wait_s: float, poll_s: float = 0.5) -> RollbackDone:
    """Wait up to ``wait_s`` for the running daemon to finish the queued rollback ``job``."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and daemon.open_registry().job(job).state not in FINAL_JOB_STATES:
        time.sleep(poll_s)
    info = daemon.open_registry().job(job)
    if info.state != JobState.DONE:
        raise FGSNError(f"rollback job {job} is {info.state}: {info.error or 'still running'}")
    return RollbackDone(dimension=dimension, job=job, current_version=None, queued=True)


def run_here(daemon: Daemon, dimension: str) -> RollbackDone:
    """Run the rollback in this process; ``daemon`` holds the state folder's lock."""
    daemon.start()
    reg = daemon.open_registry()
    # a rollback of this dimension interrupted earlier (requeued by start) is resumed, not doubled
    waiting = [
        j.id
        for j in reg.jobs(daemon.lineage_id, unfinished_only=True)
        if j.kind == JobKind.ROLLBACK and (j.details or {}).get("dimension") == dimension
    ]
    if waiting:
        job = waiting[0]
    else:
        with reg.transaction() as tx:
            job = tx.create_job(daemon.lineage_id, JobKind.ROLLBACK, details={"dimension": dimension})
    daemon.run_job(reg.job(job))
    info = daemon.open_registry().job(job)
    if info.state != JobState.DONE:
        raise FGSNError(info.error or f"rollback job ended {info.state}")
    current = daemon.open_registry().current_version(daemon.lineage_id)
    return RollbackDone(
        dimension=dimension, job=job, current_version=current.number if current else None, queued=False
    )
