"""FLTrust (Cao, Fang, Liu and Gong 2021, "FLTrust: Byzantine-robust Federated Learning via
Trust Bootstrapping", NDSS, Algorithm 2).

The server trains on a small clean root dataset each round, from the same global weights and
with the same local training as the clients, giving its own update ``g0``. Client ``i``'s
trust score is ``TS_i = ReLU(cos(g_i, g0))``; its update is rescaled to ``g0``'s norm, and the
global update is ``sum_i TS_i * (||g0|| / ||g_i||) * g_i / sum_i TS_i`` (zero when no client
points within 90 degrees of ``g0``). Trust replaces sample counts, which are ignored.

The training happens on the server (``fedpipe.server.root_update``: it needs the model and
the local trainer, which build on the aggregators, and data only the server holds); this
class holds the root data's config and the maths, and is given ``g0`` as
:attr:`FLTrust.server_update` before each round's replies are reduced.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from fedpipe.common.aggregators.buffered import BufferedAggregator
from fedpipe.common.aggregators.replies import ReplyBuffer
from fedpipe.common.vector import Vector

__all__ = ["FLTrust"]

log = logging.getLogger(__name__)


class FLTrust(BufferedAggregator):
    """Trust-weighted, norm-rescaled mean of the client updates.

    Parameters
    ----------
    dataset:
        The server's root data: a built-in dataset name or a path to a dataset file.
    samples:
        Root samples drawn from it (the paper uses 100), without replacement, with ``seed``.
    seed:
        Seed of that draw.
    """

    name: ClassVar[str] = "fltrust"

    def __init__(self, dataset: str = "digits", samples: int = 100, seed: int = 0) -> None:
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"fltrust: dataset={dataset!r}; expected a dataset name or path")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"fltrust: samples={samples!r}; expected an integer >= 1")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"fltrust: seed={seed!r}; expected an integer")
        self.dataset, self.samples, self.seed = dataset, samples, seed
        #: The server's update of the round, set before the replies are reduced.
        self.server_update: Vector | None = None

    def get_config(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "samples": self.samples, "seed": self.seed}

    def reduce(self, replies: ReplyBuffer, weights: Any) -> Vector:
        root, self.server_update = self.server_update, None  # one round's, never reused
        if root is None:
            raise ValueError("fltrust: no server update for this round (the server trains one)")
        root = root.to_numpy()
        root.check_specs(replies.specs, "fltrust server update")
        root_norm, norms = root.norm(), np.asarray(replies.norms)
        dots = np.zeros(len(replies))
        for name, start, stop in replies.ranges():
            flat = np.asarray(root[name], np.float64).reshape(-1)[start:stop]
            dots += replies.block(name, start, stop) @ flat
        scale = norms * root_norm
        trust = np.maximum(np.divide(dots, scale, out=np.zeros_like(dots), where=scale > 0), 0.0)
        if trust.sum() <= 0:
            log.warning("fltrust: no client update within 90 degrees of the server's: no step")
            return replies.combine(np.zeros(len(replies)))
        coefs = trust / trust.sum() * np.divide(root_norm, norms, where=norms > 0, out=trust * 0)
        return replies.combine(coefs)
