"""``mode = "vectorized"`` in the in-process simulation: the clients of a round that share a
device slot train in one engine call, with the results of the sequential mode."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedpipe.common.data import Dataset  # noqa: E402
from fedpipe.common.vectorized import ClientJob, VectorizedTrainer  # noqa: E402
from fedpipe.server import simulation  # noqa: E402
from fedpipe.server.rounds import RunSummary  # noqa: E402
from fedpipe.server.simulation import simulate  # noqa: E402
from tests.server.test_inprocess import CLIENTS, ROUNDS, SCAFFOLD, sim_config  # noqa: E402

README = Path(__file__).parents[2] / "README.md"


def run(tmp_path: Path, mode: str, device: Any = "cpu", **server: Any) -> RunSummary:
    extra = server.pop("sim", {})
    sim = sim_config(tmp_path / mode, device, **server)
    return simulate(sim.model_copy(update={"mode": mode, **extra}))


def assert_same_run(vectorized: RunSummary, sequential: RunSummary) -> None:
    assert vectorized.status == sequential.status == "completed"
    assert vectorized.weights.allclose(sequential.weights, rtol=0, atol=1e-5)
    for v, s in zip(vectorized.history, sequential.history, strict=True):
        assert v["replied"] == s["replied"]
        assert v["train_loss"] == pytest.approx(s["train_loss"], abs=1e-5)
        assert v["accuracy"] == pytest.approx(s["accuracy"], abs=1e-9)


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, list[str]]]:
    """Each engine call: its thread, its round and its clients."""
    calls: list[tuple[str, int, list[str]]] = []
    for method in ("train", "train_stacked"):  # reply by reply, or the round as one cohort
        spy = _spied(getattr(VectorizedTrainer, method), method, calls)
        monkeypatch.setattr(VectorizedTrainer, method, spy)
    return calls


def _spied(train: Any, method: str, calls: list[tuple[str, int, list[str]]]) -> Any:
    def spy(self: VectorizedTrainer, jobs: list[ClientJob], *args: Any) -> Iterator[Any]:
        thread = threading.current_thread().name
        calls.append((f"{method}@{thread}", args[1], [j.name for j in jobs]))
        return train(self, jobs, *args)  # type: ignore[no-any-return]

    return spy


def test_one_engine_call_per_round_trains_every_client_as_the_sequential_mode(
    tmp_path: Path, engine_calls: list[tuple[str, int, list[str]]]
) -> None:
    vectorized = run(tmp_path, "vectorized")
    names = [f"client-{i}" for i in range(CLIENTS)]
    # one device: the round trains as one cohort, summed on the device, on its thread
    on_device = "train_stacked@fedpipe-sim-0_0"
    assert engine_calls == [(on_device, r, names) for r in range(1, ROUNDS + 1)]
    sequential = run(tmp_path, "sequential")
    assert_same_run(vectorized, sequential)
    # The digits MLP after 3 rounds of 4 steps (momentum 0.9): both modes, same accuracy.
    assert vectorized.history[-1]["accuracy"] == pytest.approx(0.49, abs=0.01)


BF16_ADAM_PROX: dict[str, Any] = {
    "model": {
        "name": "tests.common.torch_models:build",
        "config": {"hidden": 16, "dtype": "bfloat16"},
    },
    "client_optimizer": {
        "lrate": 0.01,
        "modules": ["adam"],
        "regularizers": [["fedprox", {"mu": 0.1}]],
    },
}


def test_a_bfloat16_model_with_fedprox_and_adam_trains_as_one_cohort(
    tmp_path: Path,
    engine_calls: list[tuple[str, int, list[str]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the clients' FedProx anchors are bfloat16: their weights were once a float32 copy (the
    # server's master of half weights), every round failed and trained one after another
    with caplog.at_level(logging.INFO, logger="fedpipe"):
        vectorized = run(tmp_path, "vectorized", **BF16_ADAM_PROX)
    names = [f"client-{i}" for i in range(CLIENTS)]
    on_device = "train_stacked@fedpipe-sim-0_0"
    assert engine_calls == [(on_device, r, names) for r in range(1, ROUNDS + 1)]
    quiet = (
        "fedpipe.common.vectorized",
        "fedpipe.server.stacked_cohort",
        "fedpipe.server.slot_batches",
    )
    assert [r.getMessage() for r in caplog.records if r.name in quiet] == []
    sequential = run(tmp_path, "sequential", **BF16_ADAM_PROX)
    assert vectorized.status == sequential.status == "completed"
    assert str(vectorized.weights.coefs["0.weight"].dtype) == "bfloat16"
    # bfloat16 rounds the gradients, and Adam makes a near-zero one's last bit a full step
    # (the learning rate) of either sign: the engine test pins the maths (test_vectorized_dtypes)
    assert vectorized.weights.allclose(sequential.weights, rtol=0, atol=0.01)
    assert [r["replied"] for r in vectorized.history] == [CLIENTS] * ROUNDS


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_model_with_scaffold_federates_in_both_modes(
    tmp_path: Path, dtype: str
) -> None:
    # The clients' control variates are float32 (a half model's module state) and their
    # deltas travel in the model's dtype; the server sums them in float32 and sends c back in
    # float32. Every reply was rejected before: a half delta against the server's float32 sum.
    model = {"name": "tests.common.torch_models:build", "config": {"hidden": 16, "dtype": dtype}}
    vectorized = run(tmp_path, "vectorized", model=model, **SCAFFOLD)
    sequential = run(tmp_path, "sequential", model=model, **SCAFFOLD)
    for summary in (vectorized, sequential):
        assert summary.status == "completed"
        assert [r["replied"] for r in summary.history] == [CLIENTS] * ROUNDS
        assert str(summary.weights.coefs["0.weight"].dtype) == dtype
    # both modes' gradients round differently in the dtype: a weight's last bit or two
    assert vectorized.weights.allclose(sequential.weights, rtol=0, atol=0.01)


def test_two_slots_batch_their_own_clients_and_match_the_sequential_mode(
    tmp_path: Path, engine_calls: list[tuple[str, int, list[str]]]
) -> None:
    vectorized = run(tmp_path, "vectorized", ["cpu", "cpu"])
    # several devices: one batch per device slot, replies folded one by one in client order
    slot0 = ("train@fedpipe-sim-0_0", ["client-0", "client-2", "client-4"])
    slot1 = ("train@fedpipe-sim-1_0", ["client-1", "client-3"])
    assert sorted((t, r, n) for t, r, n in engine_calls) == sorted(
        (t, r, n) for r in range(1, ROUNDS + 1) for t, n in (slot0, slot1)
    )
    assert_same_run(vectorized, run(tmp_path, "sequential", ["cpu", "cpu"]))


def test_stack_clients_bounds_the_clients_stacked_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stacked: list[int] = []
    chunk = VectorizedTrainer._trained

    def spy(self: VectorizedTrainer, jobs: list[ClientJob], *args: Any) -> Any:
        stacked.append(len(jobs))
        return chunk(self, jobs, *args)

    monkeypatch.setattr(VectorizedTrainer, "_trained", spy)
    vectorized = run(tmp_path, "vectorized", sim={"stack_clients": 2})
    assert stacked == [2, 2, 1] * ROUNDS
    assert_same_run(vectorized, run(tmp_path, "sequential"))


def test_a_module_that_cannot_be_vectorized_trains_client_by_client_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fedpipe.common.vectorized"):
        vectorized = run(tmp_path, "vectorized", **SCAFFOLD)
    said = [r.getMessage() for r in caplog.records if r.name == "fedpipe.common.vectorized"]
    assert said == [
        "vectorized training: optimizer runs client by client: module scaffold-client "
        "exchanges auxiliary variables"
    ]
    assert_same_run(vectorized, run(tmp_path, "sequential", **SCAFFOLD))


@pytest.fixture
def bad_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """client-2's training labels are out of range: its training raises."""
    partition = simulation.client_datasets

    def broken(*args: Any) -> list[tuple[str, Dataset, Dataset | None]]:
        clients = partition(*args)
        name, train, test = clients[2]
        clients[2] = (name, Dataset(train.x, np.full_like(train.y, 99)), test)
        return clients

    monkeypatch.setattr(simulation, "client_datasets", broken)


