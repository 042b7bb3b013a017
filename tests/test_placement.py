"""Models larger than one device: a scoring model spread by accelerate's device map gathers the same
statistics as the single-device one. On CPU the split is forced two ways: the embeddings and the
first half of the layers stay in memory, the rest is offloaded to disk and streamed in for every
forward pass (accelerate's hooks), which exercises the same dispatch as a multi-GPU map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import BENIGN, HARMFUL, make_trio, write_jsonl
from typer.testing import CliRunner

from fgsn_daemon.cli.main import app
from fgsn_daemon.core.errors import CheckpointError, ConfigError
from fgsn_daemon.engine.activations import (
    Placement,
    collect_stats,
    load_model,
    load_tokenizer,
    offloaded_parameters,
)
from fgsn_daemon.engine.architectures import spec_for_config
from fgsn_daemon.engine.attribution import delta_effects
from fgsn_daemon.engine.evaluation import generate_responses
from fgsn_daemon.engine.io.checkpoint import Checkpoint
from fgsn_daemon.engine.pipeline import restored_in_memory
from fgsn_daemon.service.settings import Settings

pytest.importorskip("accelerate")

LAYERS = 4
RESPONSES = ["i do not help", "tell story about cats", "plan trip", "sum numbers", "write poem"] * 2


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    return make_trio(tmp_path_factory.mktemp("placement"), "llama", layers=LAYERS)


def split_map() -> dict[str, str]:
    """Embeddings and layers 0–1 in memory; layers 2–3, the final norm and the head on disk."""
    half = LAYERS // 2
    out = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu"}
    out |= {f"model.layers.{i}": "cpu" if i < half else "disk" for i in range(LAYERS)}
    return out | {"model.norm": "disk", "lm_head": "disk"}


@pytest.fixture(scope="module")
def models(trio, tmp_path_factory):
    single = load_model(trio["finetuned"], torch.device("cpu"))
    offload = tmp_path_factory.mktemp("offload")
    placement = Placement(split_map(), None, offload)
    spread = load_model(trio["finetuned"], torch.device("cpu"), placement=placement)
    return single, spread


def test_the_forced_split_really_offloads_half_of_the_layers(models):
    _, spread = models
    offloaded = offloaded_parameters(spread)
    assert any(n.startswith("model.layers.3.") for n in offloaded)
    assert not any(n.startswith("model.layers.0.") for n in offloaded)
    assert spread.hf_device_map["model.layers.2"] == "disk"


def test_neuron_statistics_and_layer_curve_equal_the_single_device_path(trio, models):
    single, spread = models
    tok = load_tokenizer(trio["finetuned"])
    spec = spec_for_config(single.config.to_dict())
    kw = {"layers": list(range(LAYERS)), "spaces": ["mlp", "attn"], "curve": True, "batch_size": 3}
    a = collect_stats(single, tok, spec, HARMFUL + BENIGN, **kw)
    b = collect_stats(spread, tok, spec, HARMFUL + BENIGN, **kw)
    assert sorted(a.neurons) == sorted(b.neurons) and len(a.neurons) == 2 * LAYERS
    for key, stats in a.neurons.items():
        torch.testing.assert_close(b.neurons[key].sum, stats.sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.neurons[key].last_sumsq, stats.last_sumsq, rtol=1e-5, atol=1e-6)
        assert b.neurons[key].count == stats.count
    assert sorted(a.unit_sums) == sorted(b.unit_sums) == list(range(LAYERS))
    for layer, v in a.unit_sums.items():
        torch.testing.assert_close(b.unit_sums[layer], v, rtol=1e-5, atol=1e-6)


def test_delta_attribution_equals_the_single_device_path(trio, models):
    single, spread = models
    tok = load_tokenizer(trio["finetuned"])
    al, ft = Checkpoint(trio["aligned"]), Checkpoint(trio["finetuned"])
    names = [n for n in al.names() if n.startswith("model.layers.") and n.endswith("proj.weight")]
    deltas = {n: (al.read(n).double() - ft.read(n).double()).float() for n in names}
    al.close()
    ft.close()
    # layers on both sides of the split are scored
    assert any(".layers.0." in n for n in names) and any(".layers.3." in n for n in names)
    for entries in (False, True):
        kw = {"entries": entries, "batch_size": 3, "max_length": 64}
        a = delta_effects(single, tok, HARMFUL, RESPONSES, deltas, **kw)
        b = delta_effects(spread, tok, HARMFUL, RESPONSES, deltas, **kw)
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
        for name in names:
            torch.testing.assert_close(b.rows[name], a.rows[name], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(b.cols[name], a.cols[name], rtol=1e-4, atol=1e-7)
            if entries:
                torch.testing.assert_close(b.entries[name], a.entries[name], rtol=1e-4, atol=1e-8)


def test_greedy_generation_equals_the_single_device_path(trio, models):
    single, spread = models
    tok = load_tokenizer(trio["finetuned"])
    assert generate_responses(spread, tok, BENIGN, 6, 4) == generate_responses(single, tok, BENIGN, 6, 4)


def test_in_memory_edits_of_offloaded_weights_are_refused_clearly(trio, models):
    _, spread = models
    ck = Checkpoint(trio["aligned"])
    name = "model.layers.3.mlp.up_proj.weight"
    mask = torch.ones(ck.info(name).shape, dtype=torch.bool)

    class Trio:
        aligned = ck

    edit = restored_in_memory(spread, Trio(), masks={name: mask})
    with pytest.raises(ConfigError, match="offloaded"):
        edit.__enter__()
    ck.close()


@pytest.mark.parametrize("device_map", ["everywhere", {"": "tpu:7"}])
def test_a_bad_device_map_is_a_clear_error(trio, tmp_path, device_map):
    bad = Placement(device_map, None, tmp_path)
    with pytest.raises(CheckpointError, match="device_map"):
        load_model(trio["finetuned"], torch.device("cpu"), placement=bad)


def test_settings_give_the_daemon_a_placement(tmp_path):
    memory = {"0": "70GiB", "cpu": "8GiB"}
    s = Settings(state_dir=tmp_path / "state", device_map="balanced", max_memory=memory)
    placement = s.placement()
    assert placement is not None and placement.device_map == "balanced"
    assert placement.max_memory == {0: "70GiB", "cpu": "8GiB"}
    assert placement.offload_dir == (tmp_path / "state" / "offload").absolute()
    assert Settings(state_dir=tmp_path).placement() is None
    with pytest.raises(ValueError, match="device_map"):
        Settings(state_dir=tmp_path, device_map="everywhere")


def test_apply_with_a_device_map_writes_the_same_checkpoint(trio, tmp_path):
    harmful = write_jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    benign = write_jsonl(tmp_path / "benign.jsonl", BENIGN)
    common = [
        "apply",
        *("--base", str(trio["base"]), "--aligned", str(trio["aligned"])),
        *("--finetuned", str(trio["finetuned"])),
        *("--harmful", str(harmful), "--benign", str(benign), "--device", "cpu"),
        *("--preset", "activation", "--json"),
    ]
    runner = CliRunner()
    one = runner.invoke(app, [*common, "--out", str(tmp_path / "one")])
    spread = runner.invoke(app, [*common, "--out", str(tmp_path / "spread"), "--device-map", "auto"])
    assert one.exit_code == 0, one.output
    assert spread.exit_code == 0, spread.output
    for f in sorted((tmp_path / "one").glob("*.safetensors")):
        assert (tmp_path / "spread" / f.name).read_bytes() == f.read_bytes()
    bad = runner.invoke(app, [*common, "--out", str(tmp_path / "bad"), "--device-map", "everywhere"])
    assert bad.exit_code != 0 and "--device-map must be one of" in bad.output


def test_apply_scores_in_bfloat16_when_asked(trio, tmp_path):
    harmful = write_jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    benign = write_jsonl(tmp_path / "benign.jsonl", BENIGN)
    common = [
        "apply",
        *("--base", str(trio["base"]), "--aligned", str(trio["aligned"])),
        *("--finetuned", str(trio["finetuned"]), "--harmful", str(harmful), "--benign", str(benign)),
        *("--device", "cpu", "--unit", "neuron", "--budget", "5", "--contrast", "0", "--json"),
    ]
    runner = CliRunner()
    full = runner.invoke(app, [*common, "--out", str(tmp_path / "fp32")])
    half = runner.invoke(app, [*common, "--out", str(tmp_path / "bf16"), "--compute-dtype", "bfloat16"])
    assert full.exit_code == 0, full.output
    assert half.exit_code == 0, half.output
    picked = [
        {(n["layer"], n["space"], n["index"]) for n in json.loads(r.stdout)["selected"]} for r in (full, half)
    ]
    # bf16 rounding may reorder near-ties, not the bulk of the selection
    assert len(picked[0] & picked[1]) >= 0.6 * len(picked[0]) > 0
    bad = runner.invoke(app, [*common, "--out", str(tmp_path / "bad"), "--compute-dtype", "int8"])
    assert bad.exit_code != 0 and "--compute-dtype must be" in bad.output
