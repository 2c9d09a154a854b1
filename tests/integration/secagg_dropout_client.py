"""``python -m tests.integration.secagg_dropout_client`` + fedpipe's command line: a client
process that kills itself with SIGKILL when asked to unmask in round ``$SECAGG_KILL_ROUND``
(default 1), once its masked input is sent.

The hook lives in the test tree only: nothing the server sends can make a real client die.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from fedpipe.cli import main
from fedpipe.client.secure_session import SecureSession
from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb

_stage = SecureSession.stage
_ROUND = int(os.environ.get("SECAGG_KILL_ROUND", "1"))


def _dies_at_unmask(self: SecureSession, task: Any, reply: Any) -> None:
    if task.kind == pb.TASK_KIND_SECAGG_UNMASK and task.round == _ROUND:
        print(f"round {task.round}: killed at the unmask stage", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    _stage(self, task, reply)


if __name__ == "__main__":
    SecureSession.stage = _dies_at_unmask  # type: ignore[method-assign]
    sys.exit(main())
