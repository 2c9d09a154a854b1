"""Privacy noise comes from each client's own entropy: the server cannot redraw it."""

from __future__ import annotations

import numpy as np

from fedpipe.common.data import Dataset
from fedpipe.common.training import LocalTrainer, RunSetup, round_seed
from fedpipe.common.vector import Vector

STD = 1.0


def run_setup(std: float) -> RunSetup:
    return RunSetup(
        model={"name": "softmax-regression", "config": {"n_features": 4, "n_classes": 3}},
        client_optimizer={"lrate": 1.0, "modules": [["gaussian-noise", {"std": std}]]},
        aggregator=["averaging", {"weighting": "uniform"}],
        metrics=["loss"],
        training={"batch_size": 8, "max_steps": 1},
        seed=5,
    )


def data() -> Dataset:
    rng = np.random.default_rng(1)
    return Dataset(rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, size=8))


def weights() -> Vector:
    return Vector({"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(3, np.float32)})


def client_noise(trainer: LocalTrainer, client: str) -> np.ndarray:
    """The noise one step of ``trainer`` added: its update less the noiseless update."""
    noisy = trainer.train(data(), weights(), {}, client=client, round_number=1)
    plain = LocalTrainer(run_setup(0.0)).train(data(), weights(), {}, client=client, round_number=1)
    diff = noisy.partial.vector("weighted_sum") - plain.partial.vector("weighted_sum")
    return np.concatenate([diff["bias"].ravel(), diff["kernel"].ravel()]).astype(np.float64)


def server_guesses(setup: RunSetup, client: str) -> list[np.ndarray]:
    """Noise the server can draw from every seed it sent or derived (run seed, round seed),
    and by building the client's pipeline from the setup it sent."""
    size = 15
    seeds = [setup.seed, round_seed(setup.seed, client, 1)]
    guesses = [np.random.default_rng(s).normal(size=size) * STD for s in seeds]
    guesses.append(client_noise(LocalTrainer(setup, client=client), client))
    return guesses


def test_two_clients_draw_different_noise_the_server_cannot_redraw() -> None:
    setup = run_setup(STD)
    noise = {name: client_noise(LocalTrainer(setup, client=name), name) for name in ("a", "b")}
    assert noise["a"].std() > 0.5 and noise["b"].std() > 0.5  # the noise is there
    assert not np.allclose(noise["a"], noise["b"], atol=1e-3)
    for name, drawn in noise.items():
        for guess in server_guesses(setup, name):
            # a guess subtracted from the client's noise leaves noise of the same size
            assert np.abs(drawn - guess).max() > 0.5, f"the server redrew client {name}'s noise"


def test_noise_seed_is_client_local_and_reproducible() -> None:
    setup = run_setup(STD)

    def seeded(name: str, noise_seed: int) -> np.ndarray:
        return client_noise(LocalTrainer(setup, noise_seed=noise_seed, client=name), name)

    np.testing.assert_array_equal(seeded("a", 11), seeded("a", 11))
    assert not np.allclose(seeded("a", 11), seeded("b", 11), atol=1e-3)  # the name mixes in
    assert not np.allclose(seeded("a", 11), seeded("a", 12), atol=1e-3)
    assert "noise_seed" not in str(setup.to_data())  # the setup the server sends has none
