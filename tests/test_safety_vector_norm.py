"""benchmarks/safety_vector_norm.py against a dense float64 reference on a tiny trio."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import load_benchmark, make_trio
from safetensors.torch import load_file

from fgsn_daemon.engine.pipeline import ModelTrio


def test_the_ratio_equals_the_norms_of_the_stacked_differences(tmp_path: Path) -> None:
    norm = load_benchmark("safety_vector_norm")
    paths = make_trio(tmp_path, "llama")
    weights = {k: load_file(str(p / "model.safetensors")) for k, p in paths.items()}
    trio = ModelTrio.open(paths["base"], paths["aligned"], paths["finetuned"])
    try:
        found = norm.ratios(norm.squared_norms(trio))
        spaces, layers = trio.spec.neuron_spaces, range(trio.num_layers)
        names = [n for s in spaces for i in layers for n, _ in trio.space_tensors(i, s)]
    finally:
        trio.close()
    assert names and all(w.dim() == 2 for w in (weights["aligned"][n] for n in names))

    def stacked(a: str, b: str) -> torch.Tensor:
        return torch.cat([(weights[a][n].double() - weights[b][n].double()).flatten() for n in names])

    want = stacked("aligned", "base").norm() / stacked("aligned", "finetuned").norm()
    assert abs(found["all"] - float(want)) < 1e-9
    assert set(found) == {*trio.spec.neuron_spaces, "all"}
    # the helper trio perturbs both stages alike: the ratio is near 1, not near 0
    assert 0.5 < found["all"] < 2.0
