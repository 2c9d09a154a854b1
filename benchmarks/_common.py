"""Shared plumbing of the benchmarks: real server and client processes, RSS watching, floors.

Not a benchmark itself. The scripts next to it import it (``python benchmarks/<name>.py`` puts
this folder on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpipe.common.data import Dataset, save_dataset

MIB = 1 << 20


# ---- small utilities ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` memory field in bytes (``VmHWM``, ``VmRSS``); 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_peak_rss() -> int:
    return proc_status(os.getpid(), "VmHWM")


def fmt_bytes(n: float) -> str:
    return f"{n / MIB:,.0f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.2f} GiB"


def best_of(repeat: int, func: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {"median": float("nan"), "mean": float("nan"), "min": float("nan"), "n": 0}
    return {
        "median": statistics.median(seconds),
        "mean": statistics.fmean(seconds),
        "min": min(seconds),
        "max": max(seconds),
        "n": len(seconds),
    }


def verdict(value: float, target: float) -> str:
    return f"{'OK  ' if value <= target else 'MISS'} (target <= {target:g}, x{value / target:.2f})"


# ---- floors -------------------------------------------------------------------------------------


def memcpy_floor(nbytes: int, copies: int, repeat: int = 5) -> float:
    """Seconds to ``np.copyto`` an ``nbytes`` buffer ``copies`` times (preallocated targets)."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)

    def run() -> None:
        for _ in range(copies):
            np.copyto(dst, src)

    return best_of(repeat, run)


# ---- processes --------------------------------------------------------------------------------


class RssWatcher:
    """Polls the peak RSS (``VmHWM``) of processes until stopped (it dies with a process, so it
    is read while the process lives)."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.pids = dict(pids)
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        #: (perf_counter, VmRSS) samples of each process, to see when memory peaks.
        self.series: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self.pids[name] = pid
            self.peak.setdefault(name, 0)
            self.series.setdefault(name, [])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def poll(self) -> None:
        with self._lock:
            now = time.perf_counter()
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], proc_status(pid, "VmHWM"))
                rss = proc_status(pid, "VmRSS")
                if rss:
                    self.series[name].append((now, rss))

    def cpu(self) -> dict[str, float]:
        with self._lock:
            return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def __enter__(self) -> RssWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class FederationRun:
    records: list[dict[str, Any]]
    #: perf_counter() when each "round N/M" progress line reached us (includes checkpointing).
    round_stamps: list[float]
    server_peak_rss: int
    client_peak_rss: list[int]
    wall_seconds: float
    server_log: str
    client_logs: list[str] = field(default_factory=list)
    #: (seconds since start, VmRSS) of the server, polled every 50 ms.
    server_rss: list[tuple[float, int]] = field(default_factory=list)
    #: (seconds since start, VmRSS) of client 0, polled every 50 ms.
    client_rss: list[tuple[float, int]] = field(default_factory=list)
    #: CPU seconds of each process at each progress line.
    cpu_stamps: list[dict[str, float]] = field(default_factory=list)

    def cpu_per_round(self, skip: int = 1) -> dict[str, float]:
        """CPU seconds per round of the server and of the clients (summed), after warm-up."""
        if len(self.cpu_stamps) < skip + 2:
            return {}
        first, last = self.cpu_stamps[skip], self.cpu_stamps[-1]
        rounds = len(self.cpu_stamps) - 1 - skip
        server = (last["server"] - first["server"]) / rounds
        clients = sum(last[k] - first[k] for k in last if k != "server") / rounds
        return {"server": server, "clients": clients}

    def round_seconds(self, skip: int = 1) -> list[float]:
        """Server-measured ``seconds`` of each round after the first ``skip`` (warm-up)."""
        return [float(r["seconds"]) for r in self.records[skip:]]

    def round_intervals(self, skip: int = 1) -> list[float]:
        """Wall time between successive rounds' progress lines, after the warm-up: round time
        plus checkpoint plus metrics files."""
        stamps = self.round_stamps[skip:]
        return [b - a for a, b in itertools_pairwise(stamps)]


def itertools_pairwise(items: Sequence[float]) -> Iterator[tuple[float, float]]:
    return itertools.pairwise(items)


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"server did not listen on port {port} within {timeout}s")


def _spy(profile_dir: Path | None, name: str, cmd: list[str]) -> list[str]:
    """``cmd`` under ``py-spy record`` (speedscope and flame SVG-free raw output) if asked."""
    if profile_dir is None:
        return cmd
    profile_dir.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    out = profile_dir / f"{name}.txt"
    return [str(spy), "record", "--format", "raw", "-o", str(out), "--rate", "200", "--", *cmd]


def _spied(pid: int, timeout: float = 10.0) -> int:
    """The pid of the process py-spy ``pid`` started (the one whose memory matters)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, IndexError):
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            return int(children[0])
        time.sleep(0.05)
    return pid


