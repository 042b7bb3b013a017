"""Registry tests, each on SQLite and on PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC
from pathlib import Path

import pytest
import typer
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from typer.testing import CliRunner

from fgsn_daemon.cli.registry import register
from fgsn_daemon.core.errors import RegistryError
from fgsn_daemon.core.records import (
    ApplyParams,
    ApplyResult,
    Band,
    LayerCount,
    LayerCurve,
    ModificationRatio,
    NeuronId,
    ScoredNeuron,
    SkippedNeuron,
)
from fgsn_daemon.service.registry import (
    CandidateOutcome,
    JobKind,
    JobState,
    NeuronAlreadyClaimedError,
    Registry,
    RevisionStatus,
    current_revision,
    head_revision,
    make_engine,
    upgrade_to_head,
)
from fgsn_daemon.service.registry.models import Base

pytest_plugins = ["conftest_registry"]

REPO = Path(__file__).resolve().parents[1]
TABLES = {
    "lineages",
    "dimensions",
    "dimension_revisions",
    "revision_candidates",
    "neuron_claims",
    "layer_curves",
    "checkpoint_versions",
    "version_revisions",
    "current_versions",
    "jobs",
    "events",
    "daemon_heartbeat",
}


# ---------------------------------------------------------------- helpers


def scored(layer: int, index: int, space: str = "mlp") -> ScoredNeuron:
    return ScoredNeuron(
        layer=layer,
        space=space,
        index=index,
        harmful_score=10.0 - index,
        benign_score=0.5,
        harmful_rank=index,
    )


def apply_result(
    candidates: list[ScoredNeuron], selected: list[ScoredNeuron], skipped: list[SkippedNeuron]
) -> ApplyResult:
    return ApplyResult(
        params=ApplyParams(
            scoring="wanda",
            positions="all",
            operator="safe_lora",
            q=5.0,
            p=5.0,
            spaces=["mlp"],
            score_model="aligned",
            rank=8,
            band_override=None,
        ),
        curve=LayerCurve(benign_benign=[0.9, 0.9], benign_harmful=[0.9, 0.5], gap=[0.0, 0.4]),
        band=Band(start=1, end=1, source="auto"),
        layer_counts=[
            LayerCount(
                layer=1,
                space="mlp",
                total=64,
                harmful_top=len(candidates),
                benign_top=1,
                candidates=len(candidates),
                skipped=len(skipped),
                selected=len(selected),
            )
        ],
        candidates=candidates,
        selected=selected,
        skipped=skipped,
        modification=ModificationRatio(
            modified_parameters=30,
            changed_parameters=29,
            total_parameters=10_000,
            band_parameters=1_000,
            ratio=0.003,
            band_ratio=0.03,
        ),
        output="/state/versions/v0001",
        edited_tensors=["model.layers.1.mlp.down_proj.weight"],
    )


def new_lineage(registry: Registry, suffix: str = "") -> int:
    with registry.transaction() as tx:
        return tx.ensure_lineage(f"base{suffix}", f"aligned{suffix}", f"finetuned{suffix}")


def applied_dimension(registry: Registry, lineage_id: int, name: str, neurons: list[NeuronId]) -> int:
    with registry.transaction() as tx:
        revision_id = tx.add_revision(lineage_id, name, f"fp-{name}")
        tx.claim_neurons(revision_id, neurons)
        assert tx.set_revision_status(revision_id, RevisionStatus.APPLIED, expected=RevisionStatus.PENDING)
    return revision_id


def populated(url: str) -> tuple[Registry, int]:
    """A registry with two applied dimensions (the second skipped one neuron) and two versions."""
    registry = Registry.open(url)
    lineage_id = new_lineage(registry)
    a = [scored(1, i) for i in range(3)]
    b = [scored(1, 2), scored(2, 7)]
    with registry.transaction() as tx:
        rev_a = tx.add_revision(lineage_id, "cybercrime", "fp-a")
        tx.record_revision_result(rev_a, apply_result(a, a, []))
        tx.claim_neurons(rev_a, [n.id for n in a])
        tx.set_revision_status(rev_a, RevisionStatus.APPLIED)
        v1 = tx.add_version(lineage_id, "/state/versions/v0001", [rev_a], parent_id=None)
    with registry.transaction() as tx:
        rev_b = tx.add_revision(lineage_id, "weapons", "fp-b")
        skipped = [SkippedNeuron(layer=1, space="mlp", index=2, owner="cybercrime")]
        tx.record_revision_result(rev_b, apply_result(b, b[1:], skipped))
        tx.claim_neurons(rev_b, [b[1].id])
        tx.set_revision_status(rev_b, RevisionStatus.APPLIED)
        tx.add_version(lineage_id, "/state/versions/v0002", [rev_a, rev_b], parent_id=v1)
        tx.heartbeat(os.getpid(), "testhost")
    return registry, lineage_id


def cli_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Registry commands under test."""

    register(app)
    return app


