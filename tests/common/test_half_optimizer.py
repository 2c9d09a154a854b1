"""Client optimizer modules under half-precision models (float16, bfloat16): their maths and
state in float32, their output rounded to the model's dtype once (fedpipe issue 8: float16
weights went NaN with the default ``adam``: its ``eps=1e-8`` is 0 in float16 and
``(1 - beta_2) g^2`` underflows)."""

from __future__ import annotations

import functools
from typing import Any, TypeAlias

import ml_dtypes
import numpy as np
import pytest
import torch

from fedpipe.common.codec import state_from_bytes, state_to_bytes
from fedpipe.common.data import Dataset, load_builtin
from fedpipe.common.optim import Optimizer
from fedpipe.common.state import State
from fedpipe.common.training import LocalTrainer, RunSetup, TrainResult
from fedpipe.common.vector import Vector
from fedpipe.common.vectorized import ClientJob, VectorizedTrainer
from tests.common.torch_models import build

Rounds: TypeAlias = tuple[list[list[Vector]], list[State]]

#: Every built-in module with state that a gradient feeds (neither aux vars nor noise).
STATEFUL = ["adam", ["adam", {"amsgrad": True}], "rmsprop", ["rmsprop", {"centered": True}]]
STATEFUL += ["adagrad", "yogi", "momentum", "ewma"]
ADAPTIVE = ["adam", "rmsprop", "adagrad", "yogi"]
LRATE, STEPS = 0.01, 4
#: How far a half-precision run's weights may move from a float32 run's: the median weight,
#: within 4 of the dtype's eps of the rounds' steps (``LRATE * STEPS``). The median, because
#: adaptive modules step every weight by about the learning rate whatever its gradient's size,
#: so a near-zero gradient that half precision rounds to zero or to the other sign moves its
#: weight a full step off (RMSProp's first steps are 10 learning rates). Measured over this
#: file's runs (torch 2.13, CPU): at most 0.6 (float16) and 0.7 (bfloat16) of that eps.
MEDIAN_EPS = 4


def half_gradients(dtype: np.dtype[Any], steps: int) -> list[Vector]:
    """Gradients whose squares are float16 subnormals or zero (|g| < 2.4e-4 and < 6e-8),
    among ordinary ones, and exact zeros."""
    rng = np.random.default_rng(3)
    out = []
    for _ in range(steps):
        scale = np.array([1e-5, 1e-4, 3e-3, 0.5, 0.0, 2.0])
        values = rng.normal(size=(3, 6)) * scale
        out.append(Vector({"w": values.astype(dtype), "b": values[0].astype(dtype)}))
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("module", STATEFUL, ids=str)
def test_half_gradients_run_the_modules_in_float32_rounded_once(
    module: Any, backend: str, dtype: str
) -> None:
    half, wide = Optimizer(modules=[module]), Optimizer(modules=[module])
    like = Vector({"x": torch.zeros(1)}) if backend == "torch" else None
    for gradients in half_gradients(np.dtype(getattr(ml_dtypes, dtype, dtype)), steps=4):
        gradients = gradients if like is None else gradients.like(like)
        out = half.run_modules(gradients)
        want = wide.run_modules(gradients.widened())
        assert out.specs() == gradients.specs()
        assert out.is_finite()
        assert out.array_equal(want.astype(gradients.specs()))  # bit for bit
    assert state_dtypes(half.get_state()) == {"float32"}


def test_float32_gradients_go_through_the_modules_themselves() -> None:
    optimizer = Optimizer(modules=["momentum"])
    gradients = Vector({"w": np.ones(3, np.float32)})
    assert optimizer.run_modules(gradients) is optimizer.modules[0].buffer  # no cast, no copy


def torch_setup(module: Any) -> RunSetup:
    return RunSetup(
        model={"name": "unused-the-trainers-get-a-model", "config": {}},
        client_optimizer={"lrate": LRATE, "modules": [module]},
        aggregator="averaging",
        metrics=["loss"],
        training={"batch_size": 16, "epochs": 1, "max_steps": STEPS},
        seed=7,
    )


@functools.cache
def digits(n_clients: int = 2) -> list[Dataset]:
    data = load_builtin("digits")
    return [data.subset(np.arange(60 * k, 60 * k + 50)) for k in range(n_clients)]


def updates_of(result: TrainResult) -> Vector:
    return result.partial.vector("weighted_sum") * (1.0 / result.partial.number("total_weight"))


def median_error(updates: Vector, reference: Vector) -> float:
    """The median over the weights of ``|updates - reference|``, in steps' lengths."""
    gaps = (updates.widened() - reference).abs().to_numpy()
    return float(np.median(np.concatenate([a.ravel() for a in gaps.coefs.values()]))) / (
        LRATE * STEPS
    )


def train_rounds(dtype: str, module: Any, mode: str, start: dict[str, Any]) -> Rounds:
    """Two rounds of two clients from ``start``: each round's updates and the final states."""
    model = build(hidden=16, dtype=dtype)
    run = torch_setup(module)
    jobs = [ClientJob(f"c{k}", LocalTrainer(run, model=model), d) for k, d in enumerate(digits())]
    weights = Vector(start).astype(model.weight_specs())
    rounds: list[list[Vector]] = []
    for round_number in (1, 2):
        if mode == "vectorized":
            results = list(VectorizedTrainer(model).train(jobs, weights, round_number))
        else:
            results = [
                job.trainer.train(job.data, weights, {}, client=job.name, round_number=round_number)
                for job in jobs
            ]
        rounds.append([updates_of(result) for result in results])
    return rounds, [job.trainer.optimizer.get_state() for job in jobs]


