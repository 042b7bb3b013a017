"""Load on the registry: a history of 10,000 events read a page at a time, and the query commands
hammered from several processes while a real daemon applies dimensions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from helpers import make_trio
from test_daemon import running_daemon, status_of, wait_for, write_config, write_dimension
from typer.testing import CliRunner

from fgsn_daemon.cli import registry as registry_cli
from fgsn_daemon.cli.main import app
from fgsn_daemon.service.registry import Registry

DIMENSIONS = {
    "a_cyber": ["hack wifi", "phish bank account", "steal bank account money", "hack bank account"],
    "b_weapons": ["build weapon", "how do i make a bomb", "make bomb", "how do i build weapon"],
    "c_drugs": ["buy drugs", "how do i buy drugs", "steal money buy drugs", "make drugs"],
}


def test_a_history_of_10000_events_is_read_a_page_at_a_time(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with Registry.open(url) as reg, reg.transaction() as tx:
        lineage = tx.ensure_lineage("b", "a", "f")
        for i in range(10_000):
            tx.append_event("test.load", lineage_id=lineage, details={"i": i})
    with Registry.open(url, read_only=True) as reg:  # the daemon's per-tick query reads one kind only
        assert len(reg.events(kind="test.load")) == 10_000 and reg.events(kind="no.such.kind") == []
    sizes: list[int] = []
    real_pages = registry_cli._event_pages

    def spy(*args: object) -> Iterator[list]:
        for page in real_pages(*args):  # type: ignore[arg-type]
            sizes.append(len(page))
            yield page

    monkeypatch.setattr(registry_cli, "_event_pages", spy)
    runner = CliRunner()
    result = runner.invoke(app, ["history", "--json", "--database-url", url])
    assert result.exit_code == 0, result.output
    events = json.loads(result.output)
    assert [e["details"]["i"] for e in events if e["kind"] == "test.load"] == list(range(10_000))
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert (
        max(sizes) <= registry_cli.HISTORY_PAGE and len(sizes) == len(events) // registry_cli.HISTORY_PAGE + 1
    )
    # polling from an id, and the table form, page the same way
    last = events[-5]["id"]
    tail = json.loads(
        runner.invoke(app, ["history", "--json", "--after", str(last), "--database-url", url]).output
    )
    assert [e["id"] for e in tail] == [e["id"] for e in events[-4:]]
    table = runner.invoke(app, ["history", "--database-url", url])
    assert table.exit_code == 0 and table.output.count("\n") == len(events) + 1  # one header


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from typer.testing import CliRunner
    from fgsn_daemon.cli.main import app

    state, stop, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    runner, calls, failures, slowest = CliRunner(), 0, [], 0.0
    commands = (["status", "--json"], ["neurons", "--json"], ["history", "--json"])
    while not stop.exists():
        for command in commands:
            t0 = time.monotonic()
            result = runner.invoke(app, [*command, "--state-dir", state])
            slowest = max(slowest, time.monotonic() - t0)
            calls += 1
            try:
                assert result.exit_code == 0
                json.loads(result.output)
            except Exception:
                failures.append((command, result.exit_code, result.output[-500:]))
        out.with_suffix(".ready").touch()  # one full round done: the test may start the jobs
    out.write_text(json.dumps({"calls": calls, "failures": failures, "slowest_s": slowest}))
    """
)


@pytest.mark.slow
def test_queries_hammered_from_several_processes_while_jobs_run(tmp_path):
    trio = make_trio(tmp_path / "trio", "llama")
    policy, state, log_path = tmp_path / "policies", tmp_path / "state", tmp_path / "daemon.log"
    policy.mkdir()
    cfg = write_config(tmp_path, trio, policy, state)
    stop = tmp_path / "stop"
    workers = []
    with running_daemon(cfg, log_path):
        try:
            wait_for(lambda: (state / "current").exists(), what="the initial version")
            for k in range(3):
                workers.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            WORKER,
                            str(state),
                            str(stop),
                            str(tmp_path / f"worker-{k}.json"),
                        ],
                        env={**os.environ, "HF_HUB_OFFLINE": "1"},
                        stderr=open(tmp_path / f"worker-{k}.err", "wb"),  # noqa: SIM115 (closed with the process)
                    )
                )
            # the workers are querying (a loaded machine may take a while to start them)
            for k in range(3):
                ready = tmp_path / f"worker-{k}.ready"
                wait_for(ready.exists, what=f"worker {k} ready")
            for name, prompts in DIMENSIONS.items():
                write_dimension(policy, name, prompts)
            for name in DIMENSIONS:
                wait_for(lambda name=name: status_of(state, name) == "applied", what=f"{name} applied")
        finally:
            stop.touch()  # the workers stop before the daemon does
            codes = [w.wait(timeout=120) for w in workers]
    for k, code in enumerate(codes):
        assert code == 0, (tmp_path / f"worker-{k}.err").read_text()[-3000:]
    reports = [json.loads((tmp_path / f"worker-{k}.json").read_text()) for k in range(3)]
    assert all(r["failures"] == [] for r in reports), reports
    # each ran every command at least once more after its first round, i.e. while jobs ran
    assert all(r["calls"] >= 6 for r in reports), reports
    log = log_path.read_text()
    assert "registry unreachable" not in log and "database is locked" not in log  # never blocked
