"""Models: numpy built-ins (linear, logistic, softmax, MLP) and loading by name or path."""

from fedpipe.common.models.base import TASKS, Model, Task
from fedpipe.common.models.linear import LinearRegression, LogisticRegression, SoftmaxRegression
from fedpipe.common.models.loading import load_model
from fedpipe.common.models.mlp import MLP

__all__ = [
    "MLP",
    "TASKS",
    "LinearRegression",
    "LogisticRegression",
    "Model",
    "SoftmaxRegression",
    "Task",
    "load_model",
]
