"""The one registry helper: a name -> entry map with one way to add an entry, one error
for a name it lacks, and each name's metadata (its help line, and whatever its users read
before loading it: a file suffix, a CSV column).

An entry is registered as an object (`add`, `adder`) or by its import path
("package.module:attribute", `lazy`), imported the first time it is looked up. So a
registry of torch-using classes can list its names, help and metadata with no torch:
`--help` reads the names and help of every registry from the one list that also loads
them. Strategies (train/strategies.py), tasks (tasks/catalog.py), backbone sources
(models/backbones.py), export formats (deploy/formats.py), trackers (config.TRACKERS)
and inference engines (config.ENGINES) are each a `Registry`."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from visiontune.errors import ConfigError

T = TypeVar("T")
_UNLOADED: Any = object()


@dataclass
class Entry(Generic[T]):
    """One registered name: its help line, its metadata, and the entry itself or the
    import path ("module:attribute") it is loaded from."""

    name: str
    help: str = ""
    path: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    value: T = _UNLOADED

    @property
    def loaded(self) -> bool:
        return self.value is not _UNLOADED

    def load(self) -> T:
        if not self.loaded:
            module, _, attribute = self.path.partition(":")
            self.value = getattr(importlib.import_module(module), attribute)
        return self.value


class Registry(Mapping[str, T], Generic[T]):
    """`what`: the entries' kind, for the error ("strategy", "task", ...). Iterating,
    `names`, `help` and `meta` import nothing; looking an entry up loads it."""

    def __init__(self, what: str, entries: Mapping[str, T] | None = None) -> None:
        self.what = what
        self._entries: dict[str, Entry[T]] = {}
        for name, entry in (entries or {}).items():
            self.add(name, entry)

    def add(self, name: str, entry: T, help: str = "", **meta: Any) -> T:
        """Register `entry` itself as `name`; returns it."""
        self._entries[name] = Entry(name, help, meta=meta, value=entry)
        return entry

    def lazy(self, name: str, path: str, help: str = "", **meta: Any) -> None:
        """Register `name` by the import path ("module:attribute") it is loaded from."""
        if ":" not in path:
            raise ValueError(f"{path!r}: an import path is 'package.module:attribute'")
        self._entries[name] = Entry(name, help, path, meta)

    def adder(self, name: str, help: str = "", **meta: Any) -> Callable[[T], T]:
        """A decorator registering what it decorates as `name`."""
        return lambda entry: self.add(name, entry, help, **meta)

    def find(self, name: str) -> T:
        """The entry called `name` (loaded); ConfigError naming the choices otherwise."""
        if name not in self._entries:
            raise ConfigError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self)}")
        return self._entries[name].load()

    def __getitem__(self, name: str) -> T:
        return self._entries[name].load()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def pop(self, name: str) -> None:
        """Unregister `name` (a test's own entry)."""
        self._entries.pop(name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def help(self, name: str) -> str:
        """`name`'s help line (nothing is imported)."""
        return self._entries[name].help

    def meta(self, name: str) -> dict[str, Any]:
        """`name`'s metadata (nothing is imported)."""
        return self._entries[name].meta

    def loaded(self, name: str) -> bool:
        """Whether `name`'s entry is in memory (registered as itself, or looked up once)."""
        return self._entries[name].loaded

    def describe(self, width: int = 16) -> str:
        """One line per name and its help (for --help epilogs and choices' help)."""
        return "\n".join(f"  {name:<{width}} {entry.help}" for name, entry in self._entries.items())

    def choices_help(self) -> str:
        """'name (help), name (help)': the choices in one help sentence."""
        return ", ".join(f"{name} ({entry.help})" if entry.help else name for name, entry in self._entries.items())
