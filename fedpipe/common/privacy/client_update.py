"""What a client does to its update under distributed client-level DP (DP-FedAvg, McMahan et
al. 2018, its noise split between clients for secure aggregation).

The server's train task carries ``{"clip": C, "noise_std": s}``: the client clips its update
to norm ``C`` and adds ``N(0, s^2)`` to every coordinate, with ``s = z C / sqrt(n)`` for ``n``
expected participants, so that the sum the server learns (under secure aggregation, the sum
only) carries ``N(0, (z C)^2)``. The noise comes from this client's own entropy
(:mod:`fedpipe.common.privacy.entropy`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpipe.common.vector import Vector

__all__ = ["privatize_update"]

log = logging.getLogger(__name__)


def privatize_update(
    updates: Vector, settings: Mapping[str, Any], rng: np.random.Generator
) -> Vector:
    """``updates`` clipped to ``settings["clip"]`` with Gaussian noise of std
    ``settings["noise_std"]`` added (in place where the backend allows).

    Raises
    ------
    ValueError
        ``clip`` is not a positive number or ``noise_std`` not a positive one.
    """
    clip, std = settings.get("clip"), settings.get("noise_std")
    for key, value in (("clip", clip), ("noise_std", std)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"dp setting {key}={value!r}; expected a positive number")
    if not math.isfinite(float(clip)) or not math.isfinite(float(std)):  # type: ignore[arg-type]
        raise ValueError(f"dp settings clip={clip!r}, noise_std={std!r}; expected finite numbers")
    updates = updates.clip_norm(float(clip))  # type: ignore[arg-type]  # on its device
    return updates.add_(updates.normal_like(rng), alpha=float(std))  # type: ignore[arg-type]
