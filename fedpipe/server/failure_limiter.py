"""Failed authentications rate-limited per peer address: the gRPC sessions' credentials
and the status page's token share one policy."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

__all__ = ["MAX_TRACKED_PEERS", "FailureLimiter"]

log = logging.getLogger(__name__)

#: Peer addresses whose failures are remembered; the oldest is forgotten beyond.
MAX_TRACKED_PEERS = 10_000


class FailureLimiter:
    """A token bucket of failed authentications per peer address.

    An address may fail ``burst`` times at once, then once every ``window / burst`` seconds;
    while its bucket is empty its hellos are refused before any credential is checked.
    """

    def __init__(self, burst: int, window: float, *, clock: Any = time.monotonic) -> None:
        self.burst = burst
        self.rate = burst / window  # failures regained per second
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def blocked_for(self, host: str) -> float:
        """Seconds until ``host`` may try again; 0 when it may try now."""
        left = self._left(host)
        return 0.0 if left >= 1.0 else (1.0 - left) / self.rate

    def failed(self, host: str) -> None:
        self._buckets[host] = (max(0.0, self._left(host) - 1.0), self.clock())
        self._buckets.move_to_end(host)
        while len(self._buckets) > MAX_TRACKED_PEERS:
            self._buckets.popitem(last=False)
        if wait := self.blocked_for(host):
            log.warning(
                "%s failed to authenticate too often; its hellos are refused unchecked for "
                "%.0fs (then one try every %.0fs)",
                host,
                wait,
                1.0 / self.rate,
            )

    def _left(self, host: str) -> float:
        if host not in self._buckets:
            return float(self.burst)
        left, since = self._buckets[host]
        return min(float(self.burst), left + (self.clock() - since) * self.rate)