def test_a_failing_client_fails_alone(
    tmp_path: Path, bad_labels: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedpipe.server.slot_batches"):
        vectorized = run(tmp_path, "vectorized")
    others = [f"client-{i}" for i in range(CLIENTS) if i != 2]
    assert [r["clients"] for r in vectorized.history] == [others] * ROUNDS
    retried = [r.getMessage() for r in caplog.records if r.name == "fedpipe.server.slot_batches"]
    assert len(retried) == ROUNDS
    assert retried[0].startswith(
        "round 1: vectorized training of 5 client(s) failed (RuntimeError: "
    )
    assert retried[0].endswith("they train one after another")
    assert_same_run(vectorized, run(tmp_path, "sequential"))


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """client-3's training inputs hold a NaN: its loss and update are not finite."""
    partition = simulation.client_datasets

    def broken(*args: Any) -> list[tuple[str, Dataset, Dataset | None]]:
        clients = partition(*args)
        name, train, test = clients[3]
        x = np.array(train.x, copy=True)
        x[:, 0] = np.nan
        clients[3] = (name, Dataset(x, train.y), test)
        return clients

    monkeypatch.setattr(simulation, "client_datasets", broken)


def test_a_non_finite_client_is_left_out_of_the_device_sum_as_one_by_one(
    tmp_path: Path, poisoned: None, engine_calls: list[tuple[str, int, list[str]]]
) -> None:
    vectorized = run(tmp_path, "vectorized")
    assert {method for method, _, _ in engine_calls} == {"train_stacked@fedpipe-sim-0_0"}
    sequential = run(tmp_path, "sequential")
    assert_same_run(vectorized, sequential)
    others = [f"client-{i}" for i in range(CLIENTS) if i != 3]
    assert [r["clients"] for r in vectorized.history] == [others] * ROUNDS
    for mode in ("vectorized", "sequential"):
        lines = (tmp_path / mode / "run" / "clients.jsonl").read_text().splitlines()
        errors = {json.loads(line).get("error") for line in lines if '"client-3"' in line}
        assert errors == {"rejected reply: field 'weighted_sum' holds NaN or infinite values"}


def test_the_readme_documents_the_vectorized_mode() -> None:
    text = README.read_text()
    section = text[text.index("### On GPUs") : text.index("## From Python")]
    assert 'mode = "vectorized"' in section and "stack_clients = " in section


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_cohort_sums_on_the_device_as_the_sequential_mode(
    tmp_path: Path, engine_calls: list[tuple[str, int, list[str]]]
) -> None:
    vectorized = run(tmp_path, "vectorized", "cuda:0")
    assert {method for method, _, _ in engine_calls} == {"train_stacked@fedpipe-sim-0_0"}
    sequential = run(tmp_path, "sequential", "cuda:0")
    assert vectorized.status == sequential.status == "completed"
    assert vectorized.weights.allclose(sequential.weights, rtol=0, atol=1e-4)
    assert [r["replied"] for r in vectorized.history] == [CLIENTS] * ROUNDS


def test_a_chunk_failing_after_another_trains_its_clients_one_at_a_time_in_the_cohort(
    tmp_path: Path, bad_labels: None, engine_calls: list[tuple[str, int, list[str]]]
) -> None:
    # client-2 fails in the second chunk of three: the first chunk, trained (its momentum
    # moved on), keeps its rows; the failing chunk's clients train alone, then the last
    vectorized = run(tmp_path, "vectorized", sim={"stack_clients": 2})
    assert {method for method, _, _ in engine_calls} == {"train_stacked@fedpipe-sim-0_0"}
    names = [f"client-{i}" for i in range(CLIENTS)]
    alone = [["client-2"], ["client-3"], ["client-4"]]  # the failing chunk, then the rest
    assert [n for _, r, n in engine_calls if r == 1] == [names, *alone]
    others = [name for name in names if name != "client-2"]
    assert [r["clients"] for r in vectorized.history] == [others] * ROUNDS
    assert_same_run(vectorized, run(tmp_path, "sequential"))
    for mode in ("vectorized", "sequential"):  # the engine's words for the same error
        lines = (tmp_path / mode / "run" / "clients.jsonl").read_text().splitlines()
        errors = [json.loads(line).get("error", "") for line in lines if '"client-2"' in line]
        assert len(errors) == ROUNDS and all("99" in e and "out of bounds" in e for e in errors)
