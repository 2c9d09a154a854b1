"""Vectorized local training (torch.func) against LocalTrainer, client by client."""

from __future__ import annotations

import itertools
import logging
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from fedpipe.common.data import Dataset, load_builtin
from fedpipe.common.models.torch_adapter import TorchModel
from fedpipe.common.modules.base import OptiModule
from fedpipe.common.optim import Optimizer
from fedpipe.common.state import copy_state, states_equal
from fedpipe.common.training import LocalTrainer, RunSetup, TrainResult
from fedpipe.common.vector import Vector
from fedpipe.common.vectorized import (
    ClientJob,
    VectorizedTrainer,
    _on_device,
    _plan,
    batch_schedule,
)

SIZES = (37, 64, 100, 150, 9, 64)  # ragged last batches, different step counts
SGD = {"lrate": 0.1}
MOMENTUM = {"lrate": 0.05, "modules": [["momentum", {"beta": 0.9}]]}
ADAM_PROX = {"lrate": 0.01, "modules": ["adam"], "regularizers": [["fedprox", {"mu": 0.1}]]}
CLIPPED = {"lrate": 0.1, "modules": [["l2-global-clipping", {"max_norm": 0.5}], "momentum"]}
DECAY = {"lrate": ["exponential-decay", {"initial": 0.2, "decay_rate": 0.9}], "w_decay": 0.01}
YOGI = {"lrate": 0.01, "modules": [["yogi", {"bias_correction": "torch"}]]}


def mlp(seed: int = 0, batch_norm: bool = False) -> TorchModel:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(64, 24), torch.nn.ReLU()]
    if batch_norm:
        layers.insert(1, torch.nn.BatchNorm1d(24))
    net = torch.nn.Sequential(*layers, torch.nn.Linear(24, 10))
    return TorchModel(net, torch.nn.CrossEntropyLoss(), task="multiclass")


def client_data() -> list[Dataset]:
    digits = load_builtin("digits")
    bounds = np.cumsum((0, *SIZES))
    return [digits.subset(np.arange(a, b)) for a, b in itertools.pairwise(bounds)]


def setup(optimizer: dict[str, Any], **training: Any) -> RunSetup:
    return RunSetup(
        model={"name": "unused-the-trainers-get-a-model", "config": {}},
        client_optimizer=optimizer,
        aggregator="averaging",
        metrics=["loss"],
        training={"batch_size": 16, "epochs": 2, **training},
        seed=7,
    )


def jobs_for(run: RunSetup, model: TorchModel, data: list[Dataset]) -> list[ClientJob]:
    return [ClientJob(f"c{i}", LocalTrainer(run, model=model), d) for i, d in enumerate(data)]


def updates_of(result: TrainResult) -> Vector:
    return result.partial.vector("weighted_sum") * (1.0 / result.partial.number("total_weight"))


def run_both(
    optimizer: dict[str, Any], rounds: int = 2, max_clients: int = 4, **training: Any
) -> tuple[list[list[TrainResult]], list[list[TrainResult]], VectorizedTrainer]:
    """Each round from the same global weights: sequential LocalTrainer vs the engine (module
    state carried across rounds by each client's own optimizer on both sides)."""
    run, data = setup(optimizer, **training), client_data()
    seq_model, vec_model = mlp(), mlp()
    weights = seq_model.get_weights(copy=True)
    seq_jobs, vec_jobs = jobs_for(run, seq_model, data), jobs_for(run, vec_model, data)
    engine = VectorizedTrainer(vec_model, max_clients=max_clients)
    seq, vec = [], []
    for round_number in range(1, rounds + 1):
        seq.append(
            [j.trainer.train(j.data, weights, {}, client=j.name, round_number=round_number)
             for j in seq_jobs]
        )  # fmt: skip
        vec.append(list(engine.train(vec_jobs, weights, round_number)))
        weights = weights + updates_of(seq[-1][0]) * -0.5  # a new global model, same for both
    return seq, vec, engine


