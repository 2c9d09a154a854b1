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


def build_frozen(n_features: int = 64, n_classes: int = 10, seed: int = 0) -> TorchModel:
    """A frozen first layer (a pretrained backbone) under a trainable head."""
    torch.manual_seed(seed)
    backbone = torch.nn.Linear(n_features, 16)
    backbone.requires_grad_(False)
    net = torch.nn.Sequential(backbone, torch.nn.ReLU(), torch.nn.Linear(16, n_classes))
    return TorchModel(net, torch.nn.CrossEntropyLoss(), task="multiclass")


def build_batchnorm(n_features: int = 8, n_classes: int = 3, seed: int = 0) -> TorchModel:
    """Batch normalisation: running statistics (float buffers) and a batch counter (int64)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(n_features, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, n_classes)
    )
    return TorchModel(net, torch.nn.CrossEntropyLoss(), task="multiclass")
