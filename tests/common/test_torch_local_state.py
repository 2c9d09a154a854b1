"""What stays on a torch client: frozen parameters and buffers never cross the wire."""

from __future__ import annotations

import numpy as np
import pytest

from fedpipe.common.data import Dataset
from fedpipe.common.models import load_model
from fedpipe.common.optim import Optimizer
from fedpipe.common.payload import PayloadAssembler, encode_payload
from fedpipe.common.records import train_reply_parts, train_result_from
from fedpipe.common.summable import Summable
from fedpipe.common.training import LocalTrainer, RunSetup

torch = pytest.importorskip("torch")
from fedpipe.common.host_staging import HostStaging  # noqa: E402
from fedpipe.common.models.torch_adapter import TorchModel  # noqa: E402

FROZEN = {"name": "tests.common.torch_models:build_frozen", "config": {"n_features": 8}}
BATCHNORM = {"name": "tests.common.torch_models:build_batchnorm", "config": {}}
HEAD = {"2.weight": (10, 16), "2.bias": (10,)}


def setup(model: dict[str, object], w_decay: float = 0.0) -> RunSetup:
    return RunSetup(
        model=model,
        client_optimizer={"lrate": 0.1, "w_decay": w_decay, "modules": ["momentum"]},
        aggregator="averaging",
        metrics=["loss"],
        training={"batch_size": 8, "epochs": 2},
    )


def client_data(seed: int, shift: float = 0.0, n_classes: int = 10) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(shift, 1.0 + shift, size=(40, 8)).astype(np.float32)
    return Dataset(x, rng.integers(0, n_classes, size=40))


def federated_round(
    trainers: list[LocalTrainer], data: list[Dataset], server: TorchModel, round_number: int
) -> list[int]:
    """One round as deployed: each client's train reply encoded and decoded, then FedAvg."""
    total: Summable | None = None
    sizes = []
    for index, (trainer, shard) in enumerate(zip(trainers, data, strict=True)):
        result = trainer.train(
            shard, server.get_weights(), {}, client=f"c{index}", round_number=round_number
        )
        info, state = train_reply_parts(result)
        payload = encode_payload(state, 256, staging=HostStaging())
        assert {t.name for t in payload.header.tensors} == set(server.weight_specs())
        sizes.append(payload.total_bytes)
        assembler = PayloadAssembler(payload.header, max_bytes=1 << 20)
        for chunk in payload.chunks():
            assembler.add_chunk(*chunk)
        partial = train_result_from(info, assembler.finish()).partial
        total = partial if total is None else total.add_(partial)
    assert total is not None
    aggregated = trainers[0].aggregator.finalize(total)
    Optimizer(lrate=1.0).apply(server, aggregated)
    return sizes


def test_frozen_parameters_are_not_weights() -> None:
    model = load_model(FROZEN["name"], {"n_features": 8})
    assert {n: s.shape for n, s in model.weight_specs().items()} == HEAD
    assert model.get_weights().backend == "torch"


def test_a_train_reply_carries_the_trainable_parameters_only_without_a_copy() -> None:
    trainer = LocalTrainer(setup(FROZEN))
    weights = trainer.model.get_weights()
    result = trainer.train(client_data(0), weights, {}, client="c", round_number=1)
    _, state = train_reply_parts(result)
    payload = encode_payload(state, 256, staging=HostStaging())
    names = [t.name for t in payload.header.tensors]
    assert sorted(names) == ["2.bias", "2.weight"]
    assert payload.total_bytes == (10 * 16 + 10) * 4  # the head in float32, not the backbone
    update = result.partial.vector("weighted_sum")
    for name, array in zip(names, payload.arrays, strict=True):  # CPU tensors: shared memory
        assert array.ctypes.data == update.coefs[name].data_ptr()


def test_a_frozen_layer_stays_bit_identical_on_every_client_of_a_federation() -> None:
    trainers = [LocalTrainer(setup(FROZEN, w_decay=0.01)) for _ in range(3)]
    backbone = trainers[0].model.module[0].weight.detach().clone()  # type: ignore[attr-defined]
    server = load_model(FROZEN["name"], {"n_features": 8})
    start = server.get_weights()
    data = [client_data(seed) for seed in range(3)]
    for round_number in range(1, 4):
        sizes = federated_round(trainers, data, server, round_number)
        assert sizes == [(10 * 16 + 10) * 4] * 3
    assert not server.get_weights().allclose(start)  # the head did learn
    for trainer in trainers:
        module = trainer.model.module  # type: ignore[attr-defined]
        assert torch.equal(module[0].weight, backbone)
        assert module[0].weight.grad is None


def test_batch_norm_statistics_stay_local_to_each_client() -> None:
    trainers = [LocalTrainer(setup(BATCHNORM)) for _ in range(2)]
    server = load_model(BATCHNORM["name"], {})
    assert set(server.weight_specs()) == {
        "0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"
    }  # fmt: skip
    data = [client_data(0, shift=0.0, n_classes=3), client_data(1, shift=3.0, n_classes=3)]
    federated_round(trainers, data, server, 1)
    norms = [t.model.module[1] for t in trainers]  # type: ignore[attr-defined]
    assert not torch.allclose(norms[0].running_mean, norms[1].running_mean)
    assert not torch.allclose(norms[0].running_var, norms[1].running_var)
    assert int(norms[0].num_batches_tracked) == int(norms[1].num_batches_tracked) == 10
    fresh = server.module[1]  # type: ignore[attr-defined]
    assert torch.equal(fresh.running_mean, torch.zeros(8))  # the server never saw them
