"""Post-hoc safety baselines, written with the same streaming checkpoint writer as FGSN, one module
each, registered by name (see ``common.Baseline``).

Each baseline is a pure function of the three immutable checkpoints (base, aligned, fine-tuned)
and writes a loadable model folder; untouched tensors are copied byte for byte, so the share of
parameters modified is counted the same way for every method (denominator: all parameters
stored in the fine-tuned checkpoint). To add one, copy ``resta.py``: a function that writes the
checkpoint and a ``Baseline`` subclass decorated with ``@register``; the harnesses list it with
no other file touched.
"""

from fgsn_daemon.core.named import import_members
from fgsn_daemon.lab.baselines.common import (
    BASELINES,
    DEFAULT_MODULES,
    Baseline,
    BaselineInputs,
    BaselineResult,
    ModuleCosine,
    baseline_names,
    get_baseline,
    linear_modules,
    neuron_counts,
    random_indices,
    register,
    resta_tensor,
    safe_lora_update,
)
from fgsn_daemon.lab.baselines.random_neurons import random_neurons
from fgsn_daemon.lab.baselines.resta import resta
from fgsn_daemon.lab.baselines.restore_band import restore_band
from fgsn_daemon.lab.baselines.safe_lora import safe_lora

import_members(__name__, __path__, skip="common")

__all__ = [
    "BASELINES",
    "DEFAULT_MODULES",
    "Baseline",
    "BaselineInputs",
    "BaselineResult",
    "ModuleCosine",
    "baseline_names",
    "get_baseline",
    "linear_modules",
    "neuron_counts",
    "random_indices",
    "random_neurons",
    "register",
    "resta",
    "resta_tensor",
    "restore_band",
    "safe_lora",
    "safe_lora_update",
]
