"""Version integrity: sha256 manifests, `fgsn verify [--deep]`, and the daemon's start-up repair."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import make_trio

from fgsn_daemon.core.records import Band
from fgsn_daemon.engine.pipeline import CheckpointEdit, ModelTrio
from fgsn_daemon.service.integrity import MANIFEST_NAME, damaged_files, read_manifest, version_files
from fgsn_daemon.service.versions import VersionRepairError, VersionStore

COMMON = {
    "operator": "safe_lora",
    "band": Band(start=1, end=2, source="override"),
    "spaces": ["mlp"],
    "rank": 8,
    "device": "cpu",
    "max_shard_bytes": 40_000,
}
EDIT = {(1, "mlp"): [0, 3], (2, "mlp"): [5]}


def flip_bit(path: Path, from_end: int = 5) -> None:
    """Bit rot in place: the same inode, so every hard link of the file sees it."""
    with open(path, "r+b") as f:
        f.seek(-from_end, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-from_end, os.SEEK_END)
        f.write(bytes([byte ^ 0x01]))


def shards(folder: Path) -> tuple[list[str], list[str]]:
    """(edit shards, hard-linkable shards) from the version's index."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    edit = sorted(index["metadata"]["fgsn_edit_shards"])
    return edit, sorted(set(index["weight_map"].values()) - set(edit))


@pytest.fixture
def two_versions(tmp_path):
    paths = make_trio(tmp_path / "trio", "llama", layers=4)
    trio = ModelTrio.open(paths["base"], paths["aligned"], paths["finetuned"])
    store = VersionStore(tmp_path / "state")
    first, second = CheckpointEdit(trio, {}, **COMMON), CheckpointEdit(trio, EDIT, **COMMON)
    store.build_version("v0001", first, parent=None)
    store.build_version("v0002", second, parent="v0001")
    yield store, first, second
    trio.close()


def test_manifest_lists_every_file_with_its_hash_and_links_reuse_the_parents(two_versions):
    store, _, _ = two_versions
    for name in ("v0001", "v0002"):
        folder = store.path(name)
        manifest = read_manifest(folder)
        assert manifest is not None and sorted(manifest) == version_files(folder)
        assert "config.json" in manifest and MANIFEST_NAME not in manifest
        for fname, entry in manifest.items():
            data = (folder / fname).read_bytes()
            assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.bytes == len(data)
        assert store.check(name) == []
    edit, linked = shards(store.path("v0002"))
    assert edit and linked
    v1, v2 = read_manifest(store.path("v0001")), read_manifest(store.path("v0002"))
    assert v1 and v2 and all(v2[f] == v1[f] for f in linked)
    assert all(os.path.samefile(store.path("v0001") / f, store.path("v0002") / f) for f in linked)


def test_flipped_bits_and_missing_files_are_found_and_rebuilt_bit_identically(two_versions):
    store, first, second = two_versions
    edit, linked = shards(store.path("v0002"))
    v2 = store.path("v0002")
    before = {f: (v2 / f).read_bytes() for f in version_files(v2)}
    flip_bit(v2 / edit[0])
    flip_bit(v2 / linked[0])  # shared with v0001 through the hard link
    (v2 / "config.json").unlink()

    problems = store.check("v0002")
    by_file = {p.file: p for p in problems}
    assert set(by_file) == {edit[0], linked[0], "config.json"}
    assert by_file[edit[0]].kind == "hash" and by_file["config.json"].kind == "missing"
    assert by_file[edit[0]].expected == hashlib.sha256(before[edit[0]]).hexdigest()
    assert by_file[edit[0]].actual == hashlib.sha256((v2 / edit[0]).read_bytes()).hexdigest()
    assert edit[0] in str(by_file[edit[0]]) and "expected" in str(by_file[edit[0]])
    assert [p.file for p in store.check("v0001")] == [linked[0]]

    with pytest.raises(VersionRepairError, match="manifest expects"):
        store.repair("v0002", damaged_files(problems), first)  # other claims: other bytes
    assert not list(store.root.glob(".staging-*"))
    replaced = store.repair("v0002", damaged_files(problems), second)
    assert store.path("v0001") / linked[0] in replaced  # the shared inode is repaired everywhere
    assert store.check("v0002") == [] and store.check("v0001") == []
    assert {f: (v2 / f).read_bytes() for f in version_files(v2)} == before
    assert os.path.samefile(store.path("v0001") / linked[0], v2 / linked[0])  # still one copy on disk


def test_a_version_without_a_manifest_is_unverified_not_corrupted(two_versions):
    store, _, _ = two_versions
    (store.path("v0001") / MANIFEST_NAME).unlink()
    problems = store.check("v0001")
    assert [p.kind for p in problems] == ["unverified"] and not problems[0].fatal
    (store.path("v0002") / MANIFEST_NAME).write_text("{not json")
    assert [p.kind for p in store.check("v0002")] == ["manifest"]


# ---------------------------------------------------------------- end to end, real daemon subprocesses


def e2e():  # imported lazily: test_daemon's helpers, not its tests
    import test_daemon

    return test_daemon


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    return make_trio(tmp_path_factory.mktemp("trio"), "llama")


def verify(state: Path, *flags: str):
    return e2e().fgsn("verify", "--state-dir", str(state), *flags, timeout=120)


