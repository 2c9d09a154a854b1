"""Secure aggregation with dropout recovery: SecAgg (Bonawitz et al., 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning") and its sparse-graph variant SecAgg+
(Bell et al., 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead").

Transport-free state machines (:class:`SecAggClient`, :class:`SecAggServer`) exchanging the
records of :mod:`~fedpipe.common.secagg.messages`; cryptography comes from the ``cryptography``
package (``pip install 'fedpipe[secagg]'``): X25519, HKDF-SHA256, AES-256-CTR as the mask PRG,
ChaCha20-Poly1305 for the shares. Shamir sharing is in :mod:`~fedpipe.common.secagg.shamir`.

What is guaranteed, against whom: an honest-but-curious server, even colluding with up to
``threshold - 1`` clients, learns of the honest clients' inputs only their sum (a client's
masked input alone is uniformly distributed); the sum is recovered while at least
``threshold`` holders of each client's shares answer, so up to ``n - threshold`` clients
may drop at any stage; a client that reveals a wrong share during unmasking is detected by
the commitment its owner made and excluded. Not guaranteed: protection against a server that
lies about who dropped or sends different clients different rosters (the actively secure
version of the protocol needs a public-key infrastructure and a consistency round), nor
against clients submitting out-of-range inputs (they are clipped to ``[-clip, clip]``, which
bounds, but does not detect, a poisoned contribution). The sum itself is revealed: add
client-level DP noise to hide a single client in it.
"""

from __future__ import annotations

from fedpipe.common.secagg.client import SecAggClient
from fedpipe.common.secagg.messages import AggregateResult, SecureAggregationError
from fedpipe.common.secagg.quantization import FixedPoint
from fedpipe.common.secagg.server import SecAggServer

__all__ = [
    "AggregateResult",
    "FixedPoint",
    "SecAggClient",
    "SecAggServer",
    "SecureAggregationError",
]