def run_federation(
    server_config: dict[str, Any],
    clients: list[Dataset],
    workdir: Path,
    *,
    timeout: float = 1800.0,
    profile_dir: Path | None = None,
    verbose: bool = False,
    client_env: dict[str, str] | None = None,
) -> FederationRun:
    """Run ``fedpipe server --config`` and one ``fedpipe client`` process per dataset, as a
    user would, and collect the per-round records, timings and peak RSS of every process."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    output_dir = workdir / "run"
    config = dict(server_config, host="127.0.0.1", port=port, output_dir=str(output_dir))
    config.setdefault("min_clients", len(clients))
    config_path = workdir / "server.json"
    config_path.write_text(json.dumps(config))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    fedpipe = [sys.executable, "-m", "fedpipe"]
    if verbose:
        fedpipe.append("-v")
    server_cmd = _spy(profile_dir, "server", [*fedpipe, "server", "--config", str(config_path)])
    data_dirs = [save_dataset(d, workdir / f"client-{i}") for i, d in enumerate(clients)]

    stamps: list[float] = []
    cpu_stamps: list[dict[str, float]] = []
    watcher = RssWatcher({})
    server_lines: list[str] = []
    procs: list[subprocess.Popen[Any]] = []
    client_logs = [workdir / f"client-{i}.log" for i in range(len(clients))]
    start = time.perf_counter()
    server = subprocess.Popen(
        server_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    procs.append(server)

    def read_server() -> None:
        assert server.stdout is not None
        for line in server.stdout:
            if line.startswith("round "):
                stamps.append(time.perf_counter())
                cpu_stamps.append(watcher.cpu())
            server_lines.append(line)

    reader = threading.Thread(target=read_server, daemon=True)
    reader.start()
    try:
        watcher.add("server", server.pid)
        with watcher:
            wait_listening(port, server, 60)
            if profile_dir is not None:
                watcher.add("server", _spied(server.pid))
            for i, folder in enumerate(data_dirs):
                log = open(client_logs[i], "wb")
                cmd = [*fedpipe, "client", "--server", f"127.0.0.1:{port}"]
                cmd += ["--name", f"client-{i}", "--data", str(folder), "--eval-fraction", "0"]
                if i == 0:
                    cmd = _spy(profile_dir, "client-0", cmd)
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, **(client_env or {})}
                )
                log.close()
                procs.append(proc)
                watcher.add(f"client-{i}", proc.pid)
                if i == 0 and profile_dir is not None:
                    watcher.add("client-0", _spied(proc.pid))
            deadline = time.monotonic() + timeout
            while server.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run did not finish within {timeout}s")
                time.sleep(0.05)
            wall = time.perf_counter() - start
            for proc in procs[1:]:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            watcher.poll()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)
    log_text = "".join(server_lines)
    if server.returncode != 0:
        raise RuntimeError(f"server exited with {server.returncode}:\n{log_text[-4000:]}")
    metrics = output_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return FederationRun(
        records=records,
        round_stamps=[t - start for t in stamps],
        server_peak_rss=watcher.peak["server"],
        client_peak_rss=[watcher.peak[f"client-{i}"] for i in range(len(clients))],
        wall_seconds=wall,
        server_log=log_text,
        client_logs=[p.read_text(errors="replace") for p in client_logs],
        cpu_stamps=cpu_stamps,
        server_rss=[(t - start, rss) for t, rss in watcher.series["server"]],
        client_rss=[(t - start, rss) for t, rss in watcher.series.get("client-0", [])],
    )


# ---- raw gRPC floor ----------------------------------------------------------------------------

ECHO_METHOD = "/bench.Echo/Stream"


def grpc_options(chunk_bytes: int) -> list[tuple[str, int]]:
    limit = 2 * chunk_bytes + MIB
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


async def _echo_server(port: int, chunk_bytes: int) -> None:
    import grpc

    async def stream(request_iterator: Any, context: Any) -> Any:
        # The client announces how many bytes to send it ("down"), then uploads the same amount
        # ("up"); the server replies with a one-byte ack once it has it all.
        first = await context.read()
        total = int.from_bytes(first, "little")
        payload = memoryview(bytes(total))
        for offset in range(0, total, chunk_bytes):
            await context.write(bytes(payload[offset : offset + chunk_bytes]))
        got = 0
        while got < total:
            frame = await context.read()
            if frame is grpc.aio.EOF:
                return
            got += len(frame)
        await context.write(b"\x01")

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(stream)}
    )
    server = grpc.aio.server(options=grpc_options(chunk_bytes))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _echo_clients(port: int, nbytes: int, n_clients: int, chunk_bytes: int) -> float:
    """Seconds for ``n_clients`` concurrent streams to each get ``nbytes`` down and send them
    back up (one process per side of the wire, like the server and its clients)."""
    import grpc

    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(chunk_bytes))
        for _ in range(n_clients)
    ]
    upload = memoryview(bytes(nbytes))

    async def one(channel: Any) -> None:
        call = channel.stream_stream(ECHO_METHOD)()
        await call.write(nbytes.to_bytes(8, "little"))
        got = 0
        received = bytearray(nbytes)  # land the bytes somewhere, like the assembler does
        while got < nbytes:
            frame = await call.read()
            received[got : got + len(frame)] = frame
            got += len(frame)
        for offset in range(0, nbytes, chunk_bytes):
            await call.write(bytes(upload[offset : offset + chunk_bytes]))
        await call.read()
        await call.done_writing()

    try:
        await asyncio.gather(*(one(c) for c in channels))  # warm-up: connections, windows
        start = time.perf_counter()
        await asyncio.gather(*(one(c) for c in channels))
        return time.perf_counter() - start
    finally:
        for channel in channels:
            await channel.close()


def grpc_floor(nbytes: int, n_clients: int, chunk_bytes: int = 4 * MIB, repeat: int = 3) -> float:
    """Best-of-``repeat`` seconds of the raw gRPC floor (server in a child process)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "echo-server", str(port), str(chunk_bytes)],
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        wait_listening(port, server, 30)
        return min(
            asyncio.run(_echo_clients(port, nbytes, n_clients, chunk_bytes)) for _ in range(repeat)
        )
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__" and sys.argv[1:2] == ["echo-server"]:
    asyncio.run(_echo_server(int(sys.argv[2]), int(sys.argv[3])))
