"""Baselines on tiny random trios, each against a dense float64 reference computed here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_trio
from safetensors.torch import load_file

from fgsn_daemon.core.errors import ConfigError, FGSNError
from fgsn_daemon.core.records import Band, NeuronId
from fgsn_daemon.engine.pipeline import ModelTrio
from fgsn_daemon.lab.baselines import (
    DEFAULT_MODULES,
    linear_modules,
    neuron_counts,
    random_indices,
    random_neurons,
    resta,
    restore_band,
    safe_lora,
)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def paths(request, tmp_path_factory) -> dict[str, Path]:
    return make_trio(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture
def trio(paths):
    t = ModelTrio.open(paths["base"], paths["aligned"], paths["finetuned"])
    yield t
    t.close()


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def weights(paths: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: load_all(v) for k, v in paths.items()}


def dense_safe_lora(ft: torch.Tensor, al: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The textbook form: build C = V Vᵀ/‖V‖_F explicitly (a 1-D bias as a column, as the engine does)."""
    shape = ft.shape
    ft, al, base = (t.double().reshape(shape[0], -1) for t in (ft, al, base))
    v, delta = al - base, ft - al
    c = v @ v.T / torch.linalg.norm(v)
    cd = c @ delta
    cos = float(torch.nn.functional.cosine_similarity(cd.flatten(), delta.flatten(), dim=0))
    return (al + cd).reshape(shape), cos


def assert_loads(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[2, 5, 9, 11, 3]])).logits
    assert torch.isfinite(logits).all()


def test_safe_lora_matches_dense_reference(paths, trio, tmp_path):
    w = weights(paths)
    names = linear_modules(trio, DEFAULT_MODULES)
    assert len(names) == 7 * trio.num_layers
    ref = {n: dense_safe_lora(w["finetuned"][n], w["aligned"][n], w["base"][n]) for n in names}
    cosines = sorted(c for _, c in ref.values())
    mid = len(cosines) // 2  # τ halfway between two cosines: half the modules on each side, no ties
    tau = (cosines[mid - 1] + cosines[mid]) / 2
    result = safe_lora(trio, tmp_path / "out", tau=tau)
    want = {n for n, (_, c) in ref.items() if c <= tau}
    assert 0 < len(want) < len(names)
    assert set(result.edited_tensors) == want
    for m in result.modules:
        assert m.cosine == pytest.approx(ref[m.name][1], abs=1e-9)
        assert m.projected == (m.name in want)
    out = load_all(tmp_path / "out")
    assert set(out) == set(w["finetuned"])
    for name, tensor in w["finetuned"].items():
        if name in want:
            torch.testing.assert_close(out[name], ref[name][0].float(), rtol=1e-5, atol=1e-6)
            assert not torch.equal(out[name], tensor)
        else:
            assert torch.equal(out[name], tensor), f"{name} should be bit-identical"
    total = sum(t.numel() for t in w["finetuned"].values())
    assert result.modified_parameters == sum(w["finetuned"][n].numel() for n in want)
    assert result.share_modified == pytest.approx(result.modified_parameters / total)
    assert result.total_parameters == total
    assert 0 < result.changed_parameters <= result.modified_parameters
    assert_loads(tmp_path / "out")


def test_safe_lora_top_k_picks_lowest_cosines(trio, tmp_path):
    result = safe_lora(trio, tmp_path / "out", top_k=3)
    scored = sorted((m.cosine, m.name) for m in result.modules if m.cosine is not None)
    assert set(result.edited_tensors) == {n for _, n in scored[:3]}


def test_safe_lora_skips_module_without_delta(paths, tmp_path):
    # a fine-tuned copy in which one module was not trained: ΔW = 0, nothing to project
    from helpers import perturb
    from safetensors.torch import save_file

    ft = tmp_path / "ft"
    perturb(paths["aligned"], ft, seed=5)
    tensors = load_all(ft)
    target = "model.layers.0.self_attn.q_proj.weight"
    tensors[target] = load_all(paths["aligned"])[target]
    for f in ft.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(ft / "model.safetensors"), metadata={"format": "pt"})
    t = ModelTrio.open(paths["base"], paths["aligned"], ft)
    try:
        result = safe_lora(t, tmp_path / "out", tau=1.0)
    finally:
        t.close()
    by_name = {m.name: m for m in result.modules}
    assert by_name[target].cosine is None and not by_name[target].projected
    assert target not in result.edited_tensors
    assert len(result.edited_tensors) == len(result.modules) - 1  # τ = 1 projects every other one


