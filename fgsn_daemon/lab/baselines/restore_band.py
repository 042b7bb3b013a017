"""Every neuron of the band set back to its aligned value (the most FGSN could restore there)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fgsn_daemon.core.records import Band
from fgsn_daemon.engine.pipeline import ModelTrio
from fgsn_daemon.lab.baselines.common import (
    Baseline,
    BaselineInputs,
    BaselineResult,
    neuron_baseline,
    register,
    space_size,
)


def restore_band(
    trio: ModelTrio, out: str | Path, band: Band, spaces: Sequence[str] = ("mlp",)
) -> BaselineResult:
    """Every neuron of ``spaces`` in the band layers set back to its aligned value."""
    neurons = {
        (layer, space): list(range(space_size(trio, layer, space)))
        for layer in band.layers
        for space in spaces
    }
    return neuron_baseline(
        trio,
        out,
        "restore_band",
        neurons,
        "restore",
        band,
        spaces,
        8,
        {"band": [band.start, band.end], "spaces": list(spaces)},
    )


@register
class RestoreBand(Baseline):
    name = "restore_band"
    label = "restore the band"

    def write(self, inputs: BaselineInputs, out: Path) -> BaselineResult:
        return restore_band(inputs.trio, out, self.need_band(inputs), inputs.spaces)
