"""Entry mask files: bit-packed, content-addressed, verified on load; restriction and union."""

from __future__ import annotations

import pytest
import torch

from fgsn_daemon.core.errors import FGSNError
from fgsn_daemon.core.records import NeuronId
from fgsn_daemon.engine.entry_masks import (
    load_masks,
    load_masks_and_units,
    per_neuron_counts,
    restrict_to_neurons,
    save_masks,
    union,
)

UNITS = {"l0.gate": (0, "mlp", 0), "l0.down": (0, "mlp", 1)}


def masks(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"l0.gate": torch.rand(6, 5, generator=g) > 0.7, "l0.down": torch.rand(5, 6, generator=g) > 0.7}


def test_round_trip_is_exact_and_named_by_content(tmp_path):
    m = masks(0)
    digest = save_masks(tmp_path, m, UNITS)
    assert (tmp_path / f"{digest}.safetensors").is_file()
    back, units = load_masks_and_units(tmp_path, digest)
    assert all(torch.equal(back[k], m[k]) for k in m) and units == UNITS
    assert save_masks(tmp_path, m, UNITS) == digest  # same content, same name, kept
    assert save_masks(tmp_path, masks(1), UNITS) != digest


def test_a_flipped_bit_or_a_missing_file_is_detected(tmp_path):
    digest = save_masks(tmp_path, masks(0), UNITS)
    path = tmp_path / f"{digest}.safetensors"
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header] ^= 0x80  # the first bit of the first tensor's packed bits
    path.write_bytes(bytes(data))
    with pytest.raises(FGSNError, match="corrupted"):
        load_masks(tmp_path, digest)
    with pytest.raises(FGSNError, match="missing"):
        load_masks(tmp_path, "0" * 64)


def test_restriction_keeps_only_the_owned_neurons_along_each_axis_and_union_merges():
    m = {"l0.gate": torch.ones(4, 3, dtype=torch.bool), "l0.down": torch.ones(3, 4, dtype=torch.bool)}
    part = restrict_to_neurons(m, [NeuronId(0, "mlp", 1)], UNITS)
    assert part["l0.gate"].sum() == 3 and part["l0.gate"][1].all()  # row 1
    assert part["l0.down"].sum() == 3 and part["l0.down"][:, 1].all()  # column 1
    other = restrict_to_neurons(m, [NeuronId(0, "mlp", 2)], UNITS)
    both = union([part, other])
    assert both["l0.gate"].sum() == 6 and both["l0.down"].sum() == 6
    assert per_neuron_counts(both, UNITS) == {NeuronId(0, "mlp", 1): 6, NeuronId(0, "mlp", 2): 6}
    assert restrict_to_neurons(m, [NeuronId(1, "mlp", 0)], UNITS) == {}


def test_the_stored_union_equals_the_loaded_union_and_checks_every_file(tmp_path):
    from fgsn_daemon.engine.entry_masks import StoredMaskUnion

    parts = [masks(0), masks(1), {"l0.gate": masks(2)["l0.gate"]}]  # the last file has one tensor
    digests = [save_masks(tmp_path, m, UNITS) for m in parts]
    stored = StoredMaskUnion(tmp_path, digests)
    eager = union([load_masks(tmp_path, d) for d in digests])
    assert sorted(stored) == sorted(eager) and len(stored) == 2
    assert all(torch.equal(stored[k], eager[k]) for k in eager)
    assert "l0.gate" in stored and "l9.up" not in stored
    with pytest.raises(KeyError):
        stored["l9.up"]
    path = tmp_path / f"{digests[1]}.safetensors"
    data = bytearray(path.read_bytes())
    data[8 + int.from_bytes(data[:8], "little")] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(FGSNError, match="corrupted"):
        StoredMaskUnion(tmp_path, digests)
    with pytest.raises(FGSNError, match="missing"):
        StoredMaskUnion(tmp_path, ["0" * 64])
