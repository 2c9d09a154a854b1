"""A user's own data pipeline and training loop, as a client config names them:
``loaders = "tests.common.torch_training:loaders"``, ``train_fn = "...:sgd_train"``."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from fedpipe.common.data import Dataset


class NoisyDigits(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """fedpipe arrays as a torch Dataset; ``noise`` adds Gaussian pixel noise to every sample
    it hands out (augmentation: a new draw at each epoch)."""

    def __init__(self, data: Dataset, noise: float = 0.0) -> None:
        self.x = torch.as_tensor(data.x, dtype=torch.float32)
        self.y = torch.as_tensor(data.y, dtype=torch.int64)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        return x, self.y[i]


def loaders(
    train: Dataset, eval_data: Dataset | None = None
) -> tuple[DataLoader[Any], DataLoader[Any] | None]:
    """Augmented, shuffled training batches of 16; plain evaluation batches. Seeded: the
    same shuffles and the same noise in every process."""
    torch.manual_seed(0)  # the noise's draws
    generator = torch.Generator().manual_seed(0)
    train_loader = DataLoader(
        NoisyDigits(train, noise=0.05), batch_size=16, shuffle=True, generator=generator
    )
    if eval_data is None:
        return train_loader, None
    return train_loader, DataLoader(NoisyDigits(eval_data), batch_size=256)


def sgd_train(
    module: torch.nn.Module, loader: DataLoader[Any], round_config: dict[str, Any]
) -> tuple[int, dict[str, float]]:
    """A plain torch loop: SGD with momentum, ``round_config["epochs"]`` passes."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    module.train()
    steps, loss_sum, seen = 0, 0.0, 0
    for _ in range(round_config["epochs"]):
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(module(x), y)
            loss.backward()
            optimizer.step()
            steps += 1
            loss_sum += loss.item() * len(x)
            seen += len(x)
    return len(loader.dataset), {"loss": loss_sum / seen, "n_steps": steps}  # type: ignore[arg-type]


def shift_train(
    module: torch.nn.Module, loader: DataLoader[Any], round_config: dict[str, Any]
) -> tuple[int, dict[str, float]]:
    """Moves every trainable parameter by ``-round``: start - end is ``round`` everywhere."""
    with torch.no_grad():
        for p in module.parameters():
            p.sub_(float(round_config["round"]))
    return 7, {"loss": 0.5}
