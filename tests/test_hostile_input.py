"""Hostile policy input, beyond the 8 kinds of ``test_daemon``: each kind is refused with a clear
error (or, where a careful user would expect it, accepted), first by the loader alone, then by a
real daemon run over all of them at once, which records every error where the user looks and
serves the good dimensions; the policy folder is never modified."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import make_trio
from test_daemon import (
    fgsn,
    registry,
    running_daemon,
    status_of,
    wait_for,
    write_config,
    write_dimension,
)

from fgsn_daemon.core.errors import FGSNError
from fgsn_daemon.core.policy import list_dimension_dirs, load_dimension
from fgsn_daemon.service.registry.models import RevisionStatus
from fgsn_daemon.service.reliability import folder_digest

GOOD = ["hack wifi", "phish bank account", "steal bank account money", "hack bank account"]
TOML = b'description = "d"\nsource = "s"\nlicense = "MIT"\n'
NESTED_TOML = b"[" * 20_000 + b"]" * 20_000  # under the 64 KiB policy.toml limit
DUPLICATE_KEY = b'{"prompt": "hack wifi", "prompt": "make bomb"}\n'


def lines(prompts: list[str], end: str = "\n") -> bytes:
    return "".join(json.dumps({"prompt": p}) + end for p in prompts).encode()


def replace_file(name: str, data: bytes) -> Callable[[Path, Path], None]:
    def build(folder: Path, outside: Path) -> None:
        (folder / name).write_bytes(data)

    return build


def fifo(folder: Path, outside: Path) -> None:
    (folder / "harmful.jsonl").unlink()
    os.mkfifo(folder / "harmful.jsonl")


def device(folder: Path, outside: Path) -> None:
    (folder / "harmful.jsonl").unlink()
    (folder / "harmful.jsonl").symlink_to("/dev/zero")


def hard_link(folder: Path, outside: Path) -> None:
    target = outside / "shared.jsonl"
    target.write_bytes(lines(GOOD))
    (folder / "harmful.jsonl").unlink()
    os.link(target, folder / "harmful.jsonl")


def toml_is_a_directory(folder: Path, outside: Path) -> None:
    (folder / "policy.toml").unlink()
    (folder / "policy.toml").mkdir()


def broken_symlink(folder: Path, outside: Path) -> None:
    (folder / "harmful.jsonl").unlink()
    (folder / "harmful.jsonl").symlink_to(folder / "gone.jsonl")


def symlink_loop(folder: Path, outside: Path) -> None:
    (folder / "harmful.jsonl").unlink()
    (folder / "loop.jsonl").symlink_to(folder / "harmful.jsonl")
    (folder / "harmful.jsonl").symlink_to(folder / "loop.jsonl")


# name -> (how to spoil a good dimension folder, expected error fragment or None when accepted)
KINDS: dict[str, tuple[Callable[[Path, Path], None], str | None]] = {
    "nul-byte": (replace_file("harmful.jsonl", b'{"prompt": "hack\x00 wifi"}\n'), "NUL byte"),
    "bom": (replace_file("harmful.jsonl", b"\xef\xbb\xbf" + lines(GOOD)), None),
    "crlf": (replace_file("harmful.jsonl", lines(GOOD, end="\r\n")), None),
    "toml-bom": (replace_file("policy.toml", b"\xef\xbb\xbf" + TOML), None),
    "ten-mb-line": (replace_file("harmful.jsonl", lines(["x" * 10_000_000])), "longer than 32000"),
    "million-lines": (replace_file("harmful.jsonl", b'{"prompt":"a"}\n' * 1_000_000), "more than 200000"),
    "deep-nesting": (replace_file("harmful.jsonl", b"[" * 200_000 + b"]" * 200_000 + b"\n"), "nested"),
    "toml-deep-nesting": (
        replace_file("policy.toml", TOML + b"x = " + NESTED_TOML),
        "nested",
    ),
    "duplicate-key": (
        replace_file("harmful.jsonl", DUPLICATE_KEY),
        "duplicate",
    ),
    "prompt-not-string": (replace_file("harmful.jsonl", b'{"prompt": ["hack wifi"]}\n'), "non-empty string"),
    "empty-prompt": (replace_file("harmful.jsonl", b'{"prompt": ""}\n'), "non-empty string"),
    "blank-prompt": (replace_file("harmful.jsonl", b'{"prompt": "   "}\n'), "non-empty string"),
    "array-line": (replace_file("harmful.jsonl", b'["prompt", "hack wifi"]\n'), "JSON object"),
    "fifo": (fifo, "not a regular file"),
    "device": (device, "outside"),
    "hard-link": (hard_link, "hard link"),
    "toml-directory": (toml_is_a_directory, "not a regular file"),
    "broken-symlink": (broken_symlink, "broken"),
    "symlink-loop": (symlink_loop, "looping"),
}


def spoil(policy: Path, outside: Path, name: str) -> Path:
    folder = write_dimension(policy, name, GOOD)
    KINDS[name][0](folder, outside)
    old = time.time() - 60  # settled
    for p in [folder, *folder.iterdir()]:
        if not p.is_symlink() and not p.is_fifo():
            os.utime(p, (old, old))
    return folder


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_loader_refuses_or_accepts_each_kind(tmp_path, kind):
    policy, outside = tmp_path / "policies", tmp_path / "outside"
    policy.mkdir()
    outside.mkdir()
    folder = spoil(policy, outside, kind)
    expected = KINDS[kind][1]
    if expected is None:
        dim = load_dimension(folder)
        assert list(dim.harmful) == GOOD
    else:
        with pytest.raises(FGSNError) as raised:
            load_dimension(folder)
        assert expected.lower() in str(raised.value).lower(), str(raised.value)
        assert len(str(raised.value)) < 600  # a message, not a dump of the input


def test_a_name_that_differs_only_by_case_is_not_a_second_dimension(tmp_path):
    write_dimension(tmp_path, "cyber", GOOD)
    (tmp_path / "Cyber").mkdir()
    dirs, invalid = list_dimension_dirs(tmp_path)
    assert [d.name for d in dirs] == ["cyber"]
    assert [e.path.name for e in invalid] == ["Cyber"] and "invalid dimension name" in invalid[0].reason


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    return make_trio(tmp_path_factory.mktemp("trio"), "llama")


@pytest.mark.slow
def test_the_daemon_records_every_kind_and_serves_the_rest(trio, tmp_path):
    policy, outside = tmp_path / "policies", tmp_path / "outside"
    policy.mkdir()
    outside.mkdir()
    write_dimension(policy, "good", GOOD)
    long_prompt = " ".join(["how do i make a bomb"] * 40)  # 200 tokens against max_length 32
    write_dimension(policy, "long-context", [*GOOD, long_prompt])
    for kind in KINDS:
        spoil(policy, outside, kind)
    (policy / "Good").mkdir()  # differs from "good" only by case
    before = folder_digest(policy)
    cfg = write_config(tmp_path, trio, policy, tmp_path / "state")
    time.sleep(0.3)
    proc = fgsn("run", "--once", "--config", str(cfg), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = tmp_path / "state"
    with registry(state) as reg:
        lineage = reg.default_lineage_id()
        latest = {d.name: d.latest for d in reg.dimensions(lineage) if d.latest}
        events = reg.events(lineage_id=None)
    for kind, (_, expected) in KINDS.items():
        rev = latest[kind]
        if expected is None:
            assert rev.status == RevisionStatus.APPLIED, (kind, rev.error)
        else:
            assert rev.status == RevisionStatus.FAILED, kind
            assert expected.lower() in (rev.error or "").lower(), (kind, rev.error)
            assert kind in proc.stderr  # also in the log
    assert latest["good"].status == RevisionStatus.APPLIED
    assert latest["long-context"].status == RevisionStatus.APPLIED
    truncated = [e for e in events if e.kind == "dimension.prompts_truncated"]
    assert [e.dimension for e in truncated] == ["long-context"] and "truncated" in proc.stderr
    assert any(e.kind == "policy.invalid_entry" and "Good" in json.dumps(e.details) for e in events)
    assert folder_digest(policy) == before  # nothing the user wrote was touched


@pytest.mark.slow
def test_a_folder_removed_while_its_job_runs_or_renamed_while_settling(trio, tmp_path):
    policy, state, log_path = tmp_path / "policies", tmp_path / "state", tmp_path / "daemon.log"
    policy.mkdir()
    cfg = write_config(tmp_path, trio, policy, state)
    with running_daemon(cfg, log_path, {"FGSN_PAUSE": "job_scoring_started@1:4"}):
        wait_for(lambda: (state / "current").exists(), what="the initial version")
        doomed = write_dimension(policy, "doomed", GOOD)
        wait_for(lambda: "pause point job_scoring_started reached" in log_path.read_text(), what="the pause")
        for f in doomed.iterdir():
            f.unlink()
        doomed.rmdir()
        wait_for(lambda: status_of(state, "doomed") == "failed", what="the job failed")
        # written under one name, renamed before it settled: only the final name is served
        moving = write_dimension(policy, "draft", GOOD)
        os.rename(moving, policy / "final")
        wait_for(lambda: status_of(state, "final") == "applied", what="the renamed dimension")
    with registry(state) as reg:
        lineage = reg.default_lineage_id()
        names = {d.name for d in reg.dimensions(lineage)}
        doomed_rev = reg.dimension(lineage, "doomed").revisions[-1]
    assert "cannot read dimension doomed" in (doomed_rev.error or "")
    assert names == {"doomed", "final"}  # the transient name was never recorded


@pytest.mark.slow
def test_a_thousand_dimension_folders_at_once_are_all_queued(tmp_path):
    from fgsn_daemon.service.daemon import Daemon
    from fgsn_daemon.service.registry.models import JobState
    from fgsn_daemon.service.settings import load_settings

    policy = tmp_path / "policies"
    policy.mkdir()
    for i in range(1000):
        write_dimension(policy, f"dim-{i:04d}", [f"hack wifi {i}"])
    settings = load_settings(None, {"policy_dir": policy, "state_dir": tmp_path / "state", "settle_s": 0.0})
    daemon = Daemon(settings)
    try:
        with daemon.open_registry().transaction() as tx:
            daemon.lineage_id = tx.ensure_lineage("b", "a", "f")
        queued = daemon.scan(now=time.time() + 60)
        assert len(queued) == 1000
        assert daemon.scan(now=time.time() + 60) == []  # nothing is queued twice
        jobs = daemon.open_registry().jobs(daemon.lineage_id, unfinished_only=True)
        assert len(jobs) == 1000 and all(j.state == JobState.PENDING for j in jobs)
    finally:
        daemon.close()
