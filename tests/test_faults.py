"""A real daemon subprocess killed at every named fault point, one after another in one state
folder, with the invariants checked after each kill and the end state compared bit for bit with an
uninterrupted run (see ``fgsn_daemon.service.reliability``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import make_trio

from fgsn_daemon.core.faults import POINTS, fault_point
from fgsn_daemon.service.reliability import Campaign

PACKAGE = Path(__file__).resolve().parents[1] / "fgsn_daemon"

# Stage 2 (add c, change a) walks one job through every step; each kill restarts the daemon, so
# the recovery points fire at the next start, and the publish points fire in recovery's relink of
# `current` after the kill at after_commit; stage 3's rollback is killed once it has started.
PLAN: list[list[str]] = [
    [],
    [
        "scan_revision_recorded",
        "job_scoring_started",
        "after_scoring",
        "job_result_recorded",
        "before_build",
        "staging_created",
        "shard_half_written",
        "recover_staging_cleaned",
        "recover_orphans_removed",
        "recover_jobs_requeued",
        "shard_written_unsynced",
        "shard_linked",
        "index_written",
        "staging_complete",
        "manifest_written",
        "version_renamed",
        "after_build",
        "claims_synced_uncommitted",
        "after_commit",
        "publish_link_staged",
        "publish_swapped",
        "after_publish",
    ],
    ["rollback_started", "before_build"],
]


def test_every_declared_point_is_in_the_plan_and_every_call_is_declared() -> None:
    planned = {p for stage in PLAN for p in stage}
    assert set(POINTS) == planned, "a new fault point needs a place in PLAN"
    called = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "fault_point":
                assert isinstance(node.args[0], ast.Constant), f"{path}: fault point names are literals"
                called.add(node.args[0].value)
    assert called == set(POINTS)
    assert len(POINTS) >= 20
    with pytest.raises(ValueError, match="undeclared"):
        fault_point("no_such_point")


@pytest.mark.slow
def test_kill_at_every_named_point_keeps_the_invariants(tmp_path: Path) -> None:
    trio = make_trio(tmp_path / "trio", "llama")
    campaign = Campaign(tmp_path, trio)
    report = campaign.run_points(PLAN)
    assert not report.problems, report.problems
    assert [k.phase for k in report.kills] == [p for stage in PLAN for p in stage]
    failed = {k.phase: k.problems for k in report.kills if k.problems}
    assert not failed, failed
