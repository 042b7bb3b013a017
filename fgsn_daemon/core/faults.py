"""Named crash points: ``FGSN_FAULT=<point>`` (or ``<point>@<n>`` for its n-th pass) makes the
process SIGKILL itself there, exactly as an outside ``kill -9`` would, so tests can stop a job at
every step between its first registry write and the ``current`` swap deterministically.
``FGSN_PAUSE=<point>[@<n>]:<seconds>`` sleeps there instead, so a test can take a resource away
(stop the database) at a known step of a running job.

Every point is declared here with what is true of the disk and the registry when it fires; a call
with an undeclared name is a programming error, and ``tests/test_faults.py`` kills the daemon at
each declared point and checks the invariants afterwards."""

from __future__ import annotations

import os
import signal
import sys
import time

FAULT_ENV = "FGSN_FAULT"
PAUSE_ENV = "FGSN_PAUSE"

POINTS: dict[str, str] = {
    # start-up recovery (runs on every start)
    "recover_staging_cleaned": "recovery removed half-written staging folders; orphans not yet removed",
    "recover_orphans_removed": "recovery removed version folders the registry does not know",
    "recover_jobs_requeued": "recovery moved interrupted jobs back to pending (committed)",
    # scanning
    "scan_revision_recorded": "a new revision and its pending job are committed",
    # an apply or rollback job
    "job_scoring_started": "the job moved pending → scoring (committed)",
    "after_scoring": "the dimension is scored; nothing about it is recorded yet",
    "job_result_recorded": "candidates recorded, job moved scoring → editing (committed)",
    "rollback_started": "a rollback job moved to editing (committed)",
    # building a version (checkpoint writer, versions)
    "before_build": "claims computed; no staging folder yet",
    "staging_created": "an empty staging folder exists",
    "shard_half_written": "a shard file holds its header and first tensor only",
    "shard_written_unsynced": "a shard is fully written but not fsynced",
    "shard_linked": "an unchanged shard was hard-linked from the parent version",
    "index_written": "the safetensors index is written; configs not yet copied",
    "staging_complete": "every file of the staging folder is written and the folder fsynced",
    "manifest_written": "the sha256 manifest is written inside staging; not yet renamed",
    "version_renamed": "staging renamed to its version name; directory not yet fsynced",
    "after_build": "the version folder is complete; the registry does not know it",
    # committing and publishing
    "claims_synced_uncommitted": "claims, version row and job outcome written, transaction open",
    "after_commit": "the version is committed in the registry; `current` still points at the old one",
    "publish_link_staged": "a temporary link to the new version exists beside `current`",
    "publish_swapped": "`current` points at the new version; directory not yet fsynced",
    "after_publish": "the job is finished and published",
}


_passes: dict[tuple[str, str], int] = {}


def _armed(env: str) -> tuple[str, int, float] | None:
    spec = os.environ.get(env)
    if not spec:
        return None
    spec, _, seconds = spec.partition(":") if env == PAUSE_ENV else (spec, "", "0")
    name, _, nth = spec.partition("@")
    return name, int(nth) if nth else 1, float(seconds or 0)


def fault_point(name: str) -> None:
    """SIGKILL this process here when ``FGSN_FAULT`` names this point (on its n-th pass), or sleep
    when ``FGSN_PAUSE`` does."""
    if name not in POINTS:
        raise ValueError(f"undeclared fault point {name!r}")
    for env in (FAULT_ENV, PAUSE_ENV):
        armed = _armed(env)
        if armed is None or armed[0] != name:
            continue
        _passes[env, name] = _passes.get((env, name), 0) + 1
        if _passes[env, name] != armed[1]:
            continue
        if env == PAUSE_ENV:
            sys.stderr.write(f"fgsn pause point {name} reached: sleeping {armed[2]:g} s\n")
            sys.stderr.flush()
            time.sleep(armed[2])
        else:
            sys.stderr.write(f"fgsn fault point {name} reached: SIGKILL\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
