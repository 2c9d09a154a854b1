"""Build a model from a registry name or from an import path to a user factory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedpipe.common import registry
from fedpipe.common.models.base import Model
from fedpipe.common.plugins import import_object

__all__ = ["load_model"]


def load_model(name: str, config: Mapping[str, Any] | None = None) -> Model:
    """Build a model from its registry name, or from ``"package.module:factory"``.

    Parameters
    ----------
    name:
        A registered model name (``"mlp"``, ``"softmax-regression"``, ...) or an import path
        ``"package.module:factory"``, where ``factory(**config)`` returns a :class:`Model`
        (a Model subclass itself is a valid factory). The module is imported in this process:
        model code never travels over the network, both sides must have it installed.
    config:
        Keyword arguments for the model's constructor or the factory.

    Raises
    ------
    UnknownNameError
        ``name`` is neither registered nor an import path (the message lists known names).
    PluginError
        The import path is malformed, or its module or factory cannot be found.
    TypeError
        The factory returned something other than a :class:`Model`.
    """
    config = dict(config or {})
    if ":" not in name:
        model = registry.build("model", name, config)
        assert isinstance(model, Model)
        return model
    factory = import_object(name, "model factory")
    if not callable(factory):
        raise TypeError(f"model factory {name!r} is a {type(factory).__name__}, not callable")
    model = factory(**config)
    if not isinstance(model, Model):
        raise TypeError(
            f"model factory {name!r} returned {type(model).__module__}."
            f"{type(model).__qualname__} ({model!r:.80}), expected a fedpipe Model"
        )
    return model
