"""Checkpoints and final models on disk, written atomically (temp file, fsync, rename,
directory fsync).

A checkpoint is a state file (:mod:`fedpipe.common.state_file`) whose magic is ``MAGIC``: the
encoding of the wire, so a checkpoint of any size loads without pickle and without one
protobuf message holding the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedpipe.common.outcome import RunError
from fedpipe.common.state import State
from fedpipe.common.state_file import (
    StateFileError,
    atomic_write,
    read_state_file,
    remove_stale_temp_files,
    write_state_file,
)
from fedpipe.common.vector import Vector
from fedpipe.server.best_model import BEST_MODEL_NAME

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "remove_interrupted_writes",
    "save_checkpoint",
    "save_model",
]

MAGIC = b"FEDPIPE-CKPT-2\n"  # 2: a CRC-32 trailer
CHECKPOINT_NAME = "checkpoint.fpk"
MODEL_NAME = "model.npz"


class CheckpointError(StateFileError, RunError):
    """A checkpoint file is not one, or is damaged; the message names the file."""


def save_checkpoint(path: Path, state: State) -> None:
    """Write ``state`` (Vectors, arrays, plain data) to ``path`` atomically."""
    write_state_file(path, state, MAGIC)


def load_checkpoint(path: Path) -> State:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointError
        Wrong magic, truncated file, sizes the file cannot hold, or an invalid header.
    """
    try:
        return read_state_file(path, MAGIC, "checkpoint")
    except StateFileError as exc:
        raise CheckpointError(str(exc)) from None


def remove_interrupted_writes(output_dir: Path) -> None:
    """Delete the temp files of a checkpoint or model write that a crash interrupted."""
    if output_dir.is_dir():
        for name in (CHECKPOINT_NAME, MODEL_NAME, BEST_MODEL_NAME):
            remove_stale_temp_files(output_dir, name)


def save_model(path: Path, weights: Vector) -> None:
    """Write the weights as an ``.npz`` archive (one array per weight name), atomically.

    ``.npz`` has no bfloat16: bfloat16 arrays are written as float32 (exactly, every bfloat16
    value is a float32); cast them back with ``torch.from_numpy(a).bfloat16()``.
    """
    arrays = {
        n: a.astype(np.float32) if a.dtype.name == "bfloat16" else a
        for n, a in weights.to_numpy().coefs.items()
    }
    atomic_write(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]
