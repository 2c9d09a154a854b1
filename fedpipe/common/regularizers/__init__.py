"""Regularizers: penalty terms added to loss gradients."""

from fedpipe.common.regularizers.base import Regularizer
from fedpipe.common.regularizers.fedprox import FedProxRegularizer
from fedpipe.common.regularizers.norms import LassoRegularizer, RidgeRegularizer

__all__ = ["FedProxRegularizer", "LassoRegularizer", "Regularizer", "RidgeRegularizer"]
