"""Version folders: staged then renamed, unchanged shards hard-linked, `current` swapped atomically."""

from __future__ import annotations

import json

import torch
from helpers import make_trio
from safetensors.torch import load_file

from fgsn_daemon.core.records import Band
from fgsn_daemon.engine.pipeline import ModelTrio
from fgsn_daemon.service.versions import VersionStore


def test_versions_link_unchanged_shards_and_publish_atomically(tmp_path):
    paths = make_trio(tmp_path / "trio", "llama", layers=4)
    trio = ModelTrio.open(paths["base"], paths["aligned"], paths["finetuned"])
    store = VersionStore(tmp_path / "state")
    band = Band(start=1, end=2, source="override")
    common = {
        "operator": "safe_lora",
        "band": band,
        "spaces": ["mlp"],
        "rank": 8,
        "device": "cpu",
        "max_shard_bytes": 40_000,
    }
    assert store.next_name() == "v0001"
    store.build("v0001", trio, {}, parent=None, **common)
    store.publish("v0001")
    assert store.current() == "v0001"
    store.build("v0002", trio, {(1, "mlp"): [0, 3], (2, "mlp"): [5]}, parent="v0001", **common)
    assert store.current() == "v0001"  # building does not publish
    store.publish("v0002")
    assert store.current() == "v0002" and (tmp_path / "state" / "current").resolve() == store.path("v0002")

    index = json.loads((store.path("v0002") / "model.safetensors.index.json").read_text())
    edit_shards = set(index["metadata"]["fgsn_edit_shards"])
    shards = set(index["weight_map"].values())
    assert edit_shards and shards - edit_shards
    for shard in shards:
        same_inode = (store.path("v0001") / shard).stat().st_ino == (
            store.path("v0002") / shard
        ).stat().st_ino
        assert same_inode == (shard not in edit_shards)
    v1 = {k: v for f in store.path("v0001").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    v2 = {k: v for f in store.path("v0002").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    changed = {k for k in v1 if not torch.equal(v1[k], v2[k])}
    assert changed == {
        f"model.layers.{i}.mlp.{p}_proj.weight" for i in (1, 2) for p in ("gate", "up", "down")
    }

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "state" / "current"))
    (store.root / ".staging-v0003").mkdir()
    assert store.clean_staging() == [".staging-v0003"]
    assert store.next_name() == "v0003"
