"""Architecture specs as data: where the layers are and which tensor axes form a neuron.

Each ``<family>.json`` beside this file describes one model family. A *neuron space* groups the
tensor slices that move together when one neuron is edited (e.g. for ``mlp``: gate and up rows
and the matching down column) and names the module whose *input* is that neuron's activation,
so a forward pre-hook there observes every neuron of the space at once.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fgsn_daemon.core.errors import CheckpointError


class TensorSlot(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str  # relative to the layer prefix
    axis: int = Field(ge=0, le=1)  # the axis indexed by the neuron


class NeuronSpace(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    description: str
    hook_module: str  # relative to the layer module; its input is the neuron activation
    tensors: list[TensorSlot]
    optional_tensors: list[TensorSlot] = []
    output_tensor: str  # weight read by the Wanda score (columns = neurons)


class ArchitectureSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    family: str
    model_types: list[str]
    architectures: list[str]
    layer_prefix: str
    layers_module: str
    neuron_spaces: dict[str, NeuronSpace]

    def tensor_name(self, layer: int, relative: str) -> str:
        return self.layer_prefix.format(layer=layer) + relative

    def space(self, name: str) -> NeuronSpace:
        try:
            return self.neuron_spaces[name]
        except KeyError:
            known = ", ".join(sorted(self.neuron_spaces))
            raise CheckpointError(
                f"neuron space {name!r} is not defined for {self.family} (known: {known})"
            ) from None


@cache
def available_specs() -> dict[str, ArchitectureSpec]:
    specs: dict[str, ArchitectureSpec] = {}
    for entry in resources.files(__name__).iterdir():
        if entry.name.endswith(".json"):
            spec = ArchitectureSpec.model_validate(json.loads(entry.read_text(encoding="utf-8")))
            specs[spec.family] = spec
    return specs


def spec_for_config(config: dict[str, Any]) -> ArchitectureSpec:
    """Pick the spec matching a Hugging Face ``config.json`` (by model_type, then architectures)."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    for spec in available_specs().values():
        if model_type in spec.model_types or any(a in spec.architectures for a in archs):
            return spec
    known = ", ".join(sorted(available_specs()))
    raise CheckpointError(
        f"unsupported architecture (model_type={model_type!r}, architectures={archs}); "
        f"supported families: {known}. Add a spec file to fgsn_daemon/engine/architectures/ to support it."
    )
