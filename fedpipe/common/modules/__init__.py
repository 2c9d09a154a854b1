"""Optimizer modules: registered, stateful gradient transformations."""

from fedpipe.common.modules.adaptive import AdagradModule, AdamModule, RMSPropModule, YogiModule
from fedpipe.common.modules.base import AuxVarError, OptiModule
from fedpipe.common.modules.clipping import L2Clipping, L2GlobalClipping
from fedpipe.common.modules.momentum import EWMAModule, MomentumModule
from fedpipe.common.modules.noise import GaussianNoise
from fedpipe.common.modules.scaffold import ScaffoldClient, ScaffoldServer

__all__ = [
    "AdagradModule",
    "AdamModule",
    "AuxVarError",
    "EWMAModule",
    "GaussianNoise",
    "L2Clipping",
    "L2GlobalClipping",
    "MomentumModule",
    "OptiModule",
    "RMSPropModule",
    "ScaffoldClient",
    "ScaffoldServer",
    "YogiModule",
]
