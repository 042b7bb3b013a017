"""End-to-end engine tests on tiny random Llama, Qwen2 and Mistral trios."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import BENIGN, FAMILIES, HARMFUL, make_trio
from safetensors.torch import load_file, save_file

from fgsn_daemon.core.defaults import preset
from fgsn_daemon.core.errors import CheckpointError, FGSNError, IncompatibleCheckpointsError
from fgsn_daemon.engine.io.checkpoint import Checkpoint
from fgsn_daemon.engine.pipeline import FGSNParams, ModelTrio, apply_dimension


@pytest.fixture(scope="module", params=FAMILIES)
def trio(request, tmp_path_factory) -> dict[str, Path]:
    return make_trio(tmp_path_factory.mktemp(request.param), request.param)


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def logits(folder: Path, device: str = "cpu") -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    ids = torch.tensor([[2, 5, 9, 11, 7, 3]], device=device)
    with torch.inference_mode():
        return model(input_ids=ids).logits.cpu()


def run(trio, out, device="cpu", **params):
    # the per-layer neuron machinery (every operator) under the activation preset
    defaults = {**preset("activation"), "q": 20.0, "p": 10.0}
    defaults.update(params)
    return apply_dimension(
        trio["base"],
        trio["aligned"],
        trio["finetuned"],
        HARMFUL,
        BENIGN,
        out,
        params=FGSNParams(**defaults),
        device=device,
    )


@pytest.mark.parametrize("operator", ["safe_lora", "projector", "per_neuron", "restore"])
def test_only_selected_neurons_change(trio, tmp_path, operator):
    result = run(trio, tmp_path / "out", operator=operator, spaces=("mlp", "attn"))
    assert result.selected, "the test needs a non-empty selection"
    ft, out = load_all(trio["finetuned"]), load_all(tmp_path / "out")
    assert set(ft) == set(out)
    trio_obj = ModelTrio.open(trio["base"], trio["aligned"], trio["finetuned"])
    allowed: dict[str, torch.Tensor] = {}
    for n in result.selected:
        for name, axis in trio_obj.space_tensors(n.layer, n.space):
            mask = allowed.setdefault(name, torch.zeros_like(ft[name], dtype=torch.bool))
            if axis == 0:
                mask[n.index] = True
            else:
                mask[:, n.index] = True
    trio_obj.close()
    changed_entries = 0
    for name, tensor in ft.items():
        diff = out[name] != tensor
        if name in allowed:
            assert not diff[~allowed[name]].any(), f"{name} changed outside the selected neurons"
            changed_entries += int(diff.sum())
        else:
            assert torch.equal(out[name], tensor), f"{name} should be bit-identical"
    assert changed_entries > 0
    assert result.modification.changed_parameters == changed_entries
    assert sorted(result.edited_tensors) == sorted(allowed)
    # The output is a loadable Hugging Face checkpoint.
    assert torch.isfinite(logits(tmp_path / "out")).all()


def test_result_record_is_complete(trio, tmp_path):
    result = run(trio, tmp_path / "out")
    n_layers = json.loads((trio["aligned"] / "config.json").read_text())["num_hidden_layers"]
    assert len(result.curve.gap) == n_layers
    assert 0 <= result.band.start <= result.band.end < n_layers
    assert {c.layer for c in result.layer_counts} == set(result.band.layers)
    assert sum(c.selected for c in result.layer_counts) == len(result.selected)
    m = result.modification
    assert 0 < m.modified_parameters <= m.band_parameters < m.total_parameters
    assert m.ratio == pytest.approx(m.modified_parameters / m.total_parameters)
    # round-trips as JSON (what the registry stores and --json prints)
    assert type(result).model_validate_json(result.model_dump_json()) == result


def test_frozen_neurons_are_skipped_with_their_owner(trio, tmp_path):
    first = run(trio, None)
    frozen = {first.selected[0].id: "cybercrime", first.selected[1].id: "weapons"}
    second = apply_dimension(
        trio["base"],
        trio["aligned"],
        trio["finetuned"],
        HARMFUL,
        BENIGN,
        tmp_path / "out",
        params=FGSNParams(**{**preset("activation"), "q": 20.0, "p": 10.0}),
        frozen=frozen,
    )
    assert {s.id: s.owner for s in second.skipped} == frozen
    assert not {n.id for n in second.selected} & set(frozen)
    assert len(second.selected) == len(first.selected) - 2
    ft, out = load_all(trio["finetuned"]), load_all(tmp_path / "out")
    row_tensor = {"mlp": "mlp.gate_proj.weight", "attn": "self_attn.q_proj.weight"}  # axis 0 in each spec
    for nid in frozen:
        name = f"model.layers.{nid.layer}.{row_tensor[nid.space]}"
        assert torch.equal(out[name][nid.index], ft[name][nid.index]), "a frozen neuron was modified again"


def test_zero_selected_neurons_gives_identical_logits(trio, tmp_path):
    result = run(trio, tmp_path / "out", q=10.0, p=100.0)  # every candidate is a benign top neuron
    assert result.selected == []
    assert torch.equal(logits(tmp_path / "out"), logits(trio["finetuned"]))


def test_sharded_input_round_trips(trio, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = {}
    for k in ("base", "aligned", "finetuned"):
        model = AutoModelForCausalLM.from_pretrained(str(trio[k]))
        sharded[k] = tmp_path / k
        model.save_pretrained(sharded[k], max_shard_size="20KB")
        shutil.copy(trio[k] / "tokenizer.json", sharded[k])
        shutil.copy(trio[k] / "tokenizer_config.json", sharded[k])
        assert (sharded[k] / "model.safetensors.index.json").exists()
    single = run(trio, tmp_path / "single")
    multi = run(
        sharded,
        tmp_path / "multi",
    )
    assert [n.id for n in multi.selected] == [n.id for n in single.selected]
    a, b = load_all(tmp_path / "single"), load_all(tmp_path / "multi")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # output shards are bounded too, and the edit shard holds only band tensors
    tiny = apply_dimension(
        sharded["base"],
        sharded["aligned"],
        sharded["finetuned"],
        HARMFUL,
        BENIGN,
        tmp_path / "small",
        params=FGSNParams(**{**preset("activation"), "q": 20.0, "p": 10.0}),
        max_shard_bytes=30_000,
    )
    index = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    edit_shards = set(index["metadata"]["fgsn_edit_shards"])
    for name in tiny.edited_tensors:
        assert index["weight_map"][name] in edit_shards
    band_prefixes = tuple(f"model.layers.{layer}." for layer in tiny.band.layers)
    for name, shard in index["weight_map"].items():
        if shard in edit_shards:
            assert name.startswith(band_prefixes)
    assert torch.equal(logits(tmp_path / "small"), logits(tmp_path / "multi"))


def make_lora(trio: dict[str, Path], out: Path, rank: int = 4, alpha: float = 8.0) -> dict[str, torch.Tensor]:
    """A PEFT-format adapter and, returned, the merged weights computed independently."""
    out.mkdir()
    aligned = load_all(trio["aligned"])
    g = torch.Generator().manual_seed(5)
    adapter, merged = {}, dict(aligned)
    targets = [
        n
        for n in aligned
        if n.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight", "down_proj.weight"))
    ]
    for name in targets:
        d_out, d_in = aligned[name].shape
        a = 0.1 * torch.randn(rank, d_in, generator=g)
        b = 0.1 * torch.randn(d_out, rank, generator=g)
        module = name.removesuffix(".weight")
        adapter[f"base_model.model.{module}.lora_A.weight"] = a
        adapter[f"base_model.model.{module}.lora_B.weight"] = b
        merged[name] = (aligned[name].double() + (alpha / rank) * (b.double() @ a.double())).float()
    save_file(adapter, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": alpha,
                "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
            }
        )
    )
    return merged


def test_lora_adapter_equals_merged_checkpoint(trio, tmp_path):
    merged = make_lora(trio, tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    shutil.copytree(trio["aligned"], merged_dir)
    save_file(merged, str(merged_dir / "model.safetensors"), metadata={"format": "pt"})
    lora_trio = {"base": trio["base"], "aligned": trio["aligned"], "finetuned": tmp_path / "adapter"}
    full_trio = {"base": trio["base"], "aligned": trio["aligned"], "finetuned": merged_dir}
    for score_model in ("aligned", "finetuned"):
        r1 = run(lora_trio, tmp_path / f"from_lora_{score_model}", score_model=score_model)
        r2 = run(full_trio, tmp_path / f"from_merged_{score_model}", score_model=score_model)
        assert [n.id for n in r1.selected] == [n.id for n in r2.selected]
        a, b = (
            load_all(tmp_path / f"from_lora_{score_model}"),
            load_all(tmp_path / f"from_merged_{score_model}"),
        )
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- bad input: clear error, nothing written


def assert_refused(trio, tmp_path, match, harmful=HARMFUL, benign=BENIGN, exc=FGSNError):
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        apply_dimension(
            trio["base"],
            trio["aligned"],
            trio["finetuned"],
            harmful,
            benign,
            out,
            params=FGSNParams(**{**preset("activation"), "q": 20.0, "p": 10.0}),
        )
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".staging" in p.name]


def test_mismatched_shapes_are_named(tmp_path_factory, tmp_path):
    a = make_trio(tmp_path_factory.mktemp("wide"), "llama", intermediate=64)
    b = make_trio(tmp_path_factory.mktemp("narrow"), "llama", intermediate=48)
    mixed = {"base": a["base"], "aligned": a["aligned"], "finetuned": b["finetuned"]}
    with pytest.raises(IncompatibleCheckpointsError, match=r"intermediate_size.*64.*48"):
        ModelTrio.open(mixed["base"], mixed["aligned"], mixed["finetuned"])
    assert_refused(
        mixed, tmp_path, r"mlp\.gate_proj\.weight: shape \[64, 32\] in base, \[48, 32\] in finetuned"
    )


def test_missing_tensor_is_named(trio, tmp_path):
    broken = tmp_path / "ft"
    shutil.copytree(trio["finetuned"], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert_refused(
        {**trio, "finetuned": broken},
        tmp_path / "o",
        "model.layers.1.mlp.up_proj.weight is in base but missing from finetuned",
    )


def test_bin_only_folder_is_refused(trio, tmp_path):
    pickled = tmp_path / "ft"
    pickled.mkdir()
    shutil.copy(trio["finetuned"] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert_refused({**trio, "finetuned": pickled}, tmp_path / "o", "only pickled weights found.*refused")


def test_bad_prompt_files(tmp_path):
    from fgsn_daemon.core.errors import PromptFileError
    from fgsn_daemon.core.prompts import load_prompts

    cases = {
        "empty.jsonl": (b"", "empty"),
        "blank.jsonl": (b"\n\n", "empty"),
        "bad.jsonl": (b'{"prompt": "ok"}\n{"prompt": \n', r"bad.jsonl:2: not valid JSON"),
        "list.jsonl": (b'["a"]\n', r":1: expected a JSON object"),
        "noprompt.jsonl": (b'{"text": "a"}\n', r":1: 'prompt' must be a non-empty string"),
        "latin1.jsonl": ('{"prompt": "caf\u00e9"}\n'.encode("latin-1"), "not valid UTF-8"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(PromptFileError, match=match):
            load_prompts(tmp_path / name)
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "big.jsonl").write_bytes(b'{"prompt": "x"}\n' * 100)
    with pytest.raises(PromptFileError, match="over the 100-byte limit"):
        load_prompts(tmp_path / "big.jsonl", max_bytes=100)


def test_existing_output_is_not_overwritten(trio, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FGSNError, match="output exists"):
        run(trio, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_band_override_is_refused(trio, tmp_path):
    with pytest.raises(FGSNError, match="outside the model's layers"):
        run(trio, tmp_path / "out", band=(2, 99))
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors_header(tmp_path, trio):
    broken = tmp_path / "ft"
    shutil.copytree(trio["finetuned"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        Checkpoint(broken)


# ---------------------------------------------------------------- CUDA path (skipped without a GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("operator", ["safe_lora", "projector", "per_neuron", "restore"])
def test_cuda_matches_cpu(trio, tmp_path, operator):
    cpu = run(trio, tmp_path / "cpu", operator=operator, spaces=("mlp", "attn"))
    gpu = run(trio, tmp_path / "gpu", device="cuda", operator=operator, spaces=("mlp", "attn"))
    assert cpu.band == gpu.band
    overlap = {n.id for n in cpu.selected} & {n.id for n in gpu.selected}
    assert len(overlap) >= 0.9 * len(cpu.selected)  # scores may differ in the last bits on the GPU
    ft, out = load_all(trio["finetuned"]), load_all(tmp_path / "gpu")
    for name in ft:
        if name not in gpu.edited_tensors:
            assert torch.equal(ft[name], out[name])
    assert torch.isfinite(logits(tmp_path / "gpu", device="cuda")).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_projection_on_device_matches_reference(device):
    # The CPU case runs everywhere so that this test cannot rot unseen where no GPU is lent.
    from test_projection import dense_reference, random_triple, rel_err

    from fgsn_daemon.engine.projection import project_tensor

    t = random_triple(600, 64, seed=11)
    rows = [3, 300, 599]
    got = project_tensor("safe_lora", t, 0, rows, rank=4, device=device).cpu()
    ref = dense_reference("safe_lora", t.finetuned, t.aligned, t.base, 4)
    assert rel_err(got[rows], ref[rows]) < 1e-5
