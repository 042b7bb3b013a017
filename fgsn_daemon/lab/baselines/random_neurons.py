"""Random neurons at FGSN's budget: the same per-(layer, space) counts and band as an FGSN run,
random indices, projected with the same operator (the control FGSN must beat)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.core.records import Band, NeuronId
from fgsn_daemon.engine.pipeline import ModelTrio
from fgsn_daemon.lab.baselines.common import (
    Baseline,
    BaselineInputs,
    BaselineResult,
    neuron_baseline,
    neuron_counts,
    random_indices,
    register,
    space_size,
)


def random_neurons(
    trio: ModelTrio,
    out: str | Path,
    selection: Mapping[int, int] | Mapping[tuple[int, str], int | Sequence[int]] | Iterable[NeuronId],
    band: Band,
    operator: str = "safe_lora",
    seed: int = 0,
    rank: int = 8,
) -> BaselineResult:
    """Random neurons at FGSN's budget: for each (layer, space) of ``selection`` (counts, or the
    FGSN selection itself), as many random neurons of that layer and space, projected with the
    same ``operator`` through the engine's writer. Deterministic for a given ``seed``."""
    counts = neuron_counts(selection)
    neurons: dict[tuple[int, str], list[int]] = {}
    for (layer, space), count in sorted(counts.items()):
        if layer not in band.layers:
            raise ConfigError(f"layer {layer} of the selection is outside the band {band.start}-{band.end}")
        neurons[(layer, space)] = random_indices(space_size(trio, layer, space), count, seed, layer, space)
    spaces = sorted({s for _, s in neurons})
    return neuron_baseline(
        trio,
        out,
        "random_neurons",
        neurons,
        operator,
        band,
        spaces,
        rank,
        {"operator": operator, "seed": seed, "band": [band.start, band.end]},
    )


@register
class RandomNeurons(Baseline):
    name = "random_neurons"
    label = "random neurons"
    seeded = True

    def write(self, inputs: BaselineInputs, out: Path) -> BaselineResult:
        if inputs.neurons is None:
            raise ConfigError("random_neurons needs FGSN's selection to match its counts")
        return random_neurons(
            inputs.trio,
            out,
            inputs.neurons,
            self.need_band(inputs),
            operator=inputs.operator,
            seed=inputs.seed,
            rank=inputs.rank,
        )
