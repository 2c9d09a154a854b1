"""The federation protocol's version, its control-message limit and its error.

Every transport speaks these: the records (:mod:`fedpipe.common.records`) and the framing
(:mod:`fedpipe.common.framing`) raise :class:`ProtocolError` for what a peer may not send.
"""

from __future__ import annotations

__all__ = ["MAX_CONTROL_BYTES", "PROTOCOL_VERSION", "ProtocolError"]

#: 2: secure aggregation's masks are AES-256-CTR keystreams (1: ChaCha20), so a client and
#: a server of different versions would disagree on every mask.
PROTOCOL_VERSION = 2
#: Largest non-chunk message accepted (headers, settings), whatever carries the frames.
MAX_CONTROL_BYTES = 64 << 20


class ProtocolError(ValueError):
    """The peer sent something the protocol does not allow (the reason says what)."""