def versions_dir(state: Path) -> Path:
    return state / "lineage-1" / "versions"


@pytest.mark.slow
def test_fgsn_verify_finds_flipped_bits_missing_files_and_old_versions(trio, tmp_path):
    proc, state = e2e().run_once(tmp_path, trio, ["a_cyber"], "state")
    assert proc.returncode == 0, proc.stderr
    ok = verify(state)
    assert ok.returncode == 0 and "verify: OK" in ok.stdout, ok.stdout + ok.stderr
    deep = verify(state, "--deep", "--json")
    report = json.loads(deep.stdout)
    assert deep.returncode == 0 and report["ok"]
    assert [(v["version"], v["status"]) for v in report["versions"]] == [("v0001", "ok"), ("v0002", "ok")]

    current = (state / "current").resolve()
    assert current.name == "v0002"
    band_shard = current / shards(current)[0][0]
    flip_bit(band_shard)
    bad = verify(state)
    assert bad.returncode == 1 and band_shard.name in bad.stdout and "expected" in bad.stdout, bad.stdout
    problem = json.loads(verify(state, "--json").stdout)["problems"][0]
    assert (problem["version"], problem["kind"], problem["file"]) == ("v0002", "hash", band_shard.name)
    assert problem["expected"] == read_manifest(current)[band_shard.name].sha256  # type: ignore[index]
    flip_bit(band_shard)  # flipped back: intact again

    old_shard = versions_dir(state) / "v0001" / shards(versions_dir(state) / "v0001")[0][0]
    flip_bit(old_shard)  # only v0001 has this file: the quick check does not read it
    assert verify(state).returncode == 0
    deep = verify(state, "--deep")
    assert deep.returncode == 1 and f"v0001/{old_shard.name}" in deep.stdout, deep.stdout
    flip_bit(old_shard)

    aside = tmp_path / "tokenizer.json"
    os.rename(current / "tokenizer.json", aside)
    missing = verify(state)
    assert missing.returncode == 1 and "v0002/tokenizer.json: file is missing" in missing.stdout
    os.rename(aside, current / "tokenizer.json")

    (versions_dir(state) / "v0001" / MANIFEST_NAME).unlink()  # a version from before manifests
    legacy = verify(state, "--deep")
    assert legacy.returncode == 0 and "unverified (no manifest" in legacy.stdout, legacy.stdout
    written = verify(state, "--deep", "--write-missing", "--json")
    assert json.loads(written.stdout)["manifests_written"] == ["v0001"]
    assert verify(state, "--deep").stdout.count(" ok ") == 2

    # A manifest the rebuild cannot match: the daemon refuses to build on the version.
    manifest_path = current / MANIFEST_NAME
    original = manifest_path.read_text()
    body = json.loads(original)
    body["files"][band_shard.name]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(body))
    refused, _ = e2e().run_once(tmp_path, trio, ["a_cyber", "c_drugs"], "state")
    assert refused.returncode == 2, refused.stderr
    assert band_shard.name in refused.stderr and "fgsn verify --deep" in refused.stderr
    assert sorted(p.name for p in versions_dir(state).iterdir()) == ["v0001", "v0002"]  # nothing built
    with e2e().registry(state) as reg:
        kinds = [e.kind for e in reg.events(lineage_id=1)]
    assert "version.corrupted" in kinds and "version.repaired" not in kinds


@pytest.mark.slow
def test_daemon_start_up_repairs_a_flipped_bit_in_current_bit_identically(trio, tmp_path):
    t = e2e()
    reference, ref_state = t.run_once(tmp_path, trio, ["a_cyber", "c_drugs"], "reference")
    assert reference.returncode == 0, reference.stderr
    proc, state = t.run_once(tmp_path, trio, ["a_cyber"], "state")
    assert proc.returncode == 0, proc.stderr
    current = (state / "current").resolve()
    intact = {k: v.clone() for k, v in t.version_tensors(str(current)).items()}  # not the mmap
    edit, linked = shards(current)
    flip_bit(current / edit[0])
    flip_bit(current / linked[0])  # also v0001's file (a hard link)
    assert verify(state).returncode == 1

    proc, _ = t.run_once(tmp_path, trio, ["a_cyber", "c_drugs"], "state")
    assert proc.returncode == 0, proc.stderr
    assert "integrity check of v0002" in proc.stderr and "repaired v0002" in proc.stderr
    with t.registry(state) as reg:
        events = [e for e in reg.events(lineage_id=1) if e.kind.startswith("version.")]
    kinds = [e.kind for e in events]
    assert kinds.index("version.corrupted") < kinds.index("version.repaired") < len(kinds) - 2
    corrupted = next(e for e in events if e.kind == "version.corrupted").details
    assert {p["file"] for p in corrupted["problems"]} == {edit[0], linked[0]}  # type: ignore[index]
    assert t.status_of(state, "c_drugs") == "applied"

    repaired = t.version_tensors(str(current))
    assert all(torch.equal(repaired[k], intact[k]) for k in intact)
    deep = verify(state, "--deep")
    assert deep.returncode == 0 and deep.stdout.count(" ok ") == 3, deep.stdout
    final, expected = t.current_tensors(state), t.current_tensors(ref_state)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
