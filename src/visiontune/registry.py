"""The one registry helper: a name -> entry map with one way to add an entry and one error
for a name it lacks. Strategies (train/strategies.py), tasks (tasks/catalog.py), backbone
sources (models/backbones.py), export formats (deploy/export.py) and trackers
(config.TRACKERS for the names --track accepts, train/tracking.py for their classes) are
each a `Registry`. No torch: config and --help read registries."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from visiontune.errors import ConfigError

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """`what`: the entries' kind, for the error ("strategy", "task", ...)."""

    def __init__(self, what: str, entries: Mapping[str, T] | None = None) -> None:
        super().__init__(entries or {})
        self.what = what

    def add(self, name: str, entry: T) -> T:
        self[name] = entry
        return entry

    def adder(self, name: str) -> Callable[[T], T]:
        """A decorator registering what it decorates as `name`."""
        return lambda entry: self.add(name, entry)

    def find(self, name: str) -> T:
        """The entry called `name`; ConfigError naming the choices otherwise."""
        if name not in self:
            raise ConfigError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self)}")
        return self[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self)
