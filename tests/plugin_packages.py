"""User packages written to a folder, as a user would write them: found by PYTHONPATH (or
``sys.path``) and, with a ``.dist-info`` folder, by ``importlib.metadata`` as if installed."""

from __future__ import annotations

import textwrap
from pathlib import Path

__all__ = ["RMSPROP_PACKAGE", "write_dist_info", "write_module", "write_rmsprop_package"]

#: The package :func:`write_rmsprop_package` writes.
RMSPROP_PACKAGE = "fedext_rmsprop"

# The seed's tutorial module (declearn's RMSProp on top of EWMA), under a name of its own.
RMSPROP_SOURCE = '''\
"""RMSProp (Tieleman & Hinton, 2012), written as the seed's tutorial writes it."""

from __future__ import annotations

from typing import Any, ClassVar

from fedpipe.common.modules import EWMAModule, OptiModule
from fedpipe.common.vector import Vector


class RMSPropModule(OptiModule):
    name: ClassVar[str] = "my-rmsprop"

    def __init__(self, beta: float = 0.9, eps: float = 1e-7) -> None:
        self.ewma = EWMAModule(beta=beta)
        self.eps = eps

    def get_config(self) -> dict[str, Any]:
        return {"beta": self.ewma.beta, "eps": self.eps}

    def run(self, gradients: Vector) -> Vector:
        v_t = self.ewma.run(gradients**2)
        scaling = (v_t**0.5) + self.eps
        return gradients / scaling

    def get_state(self) -> dict[str, Any]:
        return self.ewma.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.ewma.set_state(state)
'''

MODELS_SOURCE = '''\
"""A model factory named by import path: ``fedext_rmsprop.models:build``."""

from fedpipe.common.models.linear import SoftmaxRegression


def build(n_features: int = 64, n_classes: int = 10) -> SoftmaxRegression:
    return SoftmaxRegression(n_features=n_features, n_classes=n_classes)
'''


def write_module(root: Path, dotted: str, source: str) -> Path:
    """Write module ``dotted`` (``pkg.mod``) under ``root``, with the packages above it."""
    *packages, leaf = dotted.split(".")
    folder = root
    for package in packages:
        folder = folder / package
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").touch()
    path = folder / f"{leaf}.py"
    path.write_text(textwrap.dedent(source))
    return path


def write_dist_info(root: Path, dist: str, version: str, entry_points: dict[str, str]) -> Path:
    """A ``<dist>-<version>.dist-info`` folder declaring ``fedpipe.plugins`` entry points."""
    info = root / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[fedpipe.plugins]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return info


def write_rmsprop_package(root: Path) -> None:
    """``fedext_rmsprop.modules`` (the "my-rmsprop" module) and ``fedext_rmsprop.models``."""
    write_module(root, f"{RMSPROP_PACKAGE}.modules", RMSPROP_SOURCE)
    write_module(root, f"{RMSPROP_PACKAGE}.models", MODELS_SOURCE)
