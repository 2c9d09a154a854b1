"""Evaluation metrics whose states add up exactly across clients."""

from fedpipe.common.metrics.base import Metric, predicted_labels
from fedpipe.common.metrics.classification import Accuracy, PrecisionRecallF1
from fedpipe.common.metrics.loss import LossMetric
from fedpipe.common.metrics.metric_set import MetricSet
from fedpipe.common.metrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

__all__ = [
    "Accuracy",
    "LossMetric",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "Metric",
    "MetricSet",
    "PrecisionRecallF1",
    "R2Score",
    "predicted_labels",
]
