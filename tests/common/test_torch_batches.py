"""A torch model's batches drawn on its device: the samples of ``Dataset.batches``, each
client's data kept on a device within a byte budget."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedpipe.common.data import Dataset  # noqa: E402
from fedpipe.common.models.torch_batches import DeviceBatches  # noqa: E402
from tests.common.torch_models import build  # noqa: E402

META = (torch.device("meta"), torch.float32, torch.int64)  # a device with no memory to read


def _data(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(rng.normal(size=(n, 6)), rng.integers(0, 10, n))


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_same_samples_as_dataset_batches(drop_remainder: bool) -> None:
    model, data = build(n_features=6), _data(22)
    ours = model.batches(data, 4, seed=np.random.default_rng(7), drop_remainder=drop_remainder)
    want = data.batches(4, seed=np.random.default_rng(7), drop_remainder=drop_remainder)
    pairs = list(zip(ours, want, strict=True))
    assert len(pairs) == (5 if drop_remainder else 6)
    for (x, y), (wx, wy) in pairs:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        np.testing.assert_array_equal(x.numpy(), wx.astype(np.float32))
        np.testing.assert_array_equal(y.numpy(), wy)


def test_a_device_keeps_data_within_its_budget_least_recently_used_out() -> None:
    one = 10 * 6 * 4 + 10 * 8  # 10 samples: float32 inputs, int64 targets
    cache = DeviceBatches(budget=2 * one)
    a, b, c = _data(10, 1), _data(10, 2), _data(10, 3)
    for data in (a, b, a, c):  # c pushes out b, the least recently used
        list(
            cache.batches(data, 4, seed=np.random.default_rng(0), drop_remainder=False, place=META)
        )
    assert (len(cache), cache.nbytes) == (2, 2 * one)
    kept_a = cache._kept[id(a)]
    list(cache.batches(a, 4, seed=np.random.default_rng(0), drop_remainder=False, place=META))
    assert cache._kept[id(a)] is kept_a  # no second copy
    assert id(b) not in cache._kept


def test_data_over_the_budget_is_batched_on_the_host() -> None:
    cache = DeviceBatches(budget=100)
    batches = list(
        cache.batches(_data(10), 4, seed=np.random.default_rng(0), drop_remainder=False, place=META)
    )
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert all(isinstance(x, np.ndarray) for x, _ in batches)
    assert (len(cache), cache.nbytes) == (0, 0)


def test_moving_the_model_forgets_the_kept_data() -> None:
    model = build(n_features=6)
    model._batches.budget = 1 << 20
    list(model._batches.batches(_data(8), 4, seed=np.random.default_rng(0),
                                drop_remainder=False, place=META))  # fmt: skip
    assert len(model._batches) == 1
    model.to("cpu")
    assert (len(model._batches), model._batches.nbytes) == (0, 0)


def test_a_dataset_given_new_arrays_is_copied_to_the_device_again() -> None:
    # Dataset.x and .y are plain attributes: a client whose data grew between rounds keeps
    # its Dataset object, and must not be trained on its old arrays (nor index past them)
    cache = DeviceBatches(budget=1 << 20)
    data = _data(10)
    list(cache.batches(data, 4, seed=np.random.default_rng(0), drop_remainder=False, place=META))
    grown = _data(20, seed=5)
    data.x, data.y = grown.x, grown.y
    batches = list(
        cache.batches(data, 4, seed=np.random.default_rng(0), drop_remainder=False, place=META)
    )
    assert [len(x) for x, _ in batches] == [4, 4, 4, 4, 4]
    assert [t.shape[0] for t in cache._kept[id(data)][2:]] == [20, 20]
    assert (len(cache), cache.nbytes) == (1, 20 * (6 * 4 + 8))
