"""Summarize a ``py-spy record --format raw`` file: top functions by self and inclusive samples.

Usage: ``python benchmarks/spy_top.py profile/server.txt [--top 25] [--idle]``
(``--idle`` keeps samples of idle threads: waiting in epoll, sleeping, queue gets.)
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

IDLE = ("epoll_wait", "select (selectors.py", "_run_once", "wait (threading.py", "poll (")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--idle", action="store_true")
    args = parser.parse_args()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in args.path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        if not args.idle and any(marker in frames[-1] for marker in IDLE):
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"{args.path}: {total} busy samples")
    print("-- self --")
    for frame, n in own.most_common(args.top):
        print(f"{100 * n / total:5.1f}%  {frame}")
    print("-- inclusive --")
    for frame, n in inclusive.most_common(args.top):
        print(f"{100 * n / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
