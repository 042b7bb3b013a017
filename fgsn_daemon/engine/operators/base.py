"""The operator registry: every projection operator is a small class registered by name.

An operator gives new values to selected neuron slices, ``W_new[M] = W_aligned[M] + Op(ΔW)[M]``,
from the fine-tuning delta ``ΔW = W_finetuned − W_aligned`` and the safety direction
``V = W_aligned − W_base`` (``fgsn_daemon.engine.projection`` runs it block by block in float64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.core.named import NamedRegistry

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


OPERATORS: NamedRegistry[Operator] = NamedRegistry("projection operator")


def register(cls: type[Operator]) -> type[Operator]:
    """Class decorator: make ``cls`` available under ``cls.name`` everywhere an operator is chosen."""
    return OPERATORS.register(cls)


def unregister(name: str) -> None:
    OPERATORS.unregister(name)


def get_operator(name: str) -> Operator:
    return OPERATORS.get(name)


def operator_names() -> list[str]:
    return OPERATORS.names()
