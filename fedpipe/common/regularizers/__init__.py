"""Regularizers: penalty terms added to loss gradients."""

from fedpipe.common.regularizers.base import Regularizer

__all__ = ["Regularizer"]