def own_modules_both(
    modules: Any, lrate: float, max_clients: int
) -> list[tuple[list[TrainResult], list[TrainResult], list[ClientJob]]]:
    """Rounds 1 and 2 from the same weights, every client's optimizer ``modules()`` (user
    modules, fresh per client) at ``lrate``: each round's sequential results, the engine's,
    and the engine's jobs."""
    run, data = setup(SGD), client_data()
    seq_model, vec_model = mlp(), mlp()
    weights = seq_model.get_weights(copy=True)
    seq_jobs, vec_jobs = jobs_for(run, seq_model, data), jobs_for(run, vec_model, data)
    for job in seq_jobs + vec_jobs:
        job.trainer.optimizer = Optimizer(lrate=lrate, modules=modules())
    engine = VectorizedTrainer(vec_model, max_clients=max_clients)
    rounds = []
    for round_number in (1, 2):
        vec = list(engine.train(vec_jobs, weights, round_number))
        seq = [
            j.trainer.train(j.data, weights, {}, client=j.name, round_number=round_number)
            for j in seq_jobs
        ]
        rounds.append((seq, vec, vec_jobs))
    return rounds


@pytest.mark.parametrize(
    "optimizer",
    [SGD, MOMENTUM, ADAM_PROX, CLIPPED, DECAY],
    ids=["sgd", "momentum", "adam+fedprox", "clipping", "scheduler+w_decay"],
)
def test_vectorized_equals_sequential(optimizer: dict[str, Any]) -> None:
    seq, vec, engine = run_both(optimizer)
    assert engine.fallback is None
    assert_same(seq, vec)


def assert_same(seq: list[list[TrainResult]], vec: list[list[TrainResult]]) -> None:
    """The engine's results are the sequential ones: counts exact, updates to float tolerance."""
    for seq_round, vec_round in zip(seq, vec, strict=True):
        for s, v in zip(seq_round, vec_round, strict=True):
            assert (v.n_samples, v.n_steps, v.n_samples_seen) == (
                s.n_samples,
                s.n_steps,
                s.n_samples_seen,
            )
            assert v.loss_sum == pytest.approx(s.loss_sum, rel=1e-5)
            su, vu = updates_of(s), updates_of(v)
            assert su.norm() > 1e-3  # the clients did move
            assert vu.allclose(su, rtol=1e-4, atol=1e-5), (su - vu).abs().norms()


def test_client_data_kept_on_the_device_stays_within_its_budget() -> None:
    run, data = setup(SGD), client_data()
    weights = mlp().get_weights(copy=True)
    kept = []
    bounded = VectorizedTrainer(mlp(), max_clients=2, data_budget=1)  # no client fits
    unbounded = VectorizedTrainer(mlp(), max_clients=2)
    jobs, free_jobs = jobs_for(run, bounded.model, data), jobs_for(run, unbounded.model, data)
    for round_number in (1, 2):
        got = list(bounded.train(jobs, weights, round_number))
        kept.append(sorted(job.name for job in jobs if job.data in bounded.data))
        free = list(unbounded.train(free_jobs, weights, round_number))
        for a, b in zip(got, free, strict=True):
            assert updates_of(a).allclose(updates_of(b), rtol=0, atol=0)
    # only the last chunk's clients are left (a chunk's own data always stays while it trains)
    assert kept == [["c4", "c5"], ["c4", "c5"]]
    assert [job.name for job in free_jobs if job.data in unbounded.data] == [
        f"c{i}" for i in range(len(SIZES))
    ]
    assert bounded.data.nbytes == sum(d.x.size * 4 + d.y.size * 8 for d in data[4:])  # f32, i64


def test_steps_follow_local_trainer_schedule() -> None:
    """Client sizes 37 and 9 with batch 16, 2 epochs: 3+3 and 1+1 steps, last batches 5, 9."""
    run, data = setup(SGD), client_data()
    jobs = jobs_for(run, mlp(), data)
    sizes = [[len(r) for r in batch_schedule(j, 1)] for j in jobs]
    assert sizes[0] == [16, 16, 5, 16, 16, 5]
    assert sizes[4] == [9, 9]
    first = batch_schedule(jobs[0], 1)
    assert sorted(np.concatenate(first[:3]).tolist()) == list(range(37))
    assert not np.array_equal(first[0], first[3])  # a fresh shuffle in epoch 2


def test_max_steps_and_drop_remainder() -> None:
    seq, vec, _ = run_both(MOMENTUM, rounds=1, max_steps=5, drop_remainder=True)
    assert [r.n_steps for r in vec[0]] == [4, 5, 5, 5, 0, 5]
    for s, v in zip(seq[0], vec[0], strict=True):
        assert v.n_steps == s.n_steps
        assert updates_of(v).allclose(updates_of(s), rtol=1e-4, atol=1e-5)