@functools.cache
def half_start(dtype: str) -> dict[str, Any]:
    """A ``dtype`` model's initial weights, as float32 tensors (exact)."""
    return build(hidden=16, dtype=dtype).get_weights(copy=True).widened().coefs


@functools.cache
def float32_run(dtype: str, module: str) -> Rounds:
    """The float32 model's run from the ``dtype`` model's start (shared by both modes)."""
    return train_rounds("float32", module, "sequential", half_start(dtype))


def state_dtypes(state: State) -> set[str]:
    module_state = state["modules"][0]["state"]  # type: ignore[index]
    return {
        s.dtype for v in module_state.values() if isinstance(v, Vector) for s in v.specs().values()
    }


@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
@pytest.mark.parametrize("module", ADAPTIVE)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_model_trains_with_default_modules_as_a_float32_one(
    dtype: str, module: str, mode: str
) -> None:
    got, states = train_rounds(dtype, module, mode, half_start(dtype))
    want, _ = float32_run(dtype, module)
    eps = float(torch.finfo(getattr(torch, dtype)).eps)
    for got_round, want_round in zip(got, want, strict=True):
        for updates, reference in zip(got_round, want_round, strict=True):
            assert updates.is_finite()
            assert {s.dtype for s in updates.specs().values()} == {dtype}
            assert reference.norm() > 1e-2  # the clients did move
            assert median_error(updates, reference) <= MEDIAN_EPS * eps
    assert all(state_dtypes(state) == {"float32"} for state in states)


def test_a_float16_numpy_model_trains_with_default_adam_as_a_float32_one() -> None:
    data = digits(1)[0]

    def trained(dtype: str) -> Vector:
        run = RunSetup(
            model={
                "name": "softmax-regression",
                "config": {"n_features": 64, "n_classes": 10, "dtype": dtype},
            },
            client_optimizer={"lrate": 0.01, "modules": ["adam"]},
            aggregator="averaging",
            metrics=["loss"],
            training={"batch_size": 16, "epochs": 1, "max_steps": STEPS},
            seed=1,
        )
        trainer = LocalTrainer(run)
        start = trainer.model.get_weights(copy=True).astype(trainer.model.weight_specs())
        return updates_of(trainer.train(data, start, {}, client="c0", round_number=1))

    half, reference = trained("float16"), trained("float32")
    assert half.is_finite() and half["kernel"].dtype == np.float16
    assert reference.norm() > 1e-2
    eps = float(np.finfo(np.float16).eps)
    assert median_error(half, reference) <= MEDIAN_EPS * eps


def test_a_float16_clients_float32_state_resumes_bit_identically_across_processes() -> None:
    run = torch_setup("adam")
    data = digits(1)[0]
    model = build(hidden=16, dtype="float16")
    weights = model.get_weights(copy=True)
    straight, resumed = LocalTrainer(run, model=model), LocalTrainer(run, model=model)
    first = straight.train(data, weights, {}, client="c0", round_number=1)
    saved = state_from_bytes(state_to_bytes(straight.optimizer.get_state()))  # as persisted
    assert state_dtypes(saved) == {"float32"}
    resumed.optimizer.set_state(saved)
    want = straight.train(data, weights, {}, client="c0", round_number=2)
    got = resumed.train(data, weights, {}, client="c0", round_number=2)
    assert updates_of(first).norm() > 0
    assert updates_of(got).array_equal(updates_of(want))


def test_a_half_clients_scaffold_delta_travels_in_the_models_dtype_and_fits_the_server() -> None:
    gradients = half_gradients(np.dtype("float16"), steps=2)
    specs = gradients[0].specs()
    client = Optimizer(modules=["scaffold-client"])
    server = Optimizer(lrate=1.0, modules=["scaffold-server"])
    for step in gradients:
        client.run_modules(step)
    aux = client.collect_aux_var(specs)["scaffold"]
    mean = (gradients[0].widened() + gradients[1].widened()) / 2.0  # c_i, from c = 0
    assert aux.vector("delta").array_equal(mean.astype(specs))  # rounded once, to float16
    assert state_dtypes(client.get_state()) == {"float32"}
    server.run_modules(gradients[0].widened())  # the server steps its float32 master
    server.check_aux_var({"scaffold": aux})  # a float16 delta fits its float32 sum
    server.process_aux_var({"scaffold": aux.accumulator()}, senders=["c0"])
    (global_state,) = server.collect_aux_var().values()
    client.process_aux_var({"scaffold": global_state})  # c in float32, c_i in float32
    out = client.run_modules(gradients[0])
    assert out.specs() == specs
    want = gradients[0].widened() - mean + mean.astype(specs).widened()  # g - c_i + c
    assert out.array_equal(want.astype(specs))


def test_a_half_precision_module_state_saved_before_float32_state_resumes_widened() -> None:
    first, second = half_gradients(np.dtype("float16"), steps=2)
    saved = {"step": 1, "m": first * 0.1, "v": first.square() * 0.001, "v_max": None}
    old = {"step": 1, "regularizers": [], "modules": [{"name": "adam", "state": saved}]}
    optimizer, reference = Optimizer(modules=["adam"]), Optimizer(modules=["adam"])
    optimizer.set_state(old)  # type: ignore[arg-type]
    reference.modules[0].set_state({**saved, "m": saved["m"].widened(), "v": saved["v"].widened()})
    assert state_dtypes(optimizer.get_state()) == {"float32"}
    out = optimizer.run_modules(second)
    assert out.array_equal(reference.run_modules(second.widened()).astype(second.specs()))
