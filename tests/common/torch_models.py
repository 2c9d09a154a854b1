"""A user's model module, as a run config names it: ``tests.common.torch_models:build``."""

from __future__ import annotations

import torch

from fedpipe.common.models.torch_adapter import TorchModel


def build(
    n_features: int = 64,
    hidden: int = 32,
    n_classes: int = 10,
    seed: int = 0,
    dtype: str = "float32",
) -> TorchModel:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(n_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes)
    ).to(getattr(torch, dtype))
    return TorchModel(net, torch.nn.CrossEntropyLoss(), task="multiclass")
