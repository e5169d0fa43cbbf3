"""Name registries for plugins (methods, formats, objectives, exporters, engines, ...).

A plugin registers itself where it is defined::

    METHODS = Registry("method", package="lmwright.methods")

    @METHODS.register("lora")
    class LoRA: ...

On the first lookup a registry imports every module of its ``package`` so that adding a plugin is
adding a file: no stage and no CLI code changes. Lookups of unknown names fail with the closest
valid names.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def suggest(name: str, choices: list[str]) -> str:
    """' Did you mean X?' or '' (used by the registry and the config loader)."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry:
    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package
        self._items: dict[str, Any] = {}
        self._loaded = package is None

    def register(self, name: str, obj: Any = None) -> Callable[[Any], Any] | Any:
        def deco(o: Any) -> Any:
            if name in self._items and self._items[name] is not o:
                raise RegistryError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = o
            return o

        return deco(obj) if obj is not None else deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)  # type: ignore[arg-type]
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str) -> Any:
        self._load()
        if name not in self._items:
            names = sorted(self._items)
            raise RegistryError(
                f"unknown {self.kind} '{name}'.{suggest(name, names)} Valid {self.kind}s: {', '.join(names)}"
            )
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, Any]]:
        self._load()
        return iter(sorted(self._items.items()))
