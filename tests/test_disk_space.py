"""A full disk: the state folder on a small size-limited tmpfs that the test mounts (skipped, with
the reason, where mounting is not permitted). A build that cannot fit is refused before it writes,
naming the bytes it needs; ENOSPC in the middle of a write leaves no staging behind; the previous
version stays current, the job is recorded as failed, and once space is freed it is retried and
ends bit-identical to a run that never lacked space."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import make_trio
from test_daemon import current_tensors, fgsn, write_config, write_dimension

from fgsn_daemon.core.errors import DiskSpaceError
from fgsn_daemon.core.records import Band
from fgsn_daemon.engine.io import checkpoint
from fgsn_daemon.engine.pipeline import ModelTrio
from fgsn_daemon.service.versions import VersionStore

pytestmark = pytest.mark.slow

PROMPTS = {
    "a_cyber": ["hack wifi", "phish bank account", "steal bank account money", "hack bank account"],
    "c_drugs": ["buy drugs", "how do i buy drugs", "steal money buy drugs", "make drugs"],
}


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CAP_SYS_ADMIN); not permitted here")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """A ballast file that leaves about ``leave`` bytes free on ``folder``'s file system."""
    ballast = folder / "ballast"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(ballast, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * 4096
        for _ in range(max(0, free - leave) // 4096):
            f.write(chunk)
    return ballast


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def test_enospc_in_the_middle_of_a_write_leaves_nothing_behind(tmp_path, small_fs, monkeypatch):
    paths = make_trio(tmp_path / "trio", "llama")
    trio = ModelTrio.open(paths["base"], paths["aligned"], paths["finetuned"])
    store = VersionStore(small_fs / "state")
    common = {
        "operator": "restore",
        "band": Band(start=1, end=2, source="override"),
        "spaces": ["mlp"],
        "rank": 8,
        "device": "cpu",
        "max_shard_bytes": 40_000,
    }
    ballast = fill(small_fs, leave=60_000)  # the full model (~170 kB) does not fit
    with pytest.raises(DiskSpaceError, match="bytes needed") as refused:
        store.build("v0001", trio, {}, parent=None, **common)
    assert refused.value.needed is not None and refused.value.needed > refused.value.free
    assert list(store.root.iterdir()) == []  # refused before anything was written

    # The early check passed (space taken by someone else meanwhile): ENOSPC mid-shard.
    monkeypatch.setattr(checkpoint, "ensure_free_space", lambda folder, needed: None)
    with pytest.raises(DiskSpaceError, match="no space left on device"):
        store.build("v0001", trio, {}, parent=None, **common)
    assert list(store.root.iterdir()) == []  # the half-written staging folder is gone
    ballast.unlink()
    store.build("v0001", trio, {}, parent=None, **common)
    assert store.names() == ["v0001"]


def test_a_job_that_lacks_space_fails_clearly_and_succeeds_once_space_is_freed(tmp_path, small_fs):
    trio = make_trio(tmp_path / "trio", "llama")
    # Reference: the same two dimensions on a disk with room.
    ref_policy = tmp_path / "ref-policies"
    ref_policy.mkdir()
    for name, prompts in PROMPTS.items():
        write_dimension(ref_policy, name, prompts)
    ref_cfg = write_config(tmp_path, trio, ref_policy, tmp_path / "ref-state")
    assert fgsn("run", "--once", "--config", str(ref_cfg)).returncode == 0
    expected = current_tensors(tmp_path / "ref-state")

    # The registry lives on another disk: this test is about the versions' disk filling up.
    policy, state = tmp_path / "policies", small_fs / "state"
    policy.mkdir()
    write_dimension(policy, "a_cyber", PROMPTS["a_cyber"])
    cfg = write_config(tmp_path, trio, policy, state, f"sqlite:///{tmp_path / 'registry.db'}")
    first = fgsn("run", "--once", "--config", str(cfg))
    assert first.returncode == 0, first.stderr
    before = current_tensors(state)
    versions_before = sorted(p.name for p in (state / "lineage-1" / "versions").iterdir())

    ballast = fill(small_fs, leave=8_000)
    write_dimension(policy, "c_drugs", PROMPTS["c_drugs"])
    starved = fgsn("run", "--once", "--config", str(cfg))
    assert starved.returncode == 0, starved.stderr  # a failed job is recorded, not fatal
    with registry_at(tmp_path) as reg:
        lineage = reg.default_lineage_id()
        detail = reg.dimension(lineage, "c_drugs")
        assert detail is not None
        rev = detail.revisions[-1]
        assert rev.status.value == "failed"
        error = rev.error or ""
        assert "bytes needed" in error and "retried once enough space is free" in error
        kinds = [e.kind for e in reg.events(lineage_id=lineage)]
        assert "job.waiting_for_space" in kinds
    now = current_tensors(state)
    assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)
    assert sorted(p.name for p in (state / "lineage-1" / "versions").iterdir()) == versions_before
    listed = fgsn("dimensions", "--config", str(cfg), timeout=60)  # where the user looks
    assert "not enough free space" in listed.stdout
    assert "bytes needed" in listed.stdout  # the numbers come first: the table truncates errors
    history = fgsn("dimensions", "c_drugs", "--json", "--config", str(cfg), timeout=60)
    assert "retried once enough space is free" in history.stdout

    again = fgsn("run", "--once", "--config", str(cfg))  # still no space: waits, no new failure
    assert again.returncode == 0, again.stderr
    with registry_at(tmp_path) as reg:
        assert sum(j.state.value == "failed" for j in reg.jobs(reg.default_lineage_id())) == 1

    ballast.unlink()
    assert free_bytes(small_fs) > 100_000
    freed = fgsn("run", "--once", "--config", str(cfg))
    assert freed.returncode == 0, freed.stderr
    assert status_of_registry(tmp_path, "c_drugs") == "applied"
    final = current_tensors(state)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def registry_at(root: Path):
    from fgsn_daemon.service.registry import Registry

    return Registry.open(f"sqlite:///{root / 'registry.db'}", read_only=True)


def status_of_registry(root: Path, name: str) -> str | None:
    with registry_at(root) as reg:
        detail = reg.dimension(reg.default_lineage_id(), name)
        return detail.revisions[-1].status.value if detail and detail.revisions else None


def test_the_free_space_check_names_the_bytes_and_takes_a_folder_not_made_yet(tmp_path):
    checkpoint.ensure_free_space(tmp_path / "not" / "made" / "yet", 1)
    with pytest.raises(DiskSpaceError, match="bytes needed") as refused:
        checkpoint.ensure_free_space(tmp_path / "not", 2**62)
    assert refused.value.needed == 2**62 and refused.value.free < 2**62
