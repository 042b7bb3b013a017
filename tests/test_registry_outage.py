"""Registry faults under a real daemon subprocess: a private PostgreSQL server stopped in the middle
of a job (between the version build and its commit) and started again; a SQLite registry held by a
long reader and write-locked by another process past its busy timeout. The daemon waits with
backoff, publishes nothing the registry has not committed, and ends bit-identical to a run that
never lost its registry."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest_registry import REQUIRE_POSTGRES_ENV
from helpers import make_trio
from test_daemon import current_tensors, fgsn, running_daemon, wait_for, write_config, write_dimension

from fgsn_daemon.service.registry import Registry

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["hack wifi", "phish bank account", "steal bank account money", "hack bank account"]


@pytest.fixture(scope="module")
def trio_and_expected(tmp_path_factory) -> tuple[dict[str, Path], dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("outage")
    trio = make_trio(root / "trio", "llama")
    policy = root / "policies"
    policy.mkdir()
    write_dimension(policy, "a_cyber", PROMPTS)
    cfg = write_config(root, trio, policy, root / "reference")
    done = fgsn("run", "--once", "--config", str(cfg))
    assert done.returncode == 0, done.stderr
    return trio, current_tensors(root / "reference")


def _pg_ctl() -> str | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True):
        return str(candidate)
    return shutil.which("pg_ctl")


class PrivatePostgres:
    """A throwaway server of our own (the shared CI server must not be stopped)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fgsn-pg-outage-"))
        self.folder.chmod(0o755)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.env = {**os.environ, "FGSN_PG_DIR": str(self.folder), "FGSN_PG_PORT": str(self.port)}
        self.url = ""

    def start(self) -> None:
        done = subprocess.run(
            ["bash", str(REPO / ".ci" / "start_postgres.sh")], env=self.env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        self.url = done.stdout.strip().split("=", 1)[1].strip("'\"")

    def stop(self) -> None:
        pg_ctl = _pg_ctl()
        assert pg_ctl is not None
        argv = [pg_ctl, "-D", str(self.folder / "data"), "stop", "-m", "fast"]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True)

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, AssertionError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"cannot start a private PostgreSQL server: {exc}")
        pytest.skip(f"cannot start a private PostgreSQL server here: {exc}")
    try:
        yield server
    finally:
        server.remove()


def applied(url: str) -> bool:
    with Registry.open(url, read_only=True) as reg:
        lineage = reg.default_lineage_id()
        detail = reg.dimension(lineage, "a_cyber") if lineage else None
        return bool(detail and detail.revisions and detail.revisions[-1].status.value == "applied")


def version_folders(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "lineage-1" / "versions").iterdir())


def test_postgres_stopped_mid_job_then_restarted(tmp_path, trio_and_expected, private_postgres):
    trio, expected = trio_and_expected
    pg = private_postgres
    policy, state, log = tmp_path / "policies", tmp_path / "state", tmp_path / "daemon.log"
    policy.mkdir()
    cfg = write_config(tmp_path, trio, policy, state, pg.url)
    # the 2nd build is the dimension's version: pause after it, before the registry records it
    with running_daemon(cfg, log, {"FGSN_PAUSE": "after_build@2:8"}) as daemon:
        wait_for(lambda: (state / "current").exists(), what="the initial version")
        initial = current_tensors(state)
        write_dimension(policy, "a_cyber", PROMPTS)
        wait_for(lambda: "pause point after_build reached" in log.read_text(), what="the pause")
        pg.stop()
        wait_for(lambda: log.read_text().count("registry unreachable") >= 2, what="retries with backoff")
        # built but not committed: never published
        assert version_folders(state) == ["v0001", "v0002"]
        assert (state / "current").resolve().name == "v0001"
        now = current_tensors(state)
        assert all(torch.equal(now[k], initial[k]) for k in now)
        assert daemon.poll() is None  # waiting, not dead
        pg.start()
        wait_for(lambda: applied(pg.url), what="a_cyber applied after the restart")
    final = current_tensors(state)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert version_folders(state) == ["v0001", "v0002"]  # the uncommitted one was rebuilt, not kept twice
    with Registry.open(pg.url, read_only=True) as reg:
        lineage = reg.default_lineage_id()
        kinds = [e.kind for e in reg.events(lineage_id=lineage)]
        jobs = reg.jobs(lineage)
    assert "daemon.registry_reconnected" in kinds and "daemon.recovered" in kinds
    assert [(j.kind.value, j.state.value) for j in jobs] == [("apply", "done")]


def test_sqlite_long_reader_and_a_write_lock_past_the_busy_timeout(tmp_path, trio_and_expected):
    trio, expected = trio_and_expected
    policy, state, log = tmp_path / "policies", tmp_path / "state", tmp_path / "daemon.log"
    policy.mkdir()
    cfg = write_config(tmp_path, trio, policy, state)
    url = f"sqlite:///{state / 'registry.db'}"
    with running_daemon(cfg, log) as daemon:
        wait_for(lambda: (state / "current").exists(), what="the initial version")
        reader = sqlite3.connect(state / "registry.db", isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()  # a read transaction held open
        writer = sqlite3.connect(state / "registry.db", isolation_level=None, timeout=30)
        writer.execute("BEGIN IMMEDIATE")  # another process's write lock, held past the busy timeout
        write_dimension(policy, "a_cyber", PROMPTS)
        wait_for(lambda: "registry unreachable" in log.read_text(), timeout=120, what="the lock noticed")
        assert "database is locked" in log.read_text()
        assert daemon.poll() is None
        writer.execute("ROLLBACK")
        writer.close()
        wait_for(lambda: applied(url), what="a_cyber applied once the lock is gone")
        reader.execute("SELECT count(*) FROM events").fetchone()  # the reader was never in the way
        reader.execute("COMMIT")
        reader.close()
    final = current_tensors(state)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    with Registry.open(url, read_only=True) as reg:
        kinds = [e.kind for e in reg.events(lineage_id=reg.default_lineage_id())]
    assert "daemon.registry_reconnected" in kinds


def test_a_registry_from_another_state_folder_or_lineage_is_refused(tmp_path, trio_and_expected):
    trio, _ = trio_and_expected
    policy = tmp_path / "policies"
    policy.mkdir()
    write_dimension(policy, "a_cyber", PROMPTS)
    cfg = write_config(tmp_path, trio, policy, tmp_path / "state")
    assert fgsn("run", "--once", "--config", str(cfg)).returncode == 0
    state = tmp_path / "state"
    kept = version_folders(state)
    marker = (state / "lineage-1" / "LINEAGE.json").read_text()

    # A new, empty database with the old state folder: starting would delete its versions.
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    refused = fgsn("run", "--once", "--config", str(cfg), "--database-url", fresh)
    assert refused.returncode == 2
    assert "was written with another registry" in refused.stderr and "has no such lineage" in refused.stderr
    assert version_folders(state) == kept
    with Registry.open(fresh, read_only=True) as reg:
        assert reg.lineages() == []  # refused before anything was written

    # The state folder's own registry, used with another state folder.
    other = write_config(
        tmp_path, trio, policy, tmp_path / "other-state", f"sqlite:///{state / 'registry.db'}"
    )
    refused = fgsn("run", "--once", "--config", str(other))
    assert refused.returncode == 2 and "records versions in another state folder" in refused.stderr

    # The right pair still starts, and the marker is unchanged.
    again = fgsn("run", "--once", "--config", str(cfg))
    assert again.returncode == 0, again.stderr
    assert (state / "lineage-1" / "LINEAGE.json").read_text() == marker
    assert version_folders(state) == kept
