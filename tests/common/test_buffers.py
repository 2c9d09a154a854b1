"""The buffers' pass-through channel: float32 shares, their checks, their mean."""

from __future__ import annotations

import numpy as np
import pytest

from fedpipe.common.buffers import (
    BUFFERS_AUX,
    buffer_mode,
    buffers_share,
    check_share,
    mean_buffers,
    split_buffers,
)
from fedpipe.common.summable import Summable
from fedpipe.common.vector import ArraySpec, Vector

SPECS = {"bn.running_mean": ArraySpec((3,), "float16")}


def test_shares_add_up_in_float32_to_the_sample_weighted_mean_in_the_buffers_dtype() -> None:
    a = Vector({"bn.running_mean": np.array([1000.0, 2.0, -1.0], dtype=np.float16)})
    b = Vector({"bn.running_mean": np.array([3000.0, 4.0, 1.0], dtype=np.float16)})
    shares = [buffers_share(a, 100), buffers_share(b, 300)]  # 3000 * 300 overflows float16
    for share in shares:
        check_share(share, SPECS)
    total = shares[0].accumulator().add_(shares[1])
    mean = mean_buffers(total, SPECS)
    assert mean.specs() == SPECS
    np.testing.assert_array_equal(mean.coefs["bn.running_mean"], [2500.0, 3.5, 0.5])


def test_a_share_of_other_buffers_or_weight_is_refused() -> None:
    share = buffers_share(Vector({"bn.running_var": np.ones(3, np.float32)}), 5)
    with pytest.raises(ValueError, match=r"buffers\.weighted_sum"):
        check_share(share, SPECS)
    bad = Summable(
        {"weighted_sum": Vector({"bn.running_mean": np.ones(3, np.float32)}), "weight": 0}
    )
    with pytest.raises(ValueError, match=r"weight 0\.0"):
        check_share(bad, SPECS)


def test_the_channel_is_split_from_the_modules_aux_vars() -> None:
    share = buffers_share(Vector({"b": np.ones(2, np.float32)}), 1)
    scaffold = Summable({"delta": 1.0})
    assert split_buffers({BUFFERS_AUX: share, "scaffold": scaffold}) == (
        share,
        {"scaffold": scaffold},
    )
    assert buffer_mode({"name": "m"}) == "local"
    with pytest.raises(ValueError, match=r"model\.buffers='shared'; expected 'local' or 'average'"):
        buffer_mode({"buffers": "shared"})
