"""The torch backend of Vector: every registered module, regularizer and aggregator gives the
numpy backend's results on torch tensors (float64: 1e-12 relative, float32: 1e-6)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedpipe.common import registry  # noqa: E402
from fedpipe.common.codec import state_from_bytes, state_to_bytes  # noqa: E402
from fedpipe.common.optim import BareWeights, Optimizer  # noqa: E402
from fedpipe.common.state import StateValue  # noqa: E402
from fedpipe.common.summable import Summable  # noqa: E402
from fedpipe.common.torch_backend import TorchOps  # noqa: E402
from fedpipe.common.vector import SpecMismatchError, Vector  # noqa: E402
from tests.common.test_registry_wide import build, registered  # noqa: E402

TOLERANCE = {np.float64: 1e-12, np.float32: 1e-6}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def numpy_gradients(dtype: Any, seed: int) -> Vector:
    rng = np.random.default_rng(seed)
    return Vector(
        {
            "kernel": rng.normal(size=(5, 4)).astype(dtype),
            "bias": rng.normal(size=4).astype(dtype),
        }
    )


def on_torch(vector: Vector, device: str = "cpu") -> Vector:
    return Vector({n: torch.from_numpy(a.copy()).to(device) for n, a in vector.coefs.items()})


def assert_close(got: Vector, want: Vector, dtype: Any) -> None:
    assert got.backend == "torch", f"the result left the torch backend: {got.backend}"
    assert got.specs() == want.specs()
    host = got.to_numpy()
    for name, expected in want.coefs.items():
        np.testing.assert_allclose(
            host.coefs[name], expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * 1e-3
        )


def assert_states_close(got: StateValue, want: StateValue, dtype: Any) -> None:
    if isinstance(want, Vector):
        assert isinstance(got, Vector)
        assert_close(got, want, dtype)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for key in want:
            assert_states_close(got[key], want[key], dtype)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for left, right in zip(got, want, strict=True):
            assert_states_close(left, right, dtype)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=TOLERANCE[dtype])
    elif not isinstance(want, np.ndarray):  # rng words and such: equal
        assert got == want


def build_seeded(family: str, name: str) -> Any:
    obj = build(family, name)
    if hasattr(obj, "seed_locally"):  # draws noise: the same local seed on both backends
        obj.seed_locally(np.random.SeedSequence(11))
    return obj


def partner(module: Any) -> Any:
    """The module of the other side that exchanges aux vars with ``module`` (or None)."""
    for name in registry.names("module"):
        other = build_seeded("module", name)
        if name != module.name and module.aux_name and other.aux_name == module.aux_name:
            return other
    return None


def feed_aux_var(module: Any, backend: str, dtype: Any) -> None:
    """Give an aux-var module what its other side sends (a client's or the server's)."""
    other = partner(module)
    if other is None:
        return
    other.run(numpy_gradients(dtype, 50))
    aux = other.collect_aux_var()
    if aux is None:
        return
    if backend == "torch":
        aux = Summable(
            {k: on_torch(v) if isinstance(v, Vector) else v for k, v in aux.fields.items()}
        )
    module.process_aux_var(aux, senders=["client-a"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("family", "name"), registered("module"))
def test_every_module_matches_numpy_on_torch(
    family: str, name: str, dtype: Any, device: str
) -> None:
    on_numpy, on_tensors = build_seeded(family, name), build_seeded(family, name)
    feed_aux_var(on_numpy, "numpy", dtype)
    feed_aux_var(on_tensors, "torch", dtype)
    for seed in range(4):
        grads = numpy_gradients(dtype, seed)
        want = on_numpy.run(grads.copy())
        got = on_tensors.run(on_torch(grads, device))
        assert got.device.startswith(device)
        assert_close(got, want, dtype)
    assert_states_close(on_tensors.get_state(), on_numpy.get_state(), dtype)
    aux_numpy, aux_torch = on_numpy.collect_aux_var(), on_tensors.collect_aux_var()
    assert (aux_numpy is None) == (aux_torch is None)
    if aux_numpy is not None and aux_torch is not None:
        assert_states_close(dict(aux_torch.fields), dict(aux_numpy.fields), dtype)


@pytest.mark.parametrize(("family", "name"), registered("module", "regularizer"))
def test_a_state_of_tensors_encodes_and_resumes_on_numpy(family: str, name: str) -> None:
    obj = build_seeded(family, name)
    weights = on_torch(numpy_gradients(np.float64, 99))
    for seed in range(3):
        grads = on_torch(numpy_gradients(np.float64, seed))
        obj.run(grads) if family == "module" else obj.run(grads, weights + float(seed))
    decoded = state_from_bytes(state_to_bytes(obj.get_state()))
    resumed = build_seeded(family, name)
    resumed.set_state(decoded)  # numpy state; the next step moves it to the tensors' side
    grads = numpy_gradients(np.float64, 7)
    if family == "module":
        got, want = obj.run(on_torch(grads)), resumed.run(on_torch(grads))
    else:
        got, want = obj.run(on_torch(grads), weights), resumed.run(on_torch(grads), weights)
    assert got.backend == want.backend == "torch"
    assert got.array_equal(want)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("family", "name"), registered("regularizer"))
def test_every_regularizer_matches_numpy_on_torch(family: str, name: str, dtype: Any) -> None:
    on_numpy, on_tensors = build_seeded(family, name), build_seeded(family, name)
    start = numpy_gradients(dtype, 100)
    on_numpy.on_round_start(start.copy())
    on_tensors.on_round_start(on_torch(start))
    for seed in range(3):
        grads, weights = numpy_gradients(dtype, seed), numpy_gradients(dtype, seed + 10)
        want = on_numpy.run(grads.copy(), weights)
        got = on_tensors.run(on_torch(grads), on_torch(weights))
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("family", "name"), registered("aggregator"))
def test_every_aggregator_matches_numpy_on_torch(family: str, name: str, dtype: Any) -> None:
    aggregator = build_seeded(family, name)
    updates = [numpy_gradients(dtype, seed) for seed in range(3)]
    given = getattr(aggregator, "server_update", False) is None  # FLTrust: one per round
    if given:
        aggregator.server_update = numpy_gradients(dtype, 7)
    want = aggregator.aggregate(
        aggregator.prepare(u.copy(), n_samples=10 + i, n_steps=2 + i) for i, u in enumerate(updates)
    )
    if given:
        aggregator.server_update = on_torch(numpy_gradients(dtype, 7))
    got = aggregator.aggregate(
        aggregator.prepare(on_torch(u), n_samples=10 + i, n_steps=2 + i)
        for i, u in enumerate(updates)
    )
    assert_close(got, want, dtype)


def test_optimizer_steps_on_torch_weights_match_numpy() -> None:
    config = {
        "lrate": ["exponential-decay", {"initial": 0.1, "decay_rate": 0.9}],
        "w_decay": 0.01,
        "regularizers": [["fedprox", {"mu": 0.1}]],
        "modules": [["l2-global-clipping", {"max_norm": 1.5}], "adam", "momentum"],
    }
    on_numpy, on_tensors = Optimizer.from_config(config), Optimizer.from_config(config)
    start = numpy_gradients(np.float64, 20)
    numpy_model, torch_model = BareWeights(start.copy()), BareWeights(on_torch(start))
    on_numpy.start_round(numpy_model.weights)
    on_tensors.start_round(torch_model.weights)
    for seed in range(6):
        grads = numpy_gradients(np.float64, seed)
        on_numpy.apply(numpy_model, grads.copy(), consume=True)
        on_tensors.apply(torch_model, on_torch(grads), consume=True)
    assert_close(torch_model.weights, numpy_model.weights, np.float64)


def test_numpy_and_torch_vectors_combine_on_the_torch_side() -> None:
    left = numpy_gradients(np.float32, 1)
    right = on_torch(numpy_gradients(np.float32, 2))
    for result in (left + right, right + left, left * right, left - right, right / left):
        assert result.backend == "torch"
    np.testing.assert_allclose(
        (left - right).to_numpy()["kernel"], left["kernel"] - right.to_numpy()["kernel"]
    )
    total = left.copy().add_(right)  # an accumulator keeps its backend
    assert total.backend == "numpy"
    assert total.allclose(left + right.to_numpy())


def test_scalar_operations_keep_dtypes_like_numpy() -> None:
    ints = Vector({"n": np.arange(6, dtype=np.int64)})
    on_t = on_torch(ints)
    for got, want in (
        (on_t * 1.5, ints * 1.5),
        (2.5 - on_t, 2.5 - ints),
        (7.0 / (on_t + 1), 7.0 / (ints + 1)),
    ):
        assert got.specs() == want.specs()
        assert np.array_equal(got.to_numpy()["n"], want["n"])
    floats = numpy_gradients(np.float32, 3)
    assert_close(1.0 - on_torch(floats), 1.0 - floats, np.float32)
    assert_close(on_torch(floats).minimum(0.1), floats.minimum(0.1), np.float32)
    assert_close(on_torch(floats) ** 2.0, floats**2.0, np.float32)


def test_reductions_match_numpy() -> None:
    grads = numpy_gradients(np.float32, 4)
    tensors = on_torch(grads)
    assert tensors.norm() == pytest.approx(grads.norm(), rel=1e-12)
    assert tensors.dot(on_torch(numpy_gradients(np.float32, 5))) == pytest.approx(
        grads.dot(numpy_gradients(np.float32, 5)), rel=1e-12
    )
    assert tensors.sum() == pytest.approx(grads.sum(), rel=1e-12)
    assert tensors.size == grads.size and tensors.nbytes == grads.nbytes
    assert tensors.is_finite()
    tensors["bias"][1] = float("nan")
    assert not tensors.is_finite()


def test_spec_mismatch_names_the_array_on_torch() -> None:
    left = on_torch(numpy_gradients(np.float32, 1))
    right = on_torch(numpy_gradients(np.float64, 1))
    with pytest.raises(SpecMismatchError, match="array 'kernel' is float32"):
        left + right


def test_a_vector_of_mixed_backends_is_refused() -> None:
    with pytest.raises(
        TypeError, match="must all be numpy arrays or all torch tensors, got ndarray and Tensor"
    ):
        Vector({"a": np.zeros(2), "b": torch.zeros(2)})


def test_a_host_tensor_follows_the_accelerators_device() -> None:
    """A module state restored on the host meets gradients on a device: the host side moves,
    as a numpy array would (seen on an H100: scaffold-client's state failed on cuda:0). The
    "meta" device stands in for an accelerator on a CPU-only machine."""
    device = Vector({"w": torch.zeros(3, device="meta")})
    host = Vector({"w": torch.ones(3)})
    for result in (device + host, host + device, device - host, host * device):
        assert result.device == "meta"
    device.add_(host)
    assert device.device == "meta"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_operations_stay_on_the_gpu() -> None:
    grads = on_torch(numpy_gradients(np.float32, 1), "cuda")
    state = numpy_gradients(np.float32, 2)  # e.g. a module state restored from a checkpoint
    for result in (
        grads * 2.0,
        grads + state,
        grads.sqrt().abs(),
        grads.normal_like(np.random.default_rng(0)),
    ):
        assert result.device.startswith("cuda")


@pytest.mark.parametrize("name", ["l2-clipping", "l2-global-clipping"])
def test_clipping_under_vmap_clips_each_client_by_its_own_norm(name: str) -> None:
    """What a vectorized simulation relies on: K clients' gradients stacked on a leading axis
    and run through a module with torch.func.vmap are clipped client by client."""
    rng = np.random.default_rng(5)
    scales = np.array([0.1, 0.5, 2.0, 40.0])[:, None, None]
    kernels = rng.normal(size=(4, 5, 4)) * scales
    biases = rng.normal(size=(4, 4)) * scales[:, 0]
    module = registry.build_spec("module", [name, {"max_norm": 1.0}])

    def clip(kernel: Any, bias: Any) -> tuple[Any, Any]:
        out = module.run(Vector({"kernel": kernel, "bias": bias}))
        return out["kernel"], out["bias"]

    got_kernels, got_biases = torch.func.vmap(clip)(
        torch.from_numpy(kernels), torch.from_numpy(biases)
    )
    for k in range(4):
        want = module.run(Vector({"kernel": kernels[k], "bias": biases[k]}))
        np.testing.assert_allclose(got_kernels[k].numpy(), want["kernel"], rtol=1e-12)
        np.testing.assert_allclose(got_biases[k].numpy(), want["bias"], rtol=1e-12)
    assert Vector({"kernel": got_kernels[0].numpy()}).norm() < 1.0  # the small one untouched


def test_in_place_vector_ops_run_under_vmap() -> None:
    """mul_ and add_ take one multi-tensor kernel for all arrays, which torch.func.vmap
    cannot batch: under vmap (the vectorized simulation) they go array by array."""

    def step(kernel: Any, bias: Any) -> tuple[Any, Any]:
        vector = Vector({"kernel": kernel * 1.0, "bias": bias * 1.0})
        vector.mul_(2.0).add_(Vector({"kernel": kernel, "bias": bias}))
        return vector.coefs["kernel"], vector.coefs["bias"]

    kernels, biases = torch.ones(3, 5, 4), torch.arange(12.0).reshape(3, 4)
    kernel, bias = torch.func.vmap(step)(kernels, biases)
    torch.testing.assert_close(kernel, kernels * 3)
    torch.testing.assert_close(bias, biases * 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("factors", [[257.0, 257.0], [257.0, 3001.0]])
def test_scale_rows_weighs_each_row_as_a_clients_prepare_does(
    dtype: torch.dtype, factors: list[float]
) -> None:
    # the stacked form of AveragingAggregator.prepare (Vector.mul_ by the client's weight),
    # whether the clients' weights are all equal or not
    torch.manual_seed(0)
    rows = (torch.randn(2, 300) * 3).to(dtype)
    one_by_one = [Vector({"w": rows[k].clone()}).mul_(f).coefs["w"] for k, f in enumerate(factors)]
    stacked = rows.clone()
    TorchOps().scale_rows_(stacked, factors)
    assert torch.equal(stacked, torch.stack(one_by_one))