def test_resta_matches_dense_reference(paths, trio, tmp_path):
    w = weights(paths)
    result = resta(trio, tmp_path / "out", beta=0.7)
    out = load_all(tmp_path / "out")
    for name, ft in w["finetuned"].items():
        want = ft.double() + 0.7 * (w["aligned"][name].double() - w["base"][name].double())
        torch.testing.assert_close(out[name].double(), want, rtol=0, atol=1e-6)
    total = sum(t.numel() for t in w["finetuned"].values())
    assert result.modified_parameters == total and result.share_modified == 1.0
    assert_loads(tmp_path / "out")


def test_resta_beta_zero_is_the_finetuned_model(paths, trio, tmp_path):
    result = resta(trio, tmp_path / "out", beta=0.0)
    out, ft = load_all(tmp_path / "out"), load_all(paths["finetuned"])
    assert all(torch.equal(out[n], ft[n]) for n in ft)
    assert result.changed_parameters == 0


SELECTION = {(1, "mlp"): [3, 5, 7], (2, "mlp"): 4, (2, "attn"): 2}
BAND = Band(start=1, end=2, source="override")


def neuron_mask(trio: ModelTrio, neurons: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    masks: dict[str, torch.Tensor] = {}
    for key, idx in neurons.items():
        layer, space = key.split(":")
        for name, axis in trio.space_tensors(int(layer), space):
            info = trio.aligned.info(name)
            m = masks.setdefault(name, torch.zeros(info.shape, dtype=torch.bool))
            if axis == 0:
                m[idx] = True
            else:
                m[:, idx] = True
    return masks


def test_random_neurons_same_budget_deterministic_and_projected(paths, trio, tmp_path):
    w = weights(paths)
    a = random_neurons(trio, tmp_path / "a", SELECTION, BAND, operator="safe_lora", seed=0)
    b = random_neurons(trio, tmp_path / "b", SELECTION, BAND, operator="safe_lora", seed=0)
    c = random_neurons(trio, tmp_path / "c", SELECTION, BAND, operator="safe_lora", seed=1)
    assert {k: len(v) for k, v in a.neurons.items()} == {"1:mlp": 3, "2:mlp": 4, "2:attn": 2}
    assert a.neurons == b.neurons and a.neurons != c.neurons
    shards = [sorted((tmp_path / d).glob("*.safetensors")) for d in ("a", "b")]
    assert [f.read_bytes() for f in shards[0]] == [f.read_bytes() for f in shards[1]]
    out = load_all(tmp_path / "a")
    masks = neuron_mask(trio, a.neurons)
    for name, ft in w["finetuned"].items():
        if name not in masks:
            assert torch.equal(out[name], ft), f"{name} should be bit-identical"
            continue
        assert torch.equal(out[name][~masks[name]], ft[~masks[name]])
        dense, _ = dense_safe_lora(ft, w["aligned"][name], w["base"][name])  # C·ΔW, then keep the slices
        torch.testing.assert_close(out[name][masks[name]], dense.float()[masks[name]], rtol=1e-5, atol=1e-6)
    per_neuron = {  # entries per neuron: gate+up rows and a down column; q row and an o column
        "mlp": sum(
            trio.aligned.info(n).numel // trio.aligned.info(n).shape[ax]
            for n, ax in trio.space_tensors(1, "mlp")
        ),
        "attn": sum(
            trio.aligned.info(n).numel // trio.aligned.info(n).shape[ax]
            for n, ax in trio.space_tensors(1, "attn")
        ),
    }
    assert a.modified_parameters == 7 * per_neuron["mlp"] + 2 * per_neuron["attn"]
    assert a.share_modified == pytest.approx(a.modified_parameters / a.total_parameters)
    assert_loads(tmp_path / "a")


def test_random_indices_are_stable_per_layer():
    first = random_indices(64, 5, seed=3, layer=2, space="mlp")
    assert first == random_indices(64, 5, seed=3, layer=2, space="mlp")
    assert first == sorted(set(first)) and len(first) == 5 and all(0 <= i < 64 for i in first)
    assert first != random_indices(64, 5, seed=3, layer=3, space="mlp")
    with pytest.raises(ConfigError):
        random_indices(4, 5, seed=0, layer=0, space="mlp")


def test_neuron_counts_accepts_every_selection_form():
    ids = [NeuronId(1, "mlp", 3), NeuronId(1, "mlp", 9), NeuronId(2, "attn", 0)]
    assert neuron_counts(ids) == {(1, "mlp"): 2, (2, "attn"): 1}
    assert neuron_counts({1: 4, 2: 1}) == {(1, "mlp"): 4, (2, "mlp"): 1}
    assert neuron_counts({(1, "mlp"): [3, 3, 5]}) == {(1, "mlp"): 2}


def test_random_neurons_rejects_layers_outside_band(trio, tmp_path):
    with pytest.raises(ConfigError, match="outside the band"):
        random_neurons(trio, tmp_path / "out", {0: 2}, BAND)
    assert not (tmp_path / "out").exists()


def test_restore_band_equals_aligned_inside_band(paths, trio, tmp_path):
    w = weights(paths)
    result = restore_band(trio, tmp_path / "out", BAND, spaces=("mlp",))
    out = load_all(tmp_path / "out")
    band_names = {n for layer in BAND.layers for n, _ in trio.space_tensors(layer, "mlp")}
    assert set(result.edited_tensors) == band_names
    for name, ft in w["finetuned"].items():
        want = w["aligned"][name] if name in band_names else ft
        assert torch.equal(out[name], want), name
    assert result.modified_parameters == sum(w["aligned"][n].numel() for n in band_names)
    width = trio.aligned.info("model.layers.1.mlp.up_proj.weight").shape[0]
    assert result.neurons["1:mlp"] == list(range(width))
    assert_loads(tmp_path / "out")


def test_existing_output_is_refused(trio, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FGSNError, match="output exists"):
        resta(trio, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_baselines_are_a_registry_and_a_new_one_plugs_in_from_a_test_module(trio, tmp_path):
    """The four baselines are registered by name; one registered here is listed by the harnesses
    and runs through the same interface, with nothing else edited."""
    from fgsn_daemon.lab import baselines
    from fgsn_daemon.lab.efficacy import baseline_choices

    assert baselines.baseline_names() == ["random_neurons", "resta", "restore_band", "safe_lora"]
    inputs = baselines.BaselineInputs(trio=trio, options={"beta": 0.25})
    via_registry = baselines.get_baseline("resta").write(inputs, tmp_path / "registry")
    direct = resta(trio, tmp_path / "direct", beta=0.25)
    assert via_registry.params == direct.params
    assert load_all(tmp_path / "registry").keys() == load_all(tmp_path / "direct").keys()
    for name, t in load_all(tmp_path / "registry").items():
        assert torch.equal(t, load_all(tmp_path / "direct")[name]), name
    with pytest.raises(ConfigError, match="needs FGSN's selection"):
        baselines.get_baseline("random_neurons").write(inputs, tmp_path / "random")

    @baselines.register
    class Untouched(baselines.Baseline):
        name = "untouched_test"
        label = "fine-tuned, unchanged"

        def write(self, inputs: baselines.BaselineInputs, out: Path) -> baselines.BaselineResult:
            return baselines.get_baseline("resta").write(
                baselines.BaselineInputs(trio=inputs.trio, options={"beta": 0.0}), out
            )

    try:
        assert "untouched_test" in baseline_choices()
        res = baselines.get_baseline("untouched_test").write(inputs, tmp_path / "untouched")
        assert res.changed_parameters == 0
    finally:
        baselines.BASELINES.unregister("untouched_test")
    assert "untouched_test" not in baselines.baseline_names()
