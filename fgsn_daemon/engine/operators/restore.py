"""``restore``: the selected slices take their aligned values."""

from __future__ import annotations

from fgsn_daemon.engine.operators.base import Operator, register


@register
class Restore(Operator):
    name = "restore"
    summary = "put the selected slices back to their aligned values"
    copies_aligned = True
