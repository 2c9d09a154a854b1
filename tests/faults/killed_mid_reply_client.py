"""``python -m tests.faults.killed_mid_reply_client`` + fedpipe's command line: a client
process that kills itself with SIGKILL halfway through sending its first train reply's
payload (the header and half of its chunks are out; the rest never comes).

The hook lives in the test tree only: nothing the server sends can make a real client die.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from fedpipe.cli import main
from fedpipe.client import daemon

_frames = daemon.envelope_frames


def _dies_halfway(envelope: Any, payload: Any) -> Iterator[bytes]:
    frames = list(_frames(envelope, payload))
    structure = payload.header.structure.map_value.entries if payload is not None else []
    if not any(entry.key == "partial" for entry in structure):
        yield from frames
        return
    half = 1 + (len(frames) - 1) // 2
    assert half < len(frames), "the reply must travel in several chunks"
    yield from frames[:half]
    time.sleep(1.0)  # the frames written so far reach the server
    print(f"killed after {half - 1} of {len(frames) - 1} chunks of its reply", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    daemon.envelope_frames = _dies_halfway  # type: ignore[assignment]
    sys.exit(main())
