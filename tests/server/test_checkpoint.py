"""Checkpoint files: atomic writes, stale temp files, and damaged files read without trust."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.common import state_file
from fedpipe.common.config import ServerConfig
from fedpipe.common.vector import Vector
from fedpipe.proto.fedpipe.v1 import tensor_pb2
from fedpipe.server.checkpoint import MAGIC, CheckpointError, load_checkpoint, save_checkpoint
from fedpipe.server.clients import ClientPool
from fedpipe.server.rounds import FederatedRun


def sample_state() -> dict[str, Any]:
    weights = Vector({"kernel": np.arange(12, dtype=np.float32).reshape(4, 3), "bias": np.ones(3)})
    return {"round": 2, "weights": weights, "history": [{"round": 1, "loss": 0.5}], "rng": "{}"}


def server(tmp_path: Path) -> ServerConfig:
    return ServerConfig.model_validate(
        {"output_dir": str(tmp_path), "model": {"config": {"n_features": 4, "n_classes": 3}}}
    )


def test_a_checkpoint_round_trips_and_its_directory_entry_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(state_file.os, "fsync", fsync)
    path = tmp_path / "checkpoint.fpk"
    save_checkpoint(path, sample_state())
    assert synced == [False, True]  # the file's data, then the directory holding the rename
    loaded = load_checkpoint(path)
    assert loaded["weights"].array_equal(sample_state()["weights"])  # type: ignore[union-attr]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.fpk"]


def test_every_truncation_and_header_flip_is_a_checkpoint_error_naming_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "checkpoint.fpk"
    save_checkpoint(path, sample_state())
    good = path.read_bytes()
    header_end = len(MAGIC) + 8 + int.from_bytes(good[len(MAGIC) : len(MAGIC) + 8], "little")
    for size in range(len(good)):
        path.write_bytes(good[:size])
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            load_checkpoint(path)
    for position in range(header_end):
        damaged = bytearray(good)
        damaged[position] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            load_checkpoint(path)  # a flip may leave a valid header (a name, a float)
        except CheckpointError as exc:
            assert str(path) in str(exc)
    path.write_bytes(good + b"\0")
    with pytest.raises(CheckpointError, match=r"tensors hold \d+ bytes, but \d+ bytes follow"):
        load_checkpoint(path)


def test_sizes_a_damaged_file_announces_are_bounded_by_the_file_before_allocating(
    tmp_path: Path,
) -> None:
    path = tmp_path / "checkpoint.fpk"
    path.write_bytes(MAGIC + (1 << 63).to_bytes(8, "little") + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"header is \d+ bytes long, but the file holds 16"):
        load_checkpoint(path)
    spec = tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DTYPE_FLOAT64, shape=[1 << 40, 1 << 20])
    header = tensor_pb2.PayloadHeader(tensors=[spec], total_bytes=1 << 63)
    header.structure.map_value.entries.add(key="w").value.tensor_ref.index = 0
    raw = header.SerializeToString()
    path.write_bytes(MAGIC + len(raw).to_bytes(8, "little") + raw + b"\0" * 64)
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(path)


def test_a_checkpoint_of_another_run_is_refused_by_name(tmp_path: Path) -> None:
    state = sample_state()
    state["weights"] = Vector({"kernel": np.zeros((5, 3), np.float32), "bias": np.zeros(3)})
    save_checkpoint(tmp_path / "checkpoint.fpk", state)
    with pytest.raises(CheckpointError, match=r"checkpoint\.fpk does not fit this run"):
        FederatedRun(server(tmp_path), ClientPool(), resume=True)


def test_temp_files_of_an_interrupted_write_are_removed_at_start(tmp_path: Path) -> None:
    for name in (".checkpoint.fpk.tmp-4242", ".model.npz.tmp-17", "notes.txt"):
        (tmp_path / name).write_bytes(b"partial")
    FederatedRun(server(tmp_path), ClientPool()).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "notes.txt"]


def test_every_flipped_bit_is_a_checkpoint_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.fpk"
    save_checkpoint(path, sample_state())
    good = path.read_bytes()
    data_start = len(good) - 4 - (12 * 4 + 3 * 8)  # the kernel's and the bias's bytes
    for position in range(len(MAGIC), len(good)):
        for bit in range(8):
            damaged = bytearray(good)
            damaged[position] ^= 1 << bit
            path.write_bytes(bytes(damaged))
            with pytest.raises(CheckpointError, match=re.escape(str(path))) as err:
                load_checkpoint(path)
            if position >= data_start:  # tensor bytes decode fine: only the checksum tells
                assert "checksum" in str(err.value)


def test_a_checkpoint_of_an_older_format_says_so(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.fpk"
    save_checkpoint(path, sample_state())
    path.write_bytes(b"FEDPIPE-CKPT-1\n" + path.read_bytes()[len(MAGIC) :])
    older = r"checkpoint\.fpk is a checkpoint written by an older fedpipe \(format 1; "
    with pytest.raises(CheckpointError, match=older):
        load_checkpoint(path)
