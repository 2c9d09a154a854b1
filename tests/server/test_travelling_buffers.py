"""``model.buffers``: batch-norm statistics stay on each client (``local``), or travel beside
the update, averaged by the server and untouched by every optimizer module (``average``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedpipe.common.aggregators import AveragingAggregator  # noqa: E402
from fedpipe.common.aggregators.median import CoordinateMedian  # noqa: E402
from fedpipe.common.buffers import (  # noqa: E402
    BUFFERS_AUX,
    buffers_share,
    mean_buffers,
    split_buffers,
)
from fedpipe.common.config import ConfigError, PrivacyConfig, SimulationConfig  # noqa: E402
from fedpipe.common.optim import Optimizer  # noqa: E402
from fedpipe.common.training import LocalTrainer, TrainResult  # noqa: E402
from fedpipe.common.vector import ArraySpec, Vector  # noqa: E402
from fedpipe.server.checkpoint import load_checkpoint  # noqa: E402
from fedpipe.server.clients import ClientError, ClientPool  # noqa: E402
from fedpipe.server.rounds import FederatedRun, RunSummary, _Fold  # noqa: E402
from fedpipe.server.simulation import simulate  # noqa: E402

STATS = ["1.running_mean", "1.running_var"]  # float buffers; 1.num_batches_tracked is int64
TINY_CLIP = [["l2-global-clipping", {"max_norm": 1e-6}]]

Reply = tuple[str, int, dict[str, np.ndarray], set[str]]


def sim(tmp_path: Path, buffers: str, rounds: int = 1) -> SimulationConfig:
    model = {"name": "tests.common.torch_models:build_batchnorm", "buffers": buffers}
    model["config"] = {"n_features": 64, "n_classes": 10}
    server = {
        "rounds": rounds,
        "min_clients": 3,
        "model": model,
        # tiny clipping on both sides: the update barely moves, the statistics must not care
        "client_optimizer": {"lrate": 0.1, "modules": TINY_CLIP},
        "server_optimizer": {"lrate": 1.0, "modules": TINY_CLIP},
        "training": {"batch_size": 16, "max_steps": 3, "drop_remainder": True},
        "output_dir": str(tmp_path / "run"),
    }
    return SimulationConfig.model_validate({"n_clients": 3, "dataset": "digits", "server": server})


@pytest.fixture
def replies(monkeypatch: pytest.MonkeyPatch) -> list[Reply]:
    """Each train reply: its client, its n_samples, the client's buffers after training, and
    the aux-var names it sent."""
    seen: list[Reply] = []
    train = LocalTrainer.train

    def spy(self: LocalTrainer, *args: Any, **kwargs: Any) -> TrainResult:
        result = train(self, *args, **kwargs)
        own = {n: np.array(a) for n, a in self.buffers.to_numpy().coefs.items()}
        seen.append((kwargs["client"], result.n_samples, own, set(result.aux_vars)))
        return result

    monkeypatch.setattr(LocalTrainer, "train", spy)
    return seen


def weighted_mean(replies: list[Reply], name: str) -> np.ndarray:
    total = sum(n * own[name].astype(np.float64) for _, n, own, _ in replies)
    return total / sum(n for _, n, _, _ in replies)


def test_local_buffers_never_reach_the_server(tmp_path: Path, replies: list[Reply]) -> None:
    summary = simulate(sim(tmp_path, "local"))
    assert summary.status == "completed"
    assert [aux for *_, aux in replies] == [set()] * 3
    assert not any(name in summary.weights for name in STATS)
    run = tmp_path / "run"
    assert "buffers" not in load_checkpoint(run / "checkpoint.fpk")
    with np.load(run / "model.npz") as npz:
        assert sorted(npz.files) == sorted(summary.weights.coefs)
    means = [own["1.running_mean"] for *_, own, _ in replies]
    assert not np.allclose(means[0], means[1])  # each client's own statistics


def check_round(tmp_path: Path, replies: list[Reply], summary: RunSummary) -> np.ndarray:
    """The checkpoint's buffers are the sample-weighted mean of the last round's clients'."""
    assert summary.status == "completed"
    assert all(aux == {BUFFERS_AUX} for *_, aux in replies)
    last = replies[-3:]
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.fpk")["buffers"]
    assert sorted(saved.coefs) == STATS  # type: ignore[union-attr]
    for name in STATS:
        got = saved.coefs[name]  # type: ignore[union-attr]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, weighted_mean(last, name), rtol=1e-6, atol=1e-6)
    return np.asarray(saved.coefs["1.running_mean"])  # type: ignore[union-attr]


