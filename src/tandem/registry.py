"""One registry type for every kind of plugin: codecs, strategies, workloads and commands.

A plugin is one file with a decorator::

    from tandem.codecs import CODECS

    @CODECS.register
    class MyCodec(Codec):
        name = "mycodec"
        ...

The registry of a kind knows its package (``tandem.codecs``) and imports every module under it the
first time anyone looks a name up, so a new file needs no import line anywhere else. Lookups of
unknown names raise :class:`~tandem.errors.ConfigError` listing the known ones, which is what the
CLI, the YAML validation (:mod:`tandem.resolve`) and ``tandem codecs|strategies|workloads`` read.

Discovery imports modules by name at run time (``importlib``), so a package's ``__init__`` never
imports its plugin modules statically and no import cycle forms between a registry and its
plugins.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

from tandem.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> plugin for one kind; ``package``: where its plugin modules live."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._discovered = package is None
        self._lock = threading.RLock()

    # ---- registering ---------------------------------------------------------------------------
    @overload
    def register(self, obj: T) -> T: ...
    @overload
    def register(self, obj: None = None, *, name: str | None = None) -> Callable[[T], T]: ...

    def register(self, obj: T | None = None, *, name: str | None = None) -> Any:
        """Decorator: ``@REG.register`` (the name is ``obj.name``) or
        ``@REG.register(name="x")``. Registering a second plugin under a taken name is an error
        (two files claiming one name would otherwise shadow each other silently)."""

        def add(item: T) -> T:
            key = name or getattr(item, "name", None)
            if not key or not isinstance(key, str):
                raise ValueError(f"{self.kind} {item!r} has no name: give it a `name` attribute "
                                 "or register(name=...)")
            with self._lock:
                old = self._items.get(key)
                if old is not None and old is not item and _origin(old) != _origin(item):
                    raise ValueError(f"{self.kind} {key!r} is registered twice: {_origin(old)} "
                                     f"and {_origin(item)}")
                self._items[key] = item
            return item

        return add(obj) if obj is not None else add

    # ---- looking up ----------------------------------------------------------------------------
    def discover(self) -> None:
        """Import every module of the package (once), so that their decorators have run."""
        if self._discovered:
            return
        with self._lock:
            if self._discovered:
                return
            assert self.package is not None
            pkg = importlib.import_module(self.package)
            for mod in pkgutil.walk_packages(pkg.__path__, prefix=f"{self.package}."):
                if not mod.name.rsplit(".", 1)[-1].startswith("_"):
                    importlib.import_module(mod.name)
            self._discovered = True

    def get(self, name: str) -> T:
        self.discover()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of "
                              f"{self.names()}") from None

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.discover()
        return len(self._items)

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self.discover()
        return sorted(self._items.items())

    def values(self) -> list[T]:
        return [v for _, v in self.items()]


def _origin(item: Any) -> str:
    return f"{getattr(item, '__module__', '?')}.{getattr(item, '__qualname__', repr(item))}"
