"""An in-process simulation keeps its clients' long-lived state out of the garbage collector's
passes while it runs, and hands the collector everything back when it ends."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from fedpipe.common.config import SimulationConfig
from fedpipe.server.simulation import client_datasets, frozen_state, simulate_inprocess


def test_frozen_state_freezes_what_is_alive_and_unfreezes_at_the_end() -> None:
    assert gc.get_freeze_count() == 0
    with frozen_state() as freeze:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        kept = [[i] for i in range(1000)]  # 1,001 new container objects
        freeze()
        assert gc.get_freeze_count() >= frozen + len(kept)
    assert gc.get_freeze_count() == 0


def test_objects_the_process_froze_itself_stay_frozen() -> None:
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with frozen_state() as freeze:
            kept = [[i] for i in range(100)]
            freeze()
            assert gc.get_freeze_count() == before  # left alone
        assert gc.get_freeze_count() == before
        assert kept
    finally:
        gc.unfreeze()


def test_a_simulation_unfreezes_when_it_ends(tmp_path: Path) -> None:
    sim = SimulationConfig.model_validate(
        {
            "n_clients": 4,
            "server": {
                "rounds": 2,
                "min_clients": 4,
                "model": {
                    "name": "softmax-regression",
                    "config": {"n_features": 64, "n_classes": 10},
                },
                "training": {"epochs": 1, "batch_size": 32, "max_steps": 2},
                "output_dir": str(tmp_path),
            },
        }
    )
    rounds: list[int] = []

    def on_round(record: dict[str, object]) -> None:
        rounds.append(gc.get_freeze_count())

    summary = asyncio.run(simulate_inprocess(sim, client_datasets(sim), on_round))
    assert summary.status == "completed"
    assert len(rounds) == 2 and all(count > 0 for count in rounds)
    assert gc.get_freeze_count() == 0