def test_unvectorizable_model_falls_back_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Batch norm updates its running statistics in place: not possible inside vmap."""
    run, data = setup(SGD), client_data()
    model = mlp(batch_norm=True)
    reference = mlp(batch_norm=True)  # same seed, same initial weights
    weights = model.get_weights(copy=True)
    engine = VectorizedTrainer(model, max_clients=4)
    with caplog.at_level(logging.WARNING, logger="fedpipe.common.vectorized"):
        for round_number in (1, 2):
            results = list(engine.train(jobs_for(run, model, data), weights, round_number))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "model Sequential cannot run inside torch.func.vmap" in lines[0]
    ref_jobs = jobs_for(run, reference, data)  # batch-norm statistics carry over: 2 rounds too
    for round_number in (1, 2):
        expected = [
            j.trainer.train(j.data, weights, {}, client=j.name, round_number=round_number)
            for j in ref_jobs
        ]
    for got, want in zip(results, expected, strict=True):
        assert updates_of(got).array_equal(updates_of(want))


def engine_log(optimizer: dict[str, Any], caplog: pytest.LogCaptureFixture) -> list[str]:
    with caplog.at_level(logging.INFO, logger="fedpipe.common.vectorized"):
        run_both(optimizer, rounds=2)
    return [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("optimizer", [MOMENTUM, CLIPPED], ids=["momentum", "clipping"])
def test_pipeline_runs_stacked_inside_vmap(
    optimizer: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """No log line: the module pipeline runs inside vmap (clipping with per-client norms)."""
    assert engine_log(optimizer, caplog) == []


@pytest.mark.parametrize("optimizer", [ADAM_PROX, YOGI], ids=["adam+fedprox", "yogi"])
def test_clients_whose_step_counts_differ_train_stacked_round_after_round(
    optimizer: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """After round 1 the six clients' step counters are 6, 8, 14, 20, 2 and 8: from round 2
    on the pipeline runs one vmapped call per step count (c1 and c5 together), not client
    by client (which logs a line)."""
    with caplog.at_level(logging.INFO, logger="fedpipe.common.vectorized"):
        seq, vec, engine = run_both(optimizer, rounds=3, max_clients=6)
    assert [r.getMessage() for r in caplog.records] == []
    assert engine.fallback is None
    assert_same(seq, vec)


def test_a_chunk_of_fresh_and_trained_clients_trains_stacked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Partial participation: round 1 trains c0, c2 and c4; round 2 all six in one chunk,
    three of them with Adam's fresh state (no moments yet, step 0). Each client ends with
    its own state, as trained one by one."""
    run, data = setup(ADAM_PROX), client_data()
    seq_model, vec_model = mlp(), mlp()
    weights = seq_model.get_weights(copy=True)
    seq_jobs, vec_jobs = jobs_for(run, seq_model, data), jobs_for(run, vec_model, data)
    engine = VectorizedTrainer(vec_model, max_clients=6)
    seq, vec = [], []
    with caplog.at_level(logging.INFO, logger="fedpipe.common.vectorized"):
        for round_number, picked in ((1, [0, 2, 4]), (2, [0, 1, 2, 3, 4, 5])):
            seq.append(
                [seq_jobs[k].trainer.train(data[k], weights, {}, client=f"c{k}",
                                           round_number=round_number) for k in picked]
            )  # fmt: skip
            vec.append(list(engine.train([vec_jobs[k] for k in picked], weights, round_number)))
    assert [r.getMessage() for r in caplog.records] == []
    assert_same(seq, vec)
    adam = [job.trainer.optimizer.modules[0].get_state() for job in vec_jobs]
    assert [state["step"] for state in adam] == [12, 8, 28, 20, 4, 8]
    for job, state in zip(seq_jobs, adam, strict=True):
        want = job.trainer.optimizer.modules[0].get_state()
        assert state["step"] == want["step"]
        assert state["m"].allclose(want["m"], rtol=1e-4, atol=1e-6)


def test_a_chunk_failing_mid_step_gives_every_client_its_state_back() -> None:
    """Round 2: at step 0 the batch-16 clients (five step counts, five vmapped calls) step,
    then c4 (9 samples, a batch alone) fails on labels out of range: every client's
    optimizer is as round 1 left it, for the caller to train them again one by one."""
    run, data = setup({"lrate": 0.01, "modules": ["adam"]}), client_data()
    model = mlp()
    weights = model.get_weights(copy=True)
    engine = VectorizedTrainer(model, max_clients=6)
    jobs = jobs_for(run, model, data)
    list(engine.train(jobs, weights, 1))
    before = [copy_state(job.trainer.optimizer.get_state()) for job in jobs]
    jobs[4].data = Dataset(data[4].x, np.full_like(data[4].y, 99))
    with pytest.raises(RuntimeError, match="index 99 is out of bounds"):
        list(engine.train(jobs, weights, 2))
    assert [job.trainer.optimizer.step for job in jobs] == [6, 8, 14, 20, 2, 8]
    for job, state in zip(jobs, before, strict=True):
        assert states_equal(job.trainer.optimizer.get_state(), state)