def test_averaged_buffers_are_the_sample_weighted_mean_past_every_module(
    tmp_path: Path, replies: list[Reply]
) -> None:
    config = sim(tmp_path, "average", rounds=2)
    summary = simulate(config)
    mean = check_round(tmp_path, replies, summary)
    # clipping to a norm of 1e-6 on both sides: the statistics moved from their start (zeros)
    # by far more, since no module touched them
    assert np.abs(mean).max() > 0.1
    with np.load(tmp_path / "run" / "model.npz") as npz:
        np.testing.assert_array_equal(npz["1.running_mean"], mean)
        assert "1.num_batches_tracked" not in npz.files
    # a resumed server carries on from the checkpoint's global buffers
    with FederatedRun(config.server, ClientPool(), resume=True) as resumed:
        assert resumed.buffers is not None
        np.testing.assert_array_equal(resumed.buffers.coefs["1.running_mean"], mean)


@pytest.mark.parametrize(
    ("buffer_specs", "sent", "message"),
    [
        (None, True, "the reply has buffers; in this run they stay local"),
        (
            {"1.running_mean": ArraySpec((8,), "float32")},
            False,
            "has no buffers; in this run they travel",
        ),
    ],
)
def test_a_reply_that_breaks_the_runs_buffer_mode_is_rejected(
    buffer_specs: dict[str, ArraySpec] | None, sent: bool, message: str
) -> None:
    weights = Vector({"w": np.zeros(2, np.float32)})
    aggregator = AveragingAggregator()
    aux = {BUFFERS_AUX: buffers_share(Vector({"1.running_mean": np.ones(8, np.float32)}), 4)}
    result = TrainResult(
        aggregator.prepare(weights, n_samples=4, n_steps=1), aux if sent else {}, 4, 1, 1.0
    )
    fold = _Fold(aggregator, Optimizer(lrate=1.0), weights.specs(), buffer_specs=buffer_specs)
    with pytest.raises(ClientError, match=message):
        fold.validate(result)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_buffers_travel_from_and_to_gpu_clients(tmp_path: Path, replies: list[Reply]) -> None:
    config = sim(tmp_path, "average", rounds=2).model_copy(update={"device": "cuda"})
    check_round(tmp_path, replies, simulate(config))


def test_travelling_buffers_are_refused_with_dp(tmp_path: Path) -> None:
    # The clients' batch-norm statistics would go into the released model unclipped and
    # un-noised, past client-level DP.
    config = sim(tmp_path, "average")
    config.server.sampler = ["poisson", {"q": 1.0}]
    config.server.aggregator = ["averaging", {"weighting": "uniform"}]
    config.server.privacy = PrivacyConfig(clip=1.0, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match=r"privacy with model\.buffers='average'"):
        simulate(config)


@pytest.mark.parametrize(
    ("aggregator", "want"),
    [
        (AveragingAggregator(weighting="uniform"), 2.0),  # the liar's 1e6 samples ignored
        (AveragingAggregator(), (1e6 * 3.0 + 4 * 1.0) / (1e6 + 4)),  # samples: as reported
        (CoordinateMedian(), 2.0),  # no weighting: one client, one say
    ],
)
def test_the_servers_weighting_decides_each_clients_say_over_the_buffers(
    aggregator: Any, want: float
) -> None:
    weights = Vector({"w": np.zeros(2, np.float32)})
    specs = {"1.running_mean": ArraySpec((8,), "float32")}
    fold = _Fold(aggregator, Optimizer(lrate=1.0), weights.specs(), buffer_specs=specs)
    for n, value in ((4, 1.0), (1_000_000, 3.0)):  # the second client claims a million samples
        share = buffers_share(Vector({"1.running_mean": np.full(8, value, np.float32)}), n)
        partial = aggregator.prepare(weights.copy(), n_samples=n, n_steps=1)
        fold._checked_add(TrainResult(partial, {BUFFERS_AUX: share}, n, 1, 1.0), f"c{n}")
    shares, _ = split_buffers(fold.aux_total)
    assert shares is not None
    mean = mean_buffers(shares, specs).coefs["1.running_mean"]
    np.testing.assert_allclose(mean, np.full(8, want, np.float32), rtol=1e-6)


def test_huge_finite_buffers_cannot_overflow_the_mean() -> None:
    weights = Vector({"w": np.zeros(2, np.float32)})
    specs = {"1.running_mean": ArraySpec((8,), "float32")}
    aggregator = AveragingAggregator()
    fold = _Fold(aggregator, Optimizer(lrate=1.0), weights.specs(), buffer_specs=specs)
    for k in range(3):  # each share is finite in float32; their float32 sum is not
        share = buffers_share(Vector({"1.running_mean": np.full(8, 3e38, np.float32)}), 1)
        partial = aggregator.prepare(weights.copy(), n_samples=1, n_steps=1)
        fold._checked_add(TrainResult(partial, {BUFFERS_AUX: share}, 1, 1, 1.0), f"c{k}")
    shares, _ = split_buffers(fold.aux_total)
    assert shares is not None
    mean = mean_buffers(shares, specs)
    assert mean.is_finite()
    np.testing.assert_allclose(mean.coefs["1.running_mean"], 3e38, rtol=1e-6)
