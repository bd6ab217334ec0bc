"""Name -> class registries with a checked base class and lazy imports.

Entries are registered as "module:Class" strings so that listing the registry (e.g. to validate a
config or expand the grid) does not import torch-heavy modules; the class is imported on first use
and checked against the registry's base class.
"""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

from harness.errors import ConfigError, valid_names

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, base: str):
        self.kind = kind
        self._base = base  # "module:Class" of the required base class
        self._entries: dict[str, str | type] = {}

    def add(self, name: str, target: str | type) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = target

    def register(self, name: str):
        """Decorator form: @REGISTRY.register("name")."""

        def wrap(cls):
            self.add(name, cls)
            return cls

        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> type[T]:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}{valid_names(name, self.names())}")
        target = self._entries[name]
        if isinstance(target, str):
            target = _import(target)
            self._entries[name] = target
        base = _import(self._base)
        if not (isinstance(target, type) and issubclass(target, base)):
            raise TypeError(f"{self.kind} {name!r} -> {target!r} is not a subclass of {base.__name__}")
        return target


def _import(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