def test_momentum_state_is_each_clients_own_after_the_round() -> None:
    """Each client's buffer is a slice of stacked state; each client keeps its own after."""
    run, data = setup(MOMENTUM), client_data()
    model = mlp()
    jobs = jobs_for(run, model, data)
    list(VectorizedTrainer(model).train(jobs, model.get_weights(copy=True), 1))
    buffers = [j.trainer.optimizer.modules[0].get_state()["buffer"] for j in jobs]
    assert all(isinstance(b, Vector) for b in buffers)
    assert buffers[0].norm() != pytest.approx(buffers[1].norm())
    assert [j.trainer.optimizer.step for j in jobs] == [6, 8, 14, 20, 2, 8]


class NormGate(OptiModule, register_name=False):
    """Halves gradients above a norm, in Python: data-dependent control flow."""

    name: ClassVar[str] = "norm-gate"

    def run(self, gradients: Vector) -> Vector:
        return gradients * 0.5 if gradients.norm() > 1.0 else gradients


def test_module_that_cannot_vmap_runs_client_by_client_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="fedpipe.common.vectorized"):
        seq, vec, _ = own_modules_both(lambda: [NormGate(), "momentum"], 0.1, max_clients=4)[-1]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "module norm-gate cannot run inside torch.func.vmap" in lines[0]
    for s, v in zip(seq, vec, strict=True):
        assert updates_of(v).allclose(updates_of(s), rtol=1e-4, atol=1e-5)


def test_max_clients_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_clients=0; expected at least 1"):
        VectorizedTrainer(mlp(), max_clients=0)


def test_the_step_plan_holds_every_clients_batches_in_one_device_array() -> None:
    """Clients of different sizes: step t groups the clients by batch size; every index of
    the round lies in one array (one host-to-device copy per round, not one per step)."""
    rng = np.random.default_rng(0)
    sizes = [[4, 4, 2], [4, 4, 4, 1], [4, 4]]
    schedules = [[rng.integers(0, 9, size=b) for b in steps] for steps in sizes]
    plan = _on_device(_plan(schedules), torch.device("cpu"))
    got = [(t, members, sel.tolist(), index.tolist()) for t, members, sel, index in plan]
    want = []
    for t in range(4):
        by_size: dict[int, list[int]] = {}
        for k, steps in enumerate(schedules):
            if t < len(steps):
                by_size.setdefault(len(steps[t]), []).append(k)
        for members in by_size.values():
            want.append((t, members, members, [schedules[k][t].tolist() for k in members]))
    assert got == want
    storage = {sel.untyped_storage().data_ptr() for _, _, sel, _ in plan}
    storage |= {index.untyped_storage().data_ptr() for _, _, _, index in plan}
    assert len(storage) == 1


def test_a_dataset_given_new_arrays_trains_on_them_not_on_the_kept_copy() -> None:
    # a client whose data changed between rounds (Dataset.x and .y are plain attributes)
    run, data = setup(SGD), client_data()[:2]
    model = mlp()
    weights = model.get_weights(copy=True)
    engine = VectorizedTrainer(model)
    jobs = jobs_for(run, model, [Dataset(d.x, d.y) for d in data])
    list(engine.train_stacked(jobs, weights, 1))
    other = client_data()[4]
    jobs[0].data.x, jobs[0].data.y = other.x, other.y
    got = next(engine.train_stacked(jobs, weights, 2))
    fresh_jobs = jobs_for(run, mlp(), [other, data[1]])
    want = next(VectorizedTrainer(mlp()).train_stacked(fresh_jobs, weights, 2))
    assert got.n_samples.tolist() == want.n_samples.tolist() == [len(other), len(data[1])]
    for name, rows in want.updates.items():
        assert torch.equal(got.updates[name], rows)