# ---------------------------------------------------------------- schema and migrations


def test_migrations_create_schema_and_db_current_reports_head(registry_url: str) -> None:
    assert upgrade_to_head(registry_url) == head_revision()
    assert upgrade_to_head(registry_url) == head_revision()  # a second run is a no-op
    engine = make_engine(registry_url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        assert current_revision(engine) == head_revision()
        # The migration and the models agree (what `alembic check` would report).
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    finally:
        engine.dispose()
    result = CliRunner().invoke(cli_app(), ["db", "current", "--json", "--database-url", registry_url])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["current"] == head_revision()
    assert report["at_head"] is True


def test_db_upgrade_command_and_readers_require_head(registry_url: str) -> None:
    with pytest.raises(RegistryError, match="db upgrade"):
        Registry.open(registry_url, read_only=True)
    runner = CliRunner()
    before = runner.invoke(cli_app(), ["db", "current", "--json", "--database-url", registry_url])
    assert before.exit_code == 0, before.output
    assert json.loads(before.output)["current"] is None
    upgraded = runner.invoke(cli_app(), ["db", "upgrade", "--database-url", registry_url])
    assert upgraded.exit_code == 0, upgraded.output
    assert head_revision() in upgraded.output
    password = make_url(registry_url).password
    assert password is None or str(password) not in upgraded.output + before.output
    with Registry.open(registry_url, read_only=True) as reader:
        assert reader.lineages() == []


def test_refuses_a_database_newer_than_the_code(registry_url: str) -> None:
    upgrade_to_head(registry_url)
    engine = make_engine(registry_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    finally:
        engine.dispose()
    with pytest.raises(RegistryError, match="newer than this fgsn-daemon"):
        upgrade_to_head(registry_url)
    with pytest.raises(RegistryError, match="newer than this fgsn-daemon"):
        Registry.open(registry_url, read_only=True)


def test_read_only_registry_refuses_writes(registry_url: str) -> None:
    Registry.open(registry_url).close()
    with Registry.open(registry_url, read_only=True) as reader:
        with pytest.raises(RegistryError, match="read-only"), reader.transaction():
            pass
        with pytest.raises(DBAPIError), reader.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO lineages (base_fingerprint, aligned_fingerprint, "
                    "finetuned_fingerprint, created_at, last_seen_at) "
                    "VALUES ('a', 'b', 'c', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )


# ---------------------------------------------------------------- jobs


def test_job_compare_and_set_transitions(registry_url: str) -> None:
    with Registry.open(registry_url) as registry:
        lineage_id = new_lineage(registry)
        with registry.transaction() as tx:
            revision_id = tx.add_revision(lineage_id, "cybercrime", "fp")
            job_id = tx.create_job(lineage_id, JobKind.APPLY, revision_id=revision_id)
        with registry.transaction() as tx:
            assert tx.transition_job(job_id, JobState.PENDING, JobState.SCORING)
        # Stale: another writer already moved it, so the same transition fails and changes nothing.
        with registry.transaction() as tx:
            assert not tx.transition_job(job_id, JobState.PENDING, JobState.SCORING)
            assert not tx.transition_job(job_id, JobState.EDITING, JobState.PUBLISHING)
        job = registry.job(job_id)
        assert (job.state, job.attempt, job.dimension) == (JobState.SCORING, 1, "cybercrime")
        with pytest.raises(RegistryError, match="not allowed"), registry.transaction() as tx:
            tx.transition_job(job_id, JobState.SCORING, JobState.DONE)
        # Crash recovery: back to pending, then a second attempt runs to the end.
        with registry.transaction() as tx:
            assert tx.transition_job(job_id, JobState.SCORING, JobState.PENDING)
            for before, after in [
                (JobState.PENDING, JobState.SCORING),
                (JobState.SCORING, JobState.EDITING),
                (JobState.EDITING, JobState.PUBLISHING),
                (JobState.PUBLISHING, JobState.DONE),
            ]:
                assert tx.transition_job(job_id, before, after)
        job = registry.job(job_id)
        assert (job.state, job.attempt) == (JobState.DONE, 2)
        assert registry.jobs(lineage_id, unfinished_only=True) == []
        with pytest.raises(RegistryError, match="not allowed"), registry.transaction() as tx:
            tx.transition_job(job_id, JobState.DONE, JobState.FAILED)
        kinds = [e.kind for e in registry.events(lineage_id=lineage_id) if e.job_id == job_id]
        assert kinds == [
            "job.pending",
            "job.scoring",
            "job.pending",
            "job.scoring",
            "job.editing",
            "job.publishing",
            "job.done",
        ]


def test_failed_transition_records_the_error(registry_url: str) -> None:
    with Registry.open(registry_url) as registry:
        lineage_id = new_lineage(registry)
        with registry.transaction() as tx:
            job_id = tx.create_job(lineage_id, JobKind.ROLLBACK, details={"dimension": "x"})
            assert tx.transition_job(job_id, JobState.PENDING, JobState.FAILED, error="model path vanished")
        job = registry.job(job_id)
        assert (job.state, job.error, job.kind) == (JobState.FAILED, "model path vanished", JobKind.ROLLBACK)
        assert registry.events(lineage_id=lineage_id)[-1].details == {
            "from": "pending",
            "attempt": 1,
            "error": "model path vanished",
        }


def test_a_failing_transaction_leaves_nothing_behind(registry_url: str) -> None:
    with Registry.open(registry_url) as registry:
        lineage_id = new_lineage(registry)
        with pytest.raises(RuntimeError), registry.transaction() as tx:
            revision_id = tx.add_revision(lineage_id, "cybercrime", "fp")
            tx.claim_neurons(revision_id, [NeuronId(1, "mlp", 0)])
            raise RuntimeError("crash before commit")
        assert registry.dimensions(lineage_id) == []
        assert registry.frozen_neurons(lineage_id) == {}


# ---------------------------------------------------------------- claims


def test_database_refuses_a_second_active_claim(registry_url: str) -> None:
    with Registry.open(registry_url) as registry:
        lineage_id = new_lineage(registry)
        first = applied_dimension(registry, lineage_id, "cybercrime", [NeuronId(3, "mlp", 5)])
        with registry.transaction() as tx:
            second = tx.add_revision(lineage_id, "weapons", "fp-w")
        # Through the API: a clear error naming the owner.
        with pytest.raises(NeuronAlreadyClaimedError, match="cybercrime"), registry.transaction() as tx:
            tx.claim_neurons(second, [NeuronId(3, "mlp", 4), NeuronId(3, "mlp", 5)])
        assert registry.frozen_neurons(lineage_id) == {NeuronId(3, "mlp", 5): "cybercrime"}
        # Bypassing the API: the partial unique index refuses it.
        insert = text(
            "INSERT INTO neuron_claims (lineage_id, layer, space, neuron_index, revision_id, claimed_at) "
            "VALUES (:lineage, 3, 'mlp', 5, :revision, CURRENT_TIMESTAMP)"
        )
        with pytest.raises(IntegrityError), registry.engine.begin() as connection:
            connection.execute(insert, {"lineage": lineage_id, "revision": second})
        # The same neuron in another space, layer or lineage is a different neuron.
        other_lineage = new_lineage(registry, "-2")
        with registry.transaction() as tx:
            assert tx.claim_neurons(second, [NeuronId(3, "attn", 5), NeuronId(4, "mlp", 5)]) == 2
            other = tx.add_revision(other_lineage, "cybercrime", "fp")
            assert tx.claim_neurons(other, [NeuronId(3, "mlp", 5)]) == 1
        assert registry.frozen_neurons(lineage_id)[NeuronId(3, "mlp", 5)] == "cybercrime"
        assert first != second


def test_release_then_reclaim(registry_url: str) -> None:
    with Registry.open(registry_url) as registry:
        lineage_id = new_lineage(registry)
        owned = [NeuronId(2, "mlp", i) for i in (4, 1, 9)]
        first = applied_dimension(registry, lineage_id, "cybercrime", owned)
        with registry.transaction() as tx:
            second = tx.add_revision(lineage_id, "weapons", "fp-w")
        with registry.transaction() as tx:
            assert tx.release_claims(first) == sorted(owned)
            assert tx.release_claims(first) == []  # nothing active is left to release
            assert tx.set_revision_status(first, RevisionStatus.ROLLED_BACK, expected=RevisionStatus.APPLIED)
            assert tx.claim_neurons(second, owned[:2]) == 2
        assert registry.frozen_neurons(lineage_id) == {n: "weapons" for n in owned[:2]}
        history = registry.neurons(lineage_id, include_released=True, layer=2)
        assert [(c.index, c.dimension, c.released_at is None) for c in history] == [
            (1, "cybercrime", False),
            (1, "weapons", True),
            (4, "cybercrime", False),
            (4, "weapons", True),
            (9, "cybercrime", False),
        ]
        # The rolled-back dimension can claim again once the neurons are free.
        with registry.transaction() as tx:
            assert tx.claim_neurons(first, [owned[2]]) == 1
        assert registry.frozen_neurons(lineage_id)[owned[2]] == "cybercrime"


def test_frozen_neurons_and_neuron_queries(registry_url: str) -> None:
    with Registry.open(registry_url) as registry:
        lineage_id = new_lineage(registry)
        other = new_lineage(registry, "-other")
        applied_dimension(registry, lineage_id, "cybercrime", [NeuronId(1, "mlp", 0), NeuronId(2, "mlp", 3)])
        applied_dimension(registry, lineage_id, "weapons", [NeuronId(2, "attn", 3)])
        applied_dimension(registry, other, "cybercrime", [NeuronId(9, "mlp", 9)])
        assert registry.frozen_neurons(lineage_id) == {
            NeuronId(1, "mlp", 0): "cybercrime",
            NeuronId(2, "mlp", 3): "cybercrime",
            NeuronId(2, "attn", 3): "weapons",
        }
        assert registry.frozen_neurons(other) == {NeuronId(9, "mlp", 9): "cybercrime"}
        by_layer = registry.neurons(lineage_id, layer=2)
        assert [(c.space, c.index, c.dimension) for c in by_layer] == [
            ("attn", 3, "weapons"),
            ("mlp", 3, "cybercrime"),
        ]
        assert [c.index for c in registry.neurons(lineage_id, dimension="weapons")] == [3]
        assert registry.default_lineage_id() == other  # ensured last


def test_record_revision_result_keeps_candidates_for_rollback(registry_url: str) -> None:
    registry, lineage_id = populated(registry_url)
    with registry:
        weapons = registry.dimension(lineage_id, "weapons")
        assert weapons is not None
        (revision,) = weapons.revisions
        assert (revision.selected, revision.skipped, revision.active_claims) == (1, 1, 1)
        assert revision.band == (1, 1)
        assert revision.params is not None and revision.params["operator"] == "safe_lora"
        assert revision.summary is not None and revision.summary["modification"]["modified_parameters"] == 30
        skipped = registry.revision_candidates(revision.id, CandidateOutcome.SKIPPED)
        assert [(c.neuron, c.skipped_owner) for c in skipped] == [(NeuronId(1, "mlp", 2), "cybercrime")]
        everything = registry.revision_candidates(revision.id)
        assert [(c.layer, c.index, c.outcome) for c in everything] == [
            (1, 2, CandidateOutcome.SKIPPED),
            (2, 7, CandidateOutcome.SELECTED),
        ]
        with pytest.raises(RegistryError, match="not candidates"), registry.transaction() as tx:
            tx.record_candidates(revision.id, [scored(1, 0)], [scored(5, 5)], [])


def test_rollback_bookkeeping_hands_skipped_neurons_to_later_dimensions(registry_url: str) -> None:
    registry, lineage_id = populated(registry_url)
    with registry:
        rev_a, rev_b = (r.id for r in registry.revisions(lineage_id))
        with registry.transaction() as tx:
            tx.release_claims(rev_a)
            tx.set_revision_status(rev_a, RevisionStatus.ROLLED_BACK, expected=RevisionStatus.APPLIED)
            freed = [
                c.neuron
                for c in tx.revision_candidates(rev_b, CandidateOutcome.SKIPPED)
                if c.skipped_owner == "cybercrime"
            ]
            assert freed == [NeuronId(1, "mlp", 2)]
            assert tx.claim_neurons(rev_b, freed) == 1
            assert tx.set_candidate_outcomes(rev_b, freed, CandidateOutcome.SELECTED) == 1
        assert registry.frozen_neurons(lineage_id) == {
            NeuronId(1, "mlp", 2): "weapons",
            NeuronId(2, "mlp", 7): "weapons",
        }
        weapons = registry.revision(rev_b)
        assert (weapons.selected, weapons.skipped, weapons.active_claims) == (2, 0, 2)
        assert [r.dimension for r in registry.revisions(lineage_id, status=RevisionStatus.APPLIED)] == [
            "weapons"
        ]
        with pytest.raises(RegistryError, match="skipped_owner"), registry.transaction() as tx:
            tx.set_candidate_outcomes(rev_b, freed, CandidateOutcome.SKIPPED)


def test_snapshot_reads_are_consistent(registry_url: str) -> None:
    registry, lineage_id = populated(registry_url)
    with registry, Registry.open(registry_url, read_only=True) as reader:
        with reader.snapshot() as view:
            assert len(view.frozen_neurons(lineage_id)) == 4
            with registry.transaction() as tx:  # a commit by the daemon in the middle of a query
                revision_id = tx.add_revision(lineage_id, "privacy", "fp-p")
                tx.claim_neurons(revision_id, [NeuronId(7, "mlp", 7)])
            assert len(view.frozen_neurons(lineage_id)) == 4
            assert [d.name for d in view.dimensions(lineage_id)] == ["cybercrime", "weapons"]
        assert len(reader.frozen_neurons(lineage_id)) == 5


def test_layer_curve_cache(registry_url: str) -> None:
    with Registry.open(registry_url) as registry:
        lineage_id = new_lineage(registry)
        assert registry.layer_curve(lineage_id) is None
        curve = LayerCurve(benign_benign=[1.0, 0.9], benign_harmful=[1.0, 0.4], gap=[0.0, 0.5])
        with registry.transaction() as tx:
            tx.save_layer_curve(
                lineage_id, curve, Band(start=1, end=1, source="auto"), cache_key="benign:abc"
            )
            tx.save_layer_curve(
                lineage_id, curve, Band(start=0, end=1, source="override"), cache_key="benign:abc"
            )
        stored = registry.layer_curve(lineage_id, "benign:abc")
        assert stored is not None
        assert stored.curve == curve
        assert stored.band == Band(start=0, end=1, source="override")
        assert stored.created_at.tzinfo == UTC


# ---------------------------------------------------------------- history and versions


def test_events_are_append_only_and_ordered(registry_url: str) -> None:
    with Registry.open(registry_url) as registry:
        lineage_id = new_lineage(registry)
        with registry.transaction() as tx:
            for i in range(5):
                tx.append_event("test.tick", lineage_id=lineage_id, details={"i": i})
        ticks = [e for e in registry.events(lineage_id=lineage_id) if e.kind == "test.tick"]
        assert [e.details for e in ticks] == [{"i": i} for i in range(5)]
        assert [e.id for e in ticks] == sorted(e.id for e in ticks)
        assert all(a.occurred_at <= b.occurred_at for a, b in itertools.pairwise(ticks))
        newest = registry.events(lineage_id=lineage_id, limit=2)
        assert [e.details for e in newest] == [{"i": 3}, {"i": 4}]
        assert [e.details for e in registry.events(after_id=ticks[2].id)] == [{"i": 3}, {"i": 4}]
        for statement in ("UPDATE events SET kind = 'rewritten'", "DELETE FROM events"):
            with pytest.raises(DBAPIError, match="append-only"), registry.engine.begin() as connection:
                connection.execute(text(statement))
        assert len(registry.events(lineage_id=lineage_id)) == len(ticks) + 1  # plus lineage.created


def test_versions_and_current_pointer(registry_url: str) -> None:
    registry, lineage_id = populated(registry_url)
    with registry:
        v1, v2 = registry.versions(lineage_id)
        assert (v1.number, v1.parent_number, v1.current, v1.revisions) == (1, None, False, ["cybercrime#1"])
        assert (v2.number, v2.parent_number, v2.current) == (2, 1, True)
        assert v2.revisions == ["cybercrime#1", "weapons#1"]
        current = registry.current_version(lineage_id)
        assert current is not None and current.path == "/state/versions/v0002"
        with registry.transaction() as tx:
            tx.set_current_version(lineage_id, v1.id)
        assert [v.current for v in registry.versions(lineage_id)] == [True, False]
        other = new_lineage(registry, "-other")
        with pytest.raises(RegistryError, match="does not belong"), registry.transaction() as tx:
            tx.set_current_version(other, v2.id)
        assert registry.versions(other) == []


def test_timestamps_are_utc(registry_url: str) -> None:
    registry, lineage_id = populated(registry_url)
    with registry:
        info = registry.status(lineage_id)
        assert info.lineage is not None and info.lineage.created_at.tzinfo == UTC
        assert info.heartbeat is not None and info.heartbeat.heartbeat_at.tzinfo == UTC
        assert all(e.occurred_at.tzinfo == UTC for e in registry.events())


# ---------------------------------------------------------------- CLI


def test_cli_queries_in_process(registry_url: str) -> None:
    populated(registry_url)[0].close()
    runner = CliRunner()
    app = cli_app()

    def run_json(*args: str) -> object:
        result = runner.invoke(app, [*args, "--json", "--database-url", registry_url])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    status = run_json("status")
    assert isinstance(status, dict)
    assert status["frozen_neurons"] == 4
    assert status["current_version"]["number"] == 2
    assert status["dimensions_by_status"] == {"applied": 2}
    assert status["heartbeat"]["hostname"] == "testhost"
    assert status["schema_revision"] == head_revision()
    dims = run_json("dimensions")
    assert isinstance(dims, list)
    assert [(d["name"], d["latest"]["status"]) for d in dims] == [
        ("cybercrime", "applied"),
        ("weapons", "applied"),
    ]
    one = run_json("dimensions", "weapons")
    assert isinstance(one, dict) and one["revisions"][0]["skipped"] == 1
    neurons = run_json("neurons", "--dimension", "cybercrime", "--layer", "1")
    assert isinstance(neurons, list)
    assert [(n["layer"], n["index"]) for n in neurons] == [(1, 0), (1, 1), (1, 2)]
    history = run_json("history", "--limit", "3")
    assert isinstance(history, list) and [e["kind"] for e in history][-1] == "version.current"
    versions = run_json("versions")
    assert isinstance(versions, list) and [v["current"] for v in versions] == [False, True]

    table = runner.invoke(app, ["neurons", "--layer", "2", "--database-url", registry_url])
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[1].split()[:5] == ["2", "mlp", "7", "weapons", "1"]
    missing = runner.invoke(app, ["dimensions", "nope", "--database-url", registry_url])
    assert missing.exit_code == 2
    assert "no dimension named 'nope'" in missing.output


SUBPROCESS_APP = (
    "import typer\nfrom fgsn_daemon.cli.registry import register\napp = typer.Typer()\nregister(app)\napp()\n"
)


def run_cli_subprocess(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", SUBPROCESS_APP, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        check=False,
    )


def test_cli_queries_in_a_subprocess(registry_url: str) -> None:
    populated(registry_url)[0].close()
    result = run_cli_subprocess("versions", "--json", "--database-url", registry_url)
    assert result.returncode == 0, result.stderr
    assert [v["path"] for v in json.loads(result.stdout)] == [
        "/state/versions/v0001",
        "/state/versions/v0002",
    ]
    status = run_cli_subprocess("status", "--database-url", registry_url)
    assert status.returncode == 0, status.stderr
    assert "frozen neurons:  4" in status.stdout
    assert "pid" in status.stdout and "testhost" in status.stdout


def test_readers_are_not_blocked_by_an_open_write_transaction(registry_url: str) -> None:
    """WAL on SQLite, MVCC on PostgreSQL: queries answer from the last commit while the daemon writes."""
    registry, lineage_id = populated(registry_url)
    with registry:
        holding = threading.Event()
        release = threading.Event()
        failure: list[BaseException] = []

        def writer() -> None:
            try:
                with registry.transaction() as tx:  # BEGIN IMMEDIATE on SQLite: the write lock is held
                    revision_id = tx.add_revision(lineage_id, "privacy", "fp-p")
                    tx.claim_neurons(revision_id, [NeuronId(5, "mlp", 1)])
                    holding.set()
                    release.wait(timeout=60)
            except BaseException as exc:
                failure.append(exc)
                holding.set()

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            assert holding.wait(timeout=30) and not failure
            started = time.monotonic()
            with Registry.open(registry_url, read_only=True) as reader:
                assert len(reader.frozen_neurons(lineage_id)) == 4  # the uncommitted claim is invisible
                assert [d.name for d in reader.dimensions(lineage_id)] == ["cybercrime", "weapons"]
            in_process = time.monotonic() - started
            result = run_cli_subprocess("neurons", "--json", "--database-url", registry_url)
            assert result.returncode == 0, result.stderr
            assert len(json.loads(result.stdout)) == 4
            # The busy timeout is 10 s: a blocked reader would have waited for it.
            assert in_process < 5, f"reader took {in_process:.1f}s"
            assert thread.is_alive()  # the write transaction was open the whole time
        finally:
            release.set()
            thread.join(timeout=60)
        assert not failure
        with Registry.open(registry_url, read_only=True) as reader:
            assert reader.frozen_neurons(lineage_id)[NeuronId(5, "mlp", 1)] == "privacy"


def test_sqlite_registry_uses_wal(sqlite_registry_url: str) -> None:
    Registry.open(sqlite_registry_url).close()
    engine = create_engine(sqlite_registry_url)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


def test_cli_reports_a_missing_sqlite_registry(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'absent.db'}"
    result = CliRunner().invoke(cli_app(), ["status", "--database-url", url])
    assert result.exit_code == 2
    assert "no registry database" in result.output
    assert not (tmp_path / "absent.db").exists()  # a query never creates the database


def grow(registry: Registry, lineage_id: int, start: int, count: int) -> None:
    """``count`` more dimensions, each with two revisions (one applied with a claim and a
    candidate), a version and a job."""
    parent = registry.current_version(lineage_id)
    parent_id = None if parent is None else parent.id
    for k in range(start, start + count):
        name = f"dim{k:03d}"
        neuron = scored(3, k)
        with registry.transaction() as tx:
            old = tx.add_revision(lineage_id, name, f"fp-{name}-1")
            tx.set_revision_status(old, RevisionStatus.SUPERSEDED)
            rev = tx.add_revision(lineage_id, name, f"fp-{name}-2")
            tx.record_revision_result(rev, apply_result([neuron], [neuron], []))
            tx.claim_neurons(rev, [neuron.id])
            tx.set_revision_status(rev, RevisionStatus.APPLIED)
            parent_id = tx.add_version(lineage_id, f"/state/versions/{name}", [rev], parent_id=parent_id)
            tx.create_job(lineage_id, JobKind.APPLY, revision_id=rev)


def test_list_queries_cost_the_same_number_of_statements_for_3_or_30_rows(registry_url: str) -> None:
    """No query per row: listing revisions, dimensions, versions and jobs, and the status view,
    issue as many statements for 30 dimensions as for 3."""
    from sqlalchemy import event

    registry = Registry.open(registry_url)
    with registry:
        lineage_id = new_lineage(registry)
        statements: list[str] = []

        def count(*args: object) -> None:
            statements.append(str(args[2]))

        event.listen(registry.engine, "before_cursor_execute", count)

        def cost() -> dict[str, int]:
            out = {}
            for label, query in {
                "revisions": lambda: registry.revisions(lineage_id),
                "dimensions": lambda: registry.dimensions(lineage_id),
                "dimension": lambda: registry.dimension(lineage_id, "dim000"),
                "versions": lambda: registry.versions(lineage_id),
                "jobs": lambda: registry.jobs(lineage_id),
                "status": lambda: registry.status(lineage_id),
            }.items():
                statements.clear()
                query()
                out[label] = len(statements)
            return out

        grow(registry, lineage_id, 0, 3)
        small = cost()
        assert len(registry.revisions(lineage_id)) == 6
        grow(registry, lineage_id, 3, 27)
        large = cost()
        event.remove(registry.engine, "before_cursor_execute", count)
        assert large == small
        # and the views still carry the per-row facts the batched queries gathered
        dims = registry.dimensions(lineage_id)
        assert len(dims) == 30
        assert all(d.latest is not None and d.latest.number == 2 for d in dims)
        assert all(
            d.latest is not None and (d.latest.selected, d.latest.active_claims) == (1, 1) for d in dims
        )
        versions = registry.versions(lineage_id)
        assert [v.parent_number for v in versions] == [None, *range(1, 30)]
        assert [v.current for v in versions] == [False] * 29 + [True]
        assert versions[7].revisions == ["dim007#2"]
        assert {j.dimension for j in registry.jobs(lineage_id)} == {f"dim{k:03d}" for k in range(30)}
