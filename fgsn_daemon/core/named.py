"""A registry of named method classes (scorings, operators): register with a class decorator, look
up by name with an error that lists the choices. The engine's method packages each hold one."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from fgsn_daemon.core.errors import ConfigError

T = TypeVar("T")


class NamedRegistry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind  # what a member is called in messages: "scoring", "projection operator"
        self._members: dict[str, T] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: an instance of ``cls`` is available under ``cls.name``."""
        name = getattr(cls, "name", "")
        if not name or not name.replace("_", "").isalnum() or not name[0].isalpha() or name != name.lower():
            raise ConfigError(f"a {self.kind} name must be a lower-case identifier (got {name!r})")
        taken = self._members.get(name)
        if taken is not None and type(taken) is not cls:
            raise ConfigError(f"{self.kind} {name!r} is already registered by {type(taken).__qualname__}")
        self._members[name] = cls()
        return cls

    def unregister(self, name: str) -> None:
        """Remove a member (tests that register their own)."""
        self._members.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._members[name]
        except KeyError:
            known = ", ".join(f"'{n}'" for n in self.names())
            raise ConfigError(f"unknown {self.kind} {name!r} (choose from {known})") from None

    def names(self, where: Callable[[T], Any] | None = None) -> list[str]:
        """Registered names, sorted; ``where`` filters."""
        return sorted(n for n, m in self._members.items() if where is None or where(m))


def import_members(package: str, path: Iterable[str], skip: str) -> None:
    """Import every module of a method package except its shared one (``skip``): importing a
    module runs its ``@register`` decorators, so a new file is all a new member needs."""
    for module in pkgutil.iter_modules(path):
        if module.name != skip:
            importlib.import_module(f"{package}.{module.name}")