def test_half_precision_numpy_weights_train_as_the_same_weights_on_the_device() -> None:
    # the torch cohort hands the engine the round's numpy weights: bfloat16 ones are
    # ml_dtypes arrays, which torch.as_tensor refuses (every round fell back, with a warning)
    pytest.importorskip("ml_dtypes")
    run, data = setup(MOMENTUM), client_data()[:3]
    model = mlp()
    model.module.to(torch.bfloat16)
    model.to("cpu")
    on_device = model.get_weights(copy=True)
    on_host = on_device.to_numpy()
    assert str(on_host.coefs["0.weight"].dtype) == "bfloat16"
    engine = VectorizedTrainer(model)
    got = next(engine.train_stacked(jobs_for(run, model, data), on_host, 1))
    want = next(engine.train_stacked(jobs_for(run, model, data), on_device, 1))
    for name, rows in want.updates.items():
        assert rows.dtype == torch.bfloat16 and torch.equal(got.updates[name], rows)
    np.testing.assert_array_equal(got.loss_sum, want.loss_sum)


def test_the_next_chunk_is_planned_before_this_chunks_losses_are_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the host's work for chunk k + 1 happens while the device trains chunk k: before the
    # loss read that waits for chunk k, not after the caller has added chunk k up
    from fedpipe.common import vectorized

    events: list[str] = []
    schedules, cpu = vectorized.batch_schedules, torch.Tensor.cpu

    def planned(jobs: list[ClientJob], round_number: int) -> list[list[np.ndarray]]:
        events.append(f"plan {jobs[0].name}")
        return schedules(jobs, round_number)

    def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if tensor.dtype == torch.float64:  # the chunk's loss sums
            events.append("read")
        return cpu(tensor, *args, **kwargs)

    monkeypatch.setattr(vectorized, "batch_schedules", planned)
    monkeypatch.setattr(torch.Tensor, "cpu", read)
    run, data = setup(SGD), client_data()
    model = mlp()
    engine = VectorizedTrainer(model, max_clients=2)
    for done in engine.train_stacked(jobs_for(run, model, data), model.get_weights(), 1):
        events.append(f"chunk of {len(done.n_samples)}")
    assert events == [
        "plan c0", "plan c2", "read", "chunk of 2",
        "plan c4", "read", "chunk of 2",
        "read", "chunk of 2",
    ]  # fmt: skip


def test_a_chunk_whose_planning_fails_fails_itself_not_the_chunk_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedpipe.common import vectorized

    schedules = vectorized.batch_schedules

    def planned(jobs: list[ClientJob], round_number: int) -> list[list[np.ndarray]]:
        if jobs[0].name == "c2":
            raise ValueError("client c2's data went away")
        return schedules(jobs, round_number)

    monkeypatch.setattr(vectorized, "batch_schedules", planned)
    run, data = setup(SGD), client_data()
    model = mlp()
    engine = VectorizedTrainer(model, max_clients=2)
    chunks = engine.train_stacked(jobs_for(run, model, data), model.get_weights(), 1)
    first = next(chunks)  # its planning ahead of c2's chunk failed: not its failure
    assert first.n_samples.tolist() == [SIZES[0], SIZES[1]]
    with pytest.raises(ValueError, match="client c2's data went away"):
        next(chunks)


class TaggedMomentum(OptiModule, register_name=False):
    """Momentum whose state holds a tuple with a list: outside :data:`State`, but a user
    module's to keep (in process its state never crosses the wire)."""

    name: ClassVar[str] = "tagged-momentum"

    def __init__(self) -> None:
        self.buffer: Vector | None = None
        self.tag: Any = ("steps", [0])

    def run(self, gradients: Vector) -> Vector:
        self.buffer = gradients.copy() if self.buffer is None else self.buffer * 0.9 + gradients
        self.tag = ("steps", [self.tag[1][0] + 1])
        return self.buffer

    def get_state(self) -> Any:
        return {"buffer": self.buffer, "tag": self.tag}

    def set_state(self, state: Any) -> None:
        self.buffer, self.tag = state["buffer"], state["tag"]


def test_a_state_holding_an_unhashable_plain_value_trains_stacked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the clients are grouped by their plain values: a tuple holding a list is no dict key
    with caplog.at_level(logging.INFO, logger="fedpipe.common.vectorized"):
        rounds = own_modules_both(lambda: [TaggedMomentum()], 0.05, max_clients=6)
    for seq, vec, _ in rounds:
        assert_same([seq], [vec])
    assert [r.getMessage() for r in caplog.records] == []
    vec_jobs = rounds[-1][2]
    tags = [job.trainer.optimizer.modules[0].tag for job in vec_jobs]
    assert tags == [("steps", [n]) for n in (12, 16, 28, 40, 4, 16)]
