"""Optimizer modules: registered, stateful gradient transformations."""

from fedpipe.common.modules.base import AuxVarError, OptiModule

__all__ = ["AuxVarError", "OptiModule"]
