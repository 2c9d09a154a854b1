"""A round's loss sum: a float64 left fold over the batches, device losses read in chunks."""

from __future__ import annotations

import numpy as np
import pytest

from fedpipe.common import loss_sum
from fedpipe.common.loss_sum import LossSum

LOSSES = [0.1, 2.3e-7, 0.7, 1e8, 0.3]
SIZES = [32, 32, 32, 32, 7]


def _fold(pairs: list[tuple[float, int]] | None = None) -> float:
    total = 0.0
    for loss, n in zip(LOSSES, SIZES, strict=True) if pairs is None else pairs:
        total = total + loss * n
    return total


def test_floats_fold_left_in_batch_order() -> None:
    total = LossSum()
    for loss, n in zip(LOSSES, SIZES, strict=True):
        total.add(loss, n)
    assert total.value() == _fold()  # bit for bit: not a pairwise or reordered sum
    # a reordered fold gives other bits (a written loop: Python 3.12's sum() of floats is
    # compensated, and would match)
    assert total.value() != _fold(list(reversed(list(zip(LOSSES, SIZES, strict=True)))))


def test_arrays_and_floats_mixed_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_sum, "CHUNK", 2)  # read every 2 held losses
    total = LossSum()
    for k, (loss, n) in enumerate(zip(LOSSES, SIZES, strict=True)):
        total.add(np.array(loss) if k != 2 else loss, n)
        assert len(total._held) < 2  # never more than a chunk held
    assert total.value() == _fold()


def test_torch_losses_are_held_until_read() -> None:
    torch = pytest.importorskip("torch")
    values = np.array(LOSSES, np.float32)
    total = LossSum()
    for value, n in zip(values, SIZES, strict=True):
        total.add(torch.tensor(value), n)
    assert len(total._held) == len(LOSSES)  # nothing read yet: no wait at any batch
    want = 0.0
    for value, n in zip(values.tolist(), SIZES, strict=True):
        want = want + value * n
    assert total.value() == want
    assert total._held == []


def test_one_element_device_losses_add_as_numbers() -> None:
    # a torch loss_fn may return shape [1] (a .mean(0) over [N, 1] outputs): a number
    torch = pytest.importorskip("torch")
    total = LossSum()
    for loss, n in zip(LOSSES, SIZES, strict=True):
        total.add(torch.tensor([loss], dtype=torch.float64), n)
    assert total.value() == _fold()


def test_a_batch_loss_of_several_numbers_is_refused() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"batch loss of shape \(2,\); expected one number"):
        LossSum().add(torch.zeros(2), 4)
