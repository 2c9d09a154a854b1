"""Update validation: a client sending a scaled, sign-flipped update among honest ones on
digits is rejected (or down-weighted) with one log line naming it, its norm and the median,
and the run keeps its accuracy; the rule's arithmetic on streamed and buffered replies."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest

from fedpipe.common.aggregators.replies import ReplyBuffer
from fedpipe.common.config import ServerConfig, ValidationConfig
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector
from fedpipe.server.transports.inprocess import InProcessClient
from fedpipe.server.update_validation import OutlierUpdateError, UpdateValidation
from tests.server.test_robust_rounds import SignFlipper, five_clients
from tests.server.test_rounds import _pool_run

LINE = re.compile(
    r"client (\S+): (?:rejected reply: )?update norm (\S+) exceeds 3 x the median norm (\S+): "
    r"(rejected|down-weighted by \S+)"
)


def run_poisoned(tmp_path: Path, aggregator: Any, validation: Any, poisoned: bool = True) -> Any:
    sim = five_clients(tmp_path, aggregator)
    sim = sim.model_copy(
        update={"server": sim.server.model_copy(update={"validation": validation})}
    )
    run, pool = _pool_run(sim)
    if poisoned:
        honest = pool.clients()[0]
        assert isinstance(honest, InProcessClient)
        flipper = SignFlipper(honest.name, honest.train_data, honest.eval_data, honest._models)
        asyncio.run(pool.remove(honest))
        asyncio.run(pool.add(flipper))
    with run:
        return asyncio.run(run.run()), run


@pytest.mark.parametrize("aggregator", ["averaging", "geometric-median"])
def test_a_scaled_hostile_update_is_rejected_with_a_log_line_and_accuracy_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, aggregator: str
) -> None:
    validation = ValidationConfig(max_norm_ratio=3.0, action="reject")
    clean, _ = run_poisoned(tmp_path / "clean", aggregator, None, poisoned=False)
    with caplog.at_level(logging.WARNING):
        guarded, run = run_poisoned(tmp_path / "guarded", aggregator, validation)
    lines = [LINE.search(r.getMessage()) for r in caplog.records]
    found = [m for m in lines if m]
    # One line per rejection, each naming the flipper, its norm and a median 10 x below it;
    # streamed, the run's first replies are not judged yet (the flipper's was one of them).
    assert len(found) == (7 if aggregator == "averaging" else 8)
    for match in found:
        assert match.group(1) == "client-0" and match.group(4) == "rejected"
        assert float(match.group(2)) > 3 * float(match.group(3)) > 0
    assert all("client-0" not in r["clients"] for r in guarded.history[1:])
    assert run.base_rounds.get("client-0", 0) <= 1  # no rejected reply became a base round
    assert guarded.history[-1]["accuracy"] >= clean.history[-1]["accuracy"] - 0.02


def test_downweighting_keeps_the_outlier_scaled_to_the_bound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    validation = ValidationConfig(max_norm_ratio=3.0, action="downweight")
    averaged, _ = run_poisoned(tmp_path / "avg", "averaging", None)
    with caplog.at_level(logging.WARNING):
        guarded, _ = run_poisoned(tmp_path / "guarded", "averaging", validation)
    found = [m for m in (LINE.search(r.getMessage()) for r in caplog.records) if m]
    assert len(found) >= 7  # the first round's first replies are not judged yet
    assert all(m.group(4).startswith("down-weighted by 0.") for m in found)
    assert all("client-0" in r["clients"] for r in guarded.history)  # kept, scaled
    # A sign-flipped update scaled to the bound still pulls the wrong way: down-weighting
    # bounds the damage (plain averaging: 0.04 when written, down-weighted: 0.46), rejection
    # removes it.
    assert averaged.history[-1]["accuracy"] < 0.3
    assert guarded.history[-1]["accuracy"] > averaged.history[-1]["accuracy"] + 0.2


def test_streamed_updates_are_judged_once_min_norms_are_known() -> None:
    check = UpdateValidation(ValidationConfig(max_norm_ratio=3.0, min_norms=3))
    assert check.judge("a", 1.0) == 1.0  # 1 norm known: not judged
    assert check.judge("b", 2.0) == 1.0
    with pytest.raises(OutlierUpdateError, match=r"norm 100 exceeds 3 x the median norm 2: rej"):
        check.judge("c", 100.0)  # median of [1, 2, 100]
    assert check.judge("d", 7.0) == 1.0  # median of [1, 2, 100, 7]: 4.5
    check.end_round()
    assert check.previous == [1.0, 2.0, 100.0, 7.0]


def test_the_previous_rounds_norms_judge_the_first_replies_and_survive_a_checkpoint() -> None:
    check = UpdateValidation(ValidationConfig(max_norm_ratio=3.0, action="downweight"))
    for name, norm in (("a", 1.0), ("b", 2.0), ("c", 1.5)):
        assert check.judge(name, norm) == 1.0
    check.end_round()
    resumed = UpdateValidation(check.config)
    resumed.set_state(check.get_state())
    # median of [1, 2, 1.5, 20] = 1.75: bound 5.25, scale 5.25 / 20
    assert resumed.judge("d", 20.0) == pytest.approx(5.25 / 20)
    with pytest.raises(ValueError, match="not a list of norms"):
        resumed.set_state({"previous": "1.0"})


@pytest.mark.parametrize("memory_bytes", [1 << 20, 0])
def test_a_closed_rounds_outliers_are_dropped_or_scaled_in_the_kept_replies(
    memory_bytes: int, tmp_path: Path
) -> None:
    norms = [1.0, 2.0, 1.5, 30.0, 4.0]  # median 2: bound 6
    buffer = ReplyBuffer(memory_bytes, tmp_path)
    for i, norm in enumerate(norms):
        update = Vector({"w": np.array([0.6, 0.8]) * norm})
        update.coefs["w"].flags.writeable = i % 2 == 0  # decoded replies are read-only
        buffer.add_(Summable({"update": update, "n_samples": 10 + i}))
    names = [f"client-{i}" for i in range(5)]
    rejected = UpdateValidation(ValidationConfig()).screen(buffer, list(names))
    assert rejected == ["client-3"]
    assert buffer.n_samples == [10, 11, 12, 14] and buffer.norms == pytest.approx([1, 2, 1.5, 4])
    scaled = UpdateValidation(ValidationConfig(action="downweight"))
    buffer = ReplyBuffer(memory_bytes, tmp_path)
    for i, norm in enumerate(norms):
        update = Vector({"w": np.array([0.6, 0.8]) * norm})
        update.coefs["w"].flags.writeable = i % 2 == 0
        buffer.add_(Summable({"update": update, "n_samples": 10 + i}))
    assert scaled.screen(buffer, names) == []
    np.testing.assert_allclose(buffer.block("w", 0, 2)[3], [3.6, 4.8])  # norm 6, the bound
    assert buffer.norms[3] == pytest.approx(6.0)
    buffer.close()


def test_validation_config_says_what_it_expects() -> None:
    with pytest.raises(ValueError, match="max_norm_ratio\n  Input should be greater than 1"):
        ServerConfig.model_validate({"validation": {"max_norm_ratio": 1.0}})
    with pytest.raises(ValueError, match="action\n  Input should be 'reject' or 'downweight'"):
        ServerConfig.model_validate({"validation": {"action": "drop"}})


MODEL_CONFIG = {"n_features": 64, "n_classes": 10}


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (
            {
                "client_optimizer": {"modules": ["scaffold-client"]},
                "server_optimizer": {"modules": ["scaffold-server"]},
            },
            "server_optimizer module 'scaffold-server' (aux var 'scaffold')",
        ),
        (
            {"model": {"name": "mlp", "buffers": "average", "config": MODEL_CONFIG}},
            "model.buffers='average'",
        ),
    ],
)
def test_validation_at_a_buffered_rounds_close_refuses_what_it_could_not_take_back(
    tmp_path: Path, change: dict[str, Any], what: str
) -> None:
    """A reply rejected when the round closes has already gone into the aux-var and buffer
    sums: such runs are refused, not silently half-screened."""
    from fedpipe.common.config import ConfigError
    from fedpipe.server.clients import ClientPool
    from fedpipe.server.rounds import FederatedRun

    config = ServerConfig.model_validate(
        {
            "aggregator": "median",
            "model": {"name": "softmax-regression", "config": MODEL_CONFIG},
            "validation": {"max_norm_ratio": 3.0},
            "output_dir": str(tmp_path / "run"),
            **change,
        }
    )
    with pytest.raises(
        ConfigError, match=re.escape(f"validation (aggregator 'median') with {what}")
    ):
        FederatedRun(config, ClientPool())


def test_downweighting_under_fltrust_is_refused_since_it_would_do_nothing() -> None:
    from fedpipe.common.config import ServerConfig

    fltrust = ["fltrust", {"dataset": "digits", "samples": 50}]
    with pytest.raises(
        pydantic.ValidationError, match="would do nothing with aggregator 'fltrust'"
    ):
        ServerConfig.model_validate({"aggregator": fltrust, "validation": {"action": "downweight"}})
    ServerConfig.model_validate({"aggregator": fltrust, "validation": {"action": "reject"}})
    ServerConfig.model_validate({"aggregator": "median", "validation": {"action": "downweight"}})


def test_an_aggregator_spec_without_a_name_is_left_to_the_builder(tmp_path: Path) -> None:
    """The downweight check reads the spec's name: an empty list is the builder's to refuse,
    not an IndexError out of the config's validation."""
    from fedpipe.common.config import ConfigError
    from fedpipe.server.clients import ClientPool
    from fedpipe.server.rounds import FederatedRun

    config = ServerConfig.model_validate(
        {
            "aggregator": [],
            "model": {"name": "softmax-regression", "config": MODEL_CONFIG},
            "validation": {"action": "downweight"},
            "output_dir": str(tmp_path / "run"),
        }
    )
    with pytest.raises(ConfigError, match=re.escape("cannot build a aggregator from []")):
        FederatedRun(config, ClientPool())
