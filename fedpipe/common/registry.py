"""Registry of pluggable classes, by family and ``name``.

Every pluggable base class (optimizer module, regularizer, scheduler, aggregator, model,
metric) declares a ``family``; every concrete subclass that defines its own ``name`` ClassVar
is registered under ``(family, name)`` when the class is created. A TOML config can then say
``modules = [["adam", {beta_1 = 0.9}], "l2-clipping"]``.

Classes of the user's own package register the same way when their module is imported: see
:mod:`fedpipe.common.plugins` (a lookup of an unknown name loads the installed entry points).
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from fedpipe.common.plugins import HOW_TO_LOAD, load_entry_points

__all__ = [
    "DuplicateNameError",
    "Registrable",
    "UnknownNameError",
    "build",
    "families",
    "get_class",
    "names",
    "register",
]


class UnknownNameError(KeyError):
    """No class is registered under this name in this family."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DuplicateNameError(ValueError):
    """Two different classes claim the same name in one family."""


_REGISTRY: dict[str, dict[str, type]] = {}


class Registrable(ABC):
    """Mixin: subclasses defining ``name`` register themselves under their ``family``.

    ``get_config()`` returns the keyword arguments of ``__init__`` (plain data only), so that
    ``type(obj).from_config(obj.get_config())`` rebuilds an equal object.
    """

    family: ClassVar[str]
    name: ClassVar[str]

    def __init_subclass__(cls, register_name: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # register_name=False: a wrapper with a name for messages that cannot be built from
        # plain config (it wraps objects), so it stays out of the registry.
        if register_name and "name" in cls.__dict__ and "family" in dir(cls):
            register(cls)

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        try:
            return cls(**dict(config))
        except TypeError as exc:
            raise TypeError(f"invalid config for {cls.family} {cls.name!r}: {exc}") from exc


def register(cls: type) -> type:
    """Register ``cls`` under ``cls.family`` / ``cls.name``; usable as a decorator."""
    family: str = cls.family  # type: ignore[attr-defined]
    name: str = cls.name  # type: ignore[attr-defined]
    table = _REGISTRY.setdefault(family, {})
    known = table.get(name)
    if known is not None and _qualname(known) != _qualname(cls):
        raise DuplicateNameError(
            f"{family} name {name!r} is taken by {_qualname(known)}; "
            f"choose another name for {_qualname(cls)}"
        )
    table[name] = cls
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def families() -> list[str]:
    return sorted(_REGISTRY)


def names(family: str) -> list[str]:
    """Registered names of one family, sorted, with those of installed plugins."""
    _load_builtins()
    load_entry_points()
    return sorted(_REGISTRY.get(family, {}))


def get_class(family: str, name: str) -> type:
    """The class registered as ``name``; installed plugins are loaded on the first miss.

    Raises
    ------
    UnknownNameError
        No such name, even with the installed plugins (the message says how to load one).
    PluginError
        An installed entry point failed to import.
    """
    _load_builtins()
    cls = _REGISTRY.get(family, {}).get(name)
    if cls is None:
        load_entry_points()
        cls = _REGISTRY.get(family, {}).get(name)
    if cls is None:
        known = ", ".join(sorted(_REGISTRY.get(family, {})))
        raise UnknownNameError(
            f"unknown {family} {name!r}; known {family} names: {known}. {HOW_TO_LOAD}"
        )
    return cls


def build(family: str, name: str, config: Mapping[str, Any] | None = None) -> Any:
    """Instantiate the class registered as ``name`` in ``family`` from its config."""
    return get_class(family, name).from_config(config or {})  # type: ignore[attr-defined]


def build_spec(family: str, spec: Any) -> Any:
    """Build from a config entry: an instance, a ``name``, or a ``(name, config)`` pair."""
    base = _BASES.get(family)
    if base is not None and isinstance(spec, base):
        return spec
    if isinstance(spec, str):
        return build(family, spec)
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and isinstance(spec[0], str):
        return build(family, spec[0], spec[1])
    if isinstance(spec, Mapping) and "name" in spec:
        config = {k: v for k, v in spec.items() if k != "name"}
        return build(family, spec["name"], config.get("config", config))
    raise TypeError(
        f"cannot build a {family} from {spec!r}: expected an instance, a name, "
        f"or a [name, config] pair"
    )


def spec_of(obj: Any) -> list[Any]:
    """The ``[name, config]`` pair that :func:`build_spec` turns back into ``obj``."""
    return [obj.name, obj.get_config()]


_BASES: dict[str, type] = {}


def declare_family(base: type) -> type:
    """Record the base class of a family, so :func:`build_spec` accepts its instances."""
    _BASES[base.family] = base  # type: ignore[attr-defined]
    return base


def _load_builtins() -> None:
    """Import the modules defining built-in classes so that they are registered."""
    import fedpipe.common.builtins  # noqa: F401
