"""``python -m tests.faults.nonreading_sessions PORT N``: a process holding N sessions that
each accept the run setup and then read nothing; it prints ``ready`` once all N have accepted,
so a test can stop it (SIGSTOP: not even gRPC's own reader drains the sockets any more)."""

from __future__ import annotations

import asyncio
import sys

from fedpipe.proto.fedpipe.v1 import federation_pb2 as pb
from tests.integration.conftest import RawClient


async def accept_setup(client: RawClient) -> None:
    """Accept the run setup, as a client about to train would."""
    setup = await asyncio.wait_for(client.next_task(), 60)
    await client.send(pb.ClientMessage(reply=pb.Reply(task_id=setup.task_id)).SerializeToString())


async def main(port: int, count: int) -> None:
    clients = []
    for i in range(count):  # one at a time: a peer may hold 4 streams awaiting admission
        clients.append(RawClient(port))  # its stream opens here
        await clients[-1].hello(f"stalled-{i}")
    await asyncio.gather(*(accept_setup(client) for client in clients))
    print("ready", flush=True)
    await asyncio.sleep(600)  # bounded: the test stops and kills this process long before
    for client in clients:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
