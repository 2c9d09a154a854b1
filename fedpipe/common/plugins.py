"""User code loaded by module name: explicit plugins and the ``fedpipe.plugins`` entry points.

A plugin is a module of the user's own package that defines registered classes (optimizer
modules, regularizers, schedulers, aggregators, models, metrics): importing it registers them
under their ``name``, so configs use them like built-ins. Two ways to load one:

- **Explicitly**: ``plugins = ["mypkg.fedext"]`` in a server, client or simulation config, or
  ``--plugin mypkg.fedext`` on any ``fedpipe`` command. The command imports them as it starts,
  before any name of its config is looked up (:func:`import_plugins`).
- **Installed**: a distribution that declares an entry point in the ``fedpipe.plugins`` group
  (``fedext = "mypkg.fedext"``: the value names the module to import). Entry points are
  imported all at once, the first time the registry is asked for a name it does not know or
  for the list of a family's names (:func:`load_entry_points`). A run that uses only built-in
  names imports no plugin, so a broken plugin cannot stop it; a run that needs a missing name
  fails on the broken entry point with a message naming it.

A client imports only what its owner chose: its own config and flags, and the packages
installed on its machine. The run setup a server sends names registered classes, never
modules to import, so a server can never make a client import code.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Iterable
from typing import Any

from fedpipe.common.config import ConfigError

__all__ = [
    "ENTRY_POINT_GROUP",
    "HOW_TO_LOAD",
    "PluginError",
    "import_object",
    "import_plugins",
    "load_entry_points",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fedpipe.plugins"

#: How to make a class of the user's own package known by name (for error messages).
HOW_TO_LOAD = (
    "A class from your own package is known by name once its module is imported: "
    '`--plugin mypkg.fedext` or `plugins = ["mypkg.fedext"]` in the config of this command, '
    f"or an entry point in the {ENTRY_POINT_GROUP!r} group of an installed package"
)

# Reentrant: a plugin's own import may look a name up, which must not wait for itself.
_lock = threading.RLock()
_entry_points_loaded = False
_entry_points_loading = False


class PluginError(ConfigError):
    """A plugin module or an entry point could not be imported; the message says which."""


def import_plugins(modules: Iterable[str]) -> None:
    """Import each plugin module, so that the classes it defines are registered.

    Raises
    ------
    PluginError
        A module cannot be found, or raised while being imported (the cause is chained).
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not _is_prefix(exc.name, module):
                raise _failed_import(module, exc) from exc  # the plugin imports something missing
            raise PluginError(
                f"plugin module {module!r} not found ({exc}): install its package "
                "(`pip install -e .` in its project) or put the folder that contains it on "
                "PYTHONPATH"
            ) from exc
        except Exception as exc:  # any error of user code at import: say whose it is
            raise _failed_import(module, exc) from exc
        log.info("plugin %s imported", module)


def import_object(path: str, what: str) -> Any:
    """The object an import path ``"package.module:attribute"`` names (``attribute`` may be
    dotted: ``"pkg.mod:Class.factory"``), imported in this process.

    ``what`` says what the object is for the messages (``"model factory"``, ``"train_fn"``).

    Raises
    ------
    PluginError
        ``path`` does not look like ``package.module:attribute``, its module cannot be
        imported, or it has no such attribute; the message is one line naming ``path``.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise PluginError(f"{what} {path!r}: expected an import path 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # not found, or any error of user code at import
        raise PluginError(
            f"{what} {path!r}: cannot import the module {module_name!r} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    found: Any = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise PluginError(
                f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    return found


def load_entry_points() -> None:
    """Import every module named by an installed ``fedpipe.plugins`` entry point, once.

    Raises
    ------
    PluginError
        An entry point failed to import; the message names it and its distribution. Nothing
        is marked loaded, so the next lookup reports it again.
    """
    global _entry_points_loaded, _entry_points_loading
    with _lock:  # simulated clients may look names up from several threads
        if _entry_points_loaded or _entry_points_loading:
            return
        _entry_points_loading = True
        try:
            for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                _load_entry_point(entry)
            _entry_points_loaded = True
        finally:
            _entry_points_loading = False


def _load_entry_point(entry: importlib.metadata.EntryPoint) -> None:
    try:
        entry.load()
    except Exception as exc:  # any error of an installed package's code
        raise PluginError(
            f"entry point {entry.name!r} = {entry.value!r} (group {ENTRY_POINT_GROUP!r}) of "
            f"distribution {_distribution(entry)} failed to import: {type(exc).__name__}: "
            f"{exc}; fix or uninstall that distribution"
        ) from exc
    log.info("plugin entry point %s = %s imported", entry.name, entry.value)


def _failed_import(module: str, exc: BaseException) -> PluginError:
    return PluginError(
        f"plugin module {module!r} failed while being imported: {type(exc).__name__}: {exc}"
    )


def _is_prefix(missing: str, module: str) -> bool:
    """Whether the module that was not found is ``module`` itself or one of its parents."""
    return module == missing or module.startswith(missing + ".")


def _distribution(entry: importlib.metadata.EntryPoint) -> str:
    dist = entry.dist
    return "(unknown)" if dist is None else f"{dist.name!r} {dist.version}"
