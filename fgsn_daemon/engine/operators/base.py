"""The operator registry: every projection operator is a small class registered by name.

An operator gives new values to selected neuron slices, ``W_new[M] = W_aligned[M] + Op(ΔW)[M]``,
from the fine-tuning delta ``ΔW = W_finetuned − W_aligned`` and the safety direction
``V = W_aligned − W_base`` (``fgsn_daemon.engine.projection`` runs it block by block in float64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from fgsn_daemon.core.errors import ConfigError

if TYPE_CHECKING:
    import torch


class Operator:
    """Base class: subclass, set ``name``, implement ``block`` (and ``prepare`` for per-tensor
    work shared by the blocks), decorate with ``@register``."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    # the slices simply take their aligned values (no float64 pass; entries and neurons alike)
    copies_aligned: ClassVar[bool] = False

    def prepare(self, v: torch.Tensor, delta: torch.Tensor, rank: int) -> Any:
        """Per-tensor state shared by every block (2-D float64 ``v`` and ``delta``)."""
        return None

    def block(
        self, state: Any, v: torch.Tensor, delta: torch.Tensor, axis: int, lo: int, hi: int
    ) -> torch.Tensor:
        """Op(ΔW) for neurons ``lo..hi-1``: rows (axis 0) or columns (axis 1), float64. The value of
        a neuron must depend only on its fixed block, never on which other neurons are selected
        (rollback equals a from-scratch run bit for bit)."""
        raise ConfigError(f"operator {self.name!r} has no block form")


_REGISTRY: dict[str, Operator] = {}


def register(cls: type[Operator]) -> type[Operator]:
    """Class decorator: make ``cls`` available under ``cls.name`` everywhere an operator is chosen."""
    name = getattr(cls, "name", "")
    if not name or not name.replace("_", "").isalnum() or not name[0].isalpha() or name != name.lower():
        raise ConfigError(f"an operator name must be a lower-case identifier (got {name!r})")
    if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
        raise ConfigError(f"operator {name!r} is already registered by {type(_REGISTRY[name]).__qualname__}")
    _REGISTRY[name] = cls()
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_operator(name: str) -> Operator:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(f"'{n}'" for n in operator_names())
        raise ConfigError(f"unknown projection operator {name!r} (choose from {known})") from None


def operator_names() -> list[str]:
    return sorted(_REGISTRY)
