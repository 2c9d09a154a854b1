"""``python -m tests.faults.nonreading_sessions PORT N``: a process holding N sessions that
each accept the run setup and then read nothing; it prints ``ready`` once all N have accepted,
so a test can stop it (SIGSTOP: not even gRPC's own reader drains the sockets any more)."""

from __future__ import annotations

import asyncio
import sys

from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from tests.integration.conftest import RawClient


async def accept_setup(port: int, name: str) -> RawClient:
    """A session that has accepted the run setup, as a client about to train would."""
    client = RawClient(port)
    await client.hello(name)
    setup = await asyncio.wait_for(client.next_task(), 60)
    await client.send(pb.ClientMessage(reply=pb.Reply(task_id=setup.task_id)).SerializeToString())
    return client


async def main(port: int, count: int) -> None:
    clients = await asyncio.gather(*(accept_setup(port, f"stalled-{i}") for i in range(count)))
    print("ready", flush=True)
    await asyncio.sleep(600)  # bounded: the test stops and kills this process long before
    for client in clients:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
