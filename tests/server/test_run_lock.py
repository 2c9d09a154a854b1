"""The run directory lock inside one process: runs built one after another in the same
directory (simulations, resumes) each get it; two at once do not."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from fedpipe.common.config import ServerConfig
from fedpipe.server.clients import ClientPool
from fedpipe.server.rounds import FederatedRun
from fedpipe.server.run_lock import RunDirectoryInUse


def server(tmp_path: Path) -> ServerConfig:
    return ServerConfig.model_validate(
        {"output_dir": str(tmp_path), "model": {"config": {"n_features": 4, "n_classes": 3}}}
    )


def test_a_run_holds_its_directory_until_it_is_closed(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text("{}")
    first = FederatedRun(server(tmp_path), ClientPool())
    (tmp_path / "summary.json").write_text("{}")  # as if the first run had ended
    with pytest.raises(RunDirectoryInUse, match=rf"{tmp_path} is in use .*process {os.getpid()}"):
        FederatedRun(server(tmp_path), ClientPool(), resume=True)
    assert (tmp_path / "summary.json").exists()  # the refused run touched nothing
    first.close()
    with FederatedRun(server(tmp_path), ClientPool(), resume=True) as again:
        assert not (tmp_path / "summary.json").exists()
    FederatedRun(server(tmp_path), ClientPool(), resume=True).close()
    assert again._lock is not None and not again._lock.held


def test_a_dropped_or_failed_run_does_not_keep_the_lock(tmp_path: Path) -> None:
    FederatedRun(server(tmp_path), ClientPool())  # never closed, never referenced
    gc.collect()
    (tmp_path / "checkpoint.fpk").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="checkpoint"):
        FederatedRun(server(tmp_path), ClientPool(), resume=True)
    FederatedRun(server(tmp_path), ClientPool(), overwrite=True).close()  # released


def test_other_directories_are_independent(tmp_path: Path) -> None:
    with FederatedRun(server(tmp_path / "a"), ClientPool()):
        FederatedRun(server(tmp_path / "b"), ClientPool()).close()
