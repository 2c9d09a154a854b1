"""The gRPC channel a client daemon and the server's gRPC transport open between them: the
``fedpipe.v1.Federation`` service's name and ``Session`` method (from the generated
descriptor) and the channel options of both ends. Outside ``fedpipe.common``, which knows
no transport; it imports no grpc itself (the options are plain pairs)."""

from __future__ import annotations

from typing import Any

from fedpipe.common.protocol import MAX_CONTROL_BYTES
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb

__all__ = ["SERVICE_NAME", "SESSION_METHOD", "channel_options"]

_SERVICE = pb.DESCRIPTOR.services_by_name["Federation"]
#: ``fedpipe.v1.Federation``: what the health service reports, what the handler serves.
SERVICE_NAME: str = _SERVICE.full_name
#: The bidirectional stream of one client session: ``/fedpipe.v1.Federation/Session``.
SESSION_METHOD = f"/{SERVICE_NAME}/{_SERVICE.methods_by_name['Session'].name}"


def channel_options(chunk_bytes: int) -> list[tuple[str, Any]]:
    """gRPC options of both ends: message limits above the protocol's largest control
    message and two chunks, and keepalive pings (the client's no more often than the
    server accepts them)."""
    limit = max(MAX_CONTROL_BYTES, 2 * chunk_bytes + (1 << 20))
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]
