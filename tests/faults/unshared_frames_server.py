"""``python -m tests.faults.unshared_frames_server`` + fedpipe's command line: a server that
builds a round's chunk frames for each client on the fly, as it does for payloads over
``FRAME_CACHE_BYTES`` (256 MiB), whatever the model's size: so that a test can see what that
path holds per session with a model of a few MiB.

The hook lives in the test tree only.
"""

from __future__ import annotations

import sys

from fedpipe.cli import main
from fedpipe.server.transports.grpc import proxy

if __name__ == "__main__":
    proxy.FRAME_CACHE_BYTES = 0
    sys.exit(main())
