"""Buffered robust aggregators against references written from their papers (whole vectors,
plain loops) and Flower's formulas, on random updates read in small chunk ranges; the
reply buffer's spill to memory-mapped files."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpipe.common import registry
from fedpipe.common.aggregators import replies as replies_module
from fedpipe.common.aggregators.buffered import BufferedAggregator
from fedpipe.common.aggregators.replies import SPILL_PREFIX, ReplyBuffer, remove_stale_spills
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector

SHAPES = {"kernel": (7, 5), "bias": (5,), "scale": ()}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk ranges of 4 coordinates: arrays span several, and one array is shorter."""
    monkeypatch.setattr(replies_module, "CHUNK_ELEMENTS", 4)


def random_updates(k: int, seed: int, dtype: Any = np.float64) -> list[Vector]:
    rng = np.random.default_rng(seed)
    return [
        Vector({n: rng.normal(size=s).astype(dtype) for n, s in SHAPES.items()}) for _ in range(k)
    ]


def flat(vector: Vector) -> np.ndarray:
    return np.concatenate([np.asarray(vector[n], np.float64).reshape(-1) for n in SHAPES])


def run(spec: Any, updates: list[Vector], n_samples: list[int] | None = None) -> np.ndarray:
    aggregator = registry.build_spec("aggregator", spec)
    counts = n_samples or [10] * len(updates)
    partials = (aggregator.prepare(u.copy(), n, 1) for u, n in zip(updates, counts, strict=True))
    return flat(aggregator.aggregate(partials))


# ---- references (whole flat vectors) ---------------------------------------------------------


def krum_reference(x: np.ndarray, f: int, m: int, weights: np.ndarray) -> np.ndarray:
    """Blanchard et al. 2017: score(i) = sum of squared distances to its n - f - 2 nearest."""
    n = len(x)
    scores = []
    for i in range(n):
        dists = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(dists[: max(1, n - f - 2)]))
    chosen = np.argsort(scores, kind="stable")[:m]
    w = weights[chosen] / weights[chosen].sum()
    return np.sum(w[:, None] * x[chosen], axis=0)


def flower_krum(x: np.ndarray, f: int, to_keep: int, n_samples: np.ndarray) -> np.ndarray:
    """Flower's ``aggregate_krum`` formulas: argsort of each distance row past itself."""
    distance = np.array([[np.linalg.norm(a - b) ** 2 for b in x] for a in x])
    closest = max(1, len(x) - f - 2)
    scores = [np.sum(row[np.argsort(row)[1 : closest + 1]]) for row in distance]
    if to_keep > 1:
        best = np.argsort(scores)[::-1][len(scores) - to_keep :]
        return np.sum(n_samples[best, None] * x[best], axis=0) / n_samples[best].sum()
    return x[int(np.argmin(scores))]


def bulyan_reference(x: np.ndarray, f: int) -> np.ndarray:
    """El Mhamdi et al. 2018: theta = n - 2f picked by iterated Krum, then per coordinate the
    mean of the beta = theta - 2f values nearest the median."""
    left = list(range(len(x)))
    picked = []
    for _ in range(len(x) - 2 * f):
        best = krum_reference(x[left], f, 1, np.ones(len(left)))
        index = next(i for i in left if np.array_equal(x[i], best))
        picked.append(index)
        left.remove(index)
    sel = x[picked]
    beta = len(picked) - 2 * f
    out = np.empty(x.shape[1])
    for c in range(x.shape[1]):
        column = sel[:, c]
        med = np.median(column)
        out[c] = np.mean(sorted(column, key=lambda v: abs(v - med))[:beta])
    return out


def weiszfeld_reference(x: np.ndarray, a: np.ndarray, nu: float, iters: int, tol: float) -> Any:
    """Pillutla et al. 2022, Algorithm 2 (smoothed Weiszfeld), on whole vectors."""
    a = a / a.sum()
    v = a @ x
    objective = float(a @ np.linalg.norm(x - v, axis=1))
    for _ in range(iters):
        b = a / np.maximum(nu, np.linalg.norm(x - v, axis=1))
        v = b @ x / b.sum()
        previous, objective = objective, float(a @ np.linalg.norm(x - v, axis=1))
        if abs(previous - objective) <= tol * objective:
            break
    return v


# ---- each aggregator against its references --------------------------------------------------


@pytest.mark.parametrize("k", [3, 4, 9])
def test_median_is_numpys_median_per_coordinate(k: int) -> None:
    updates = random_updates(k, seed=k)
    x = np.stack([flat(u) for u in updates])
    np.testing.assert_array_equal(run("median", updates), np.median(x, axis=0))


@pytest.mark.parametrize(("k", "beta"), [(5, 0.2), (10, 0.25), (6, 0.0), (7, 0.45)])
def test_trimmed_mean_matches_flowers_partition_formula(k: int, beta: float) -> None:
    updates = random_updates(k, seed=k)
    x = np.stack([flat(u) for u in updates])
    cut = int(beta * k)
    want = np.partition(x, (cut, k - cut - 1), axis=0)[cut : k - cut].mean(axis=0)
    got = run(["trimmed-mean", {"beta": beta}], updates)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("k", "f", "m"), [(7, 2, 1), (9, 2, 4), (12, 3, 6), (3, 0, 1)])
def test_krum_matches_the_paper_and_flower(k: int, f: int, m: int) -> None:
    updates = random_updates(k, seed=10 * k + m)
    updates[0] = updates[0] * 30.0  # an outlier Krum must never pick
    x = np.stack([flat(u) for u in updates])
    counts = np.arange(10, 10 + k)
    got = run(["krum", {"f": f, "m": m, "weighting": "samples"}], updates, list(counts))
    np.testing.assert_allclose(got, krum_reference(x, f, m, counts.astype(float)), rtol=1e-12)
    np.testing.assert_allclose(got, flower_krum(x, f, m, counts.astype(float)), rtol=1e-12)
    assert not np.allclose(got, x[0])


@pytest.mark.parametrize(("k", "f"), [(7, 1), (11, 2), (3, 0)])
def test_bulyan_matches_the_paper(k: int, f: int) -> None:
    updates = random_updates(k, seed=k + 100)
    x = np.stack([flat(u) for u in updates])
    np.testing.assert_allclose(
        run(["bulyan", {"f": f}], updates), bulyan_reference(x, f), rtol=1e-12
    )


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_geometric_median_matches_weiszfeld_on_whole_vectors(weighting: str) -> None:
    updates = random_updates(8, seed=3)
    x = np.stack([flat(u) for u in updates])
    counts = np.array([5, 50, 10, 20, 7, 9, 30, 11])
    a = counts.astype(float) if weighting == "samples" else np.ones(8)
    spec = [
        "geometric-median",
        {"nu": 1e-6, "max_iterations": 200, "tol": 1e-12, "weighting": weighting},
    ]
    got = run(spec, updates, list(counts))
    np.testing.assert_allclose(got, weiszfeld_reference(x, a, 1e-6, 200, 1e-12), rtol=1e-8)
    # The geometric median minimises the weighted sum of distances: no nudge improves it.
    objective = lambda v: float(a @ np.linalg.norm(x - v, axis=1))  # noqa: E731
    rng = np.random.default_rng(0)
    assert all(
        objective(got) <= objective(got + 1e-3 * rng.normal(size=got.shape)) for _ in range(20)
    )


def fltrust_reference(x: np.ndarray, g0: np.ndarray) -> np.ndarray:
    """Cao et al. 2021, Algorithm 2: ReLU-cosine trust, updates rescaled to ||g0||."""
    total, trust_sum = np.zeros_like(g0), 0.0
    for g in x:
        cosine = float(g @ g0) / (np.linalg.norm(g) * np.linalg.norm(g0))
        trust = max(cosine, 0.0)
        total += trust * np.linalg.norm(g0) / np.linalg.norm(g) * g
        trust_sum += trust
    return total / trust_sum


def fltrust_run(updates: list[Vector], server: Vector, n_samples: list[int] | None = None) -> Any:
    aggregator = registry.build_spec("aggregator", "fltrust")
    aggregator.server_update = server
    counts = n_samples or [10] * len(updates)
    return flat(
        aggregator.aggregate(
            aggregator.prepare(u.copy(), n, 1) for u, n in zip(updates, counts, strict=True)
        )
    )


def test_fltrust_matches_the_paper_on_random_updates() -> None:
    updates = random_updates(9, seed=8)
    server = random_updates(1, seed=9)[0]
    g0 = flat(server)
    updates[2] = server * -3.0  # opposite: trust 0
    updates[5] = server * 40.0  # aligned but huge: rescaled to ||g0||
    x = np.stack([flat(u) for u in updates])
    got = fltrust_run(updates, server)
    np.testing.assert_allclose(got, fltrust_reference(x, g0), rtol=1e-10)
    # sample counts do not matter: trust replaces them
    np.testing.assert_allclose(fltrust_run(updates, server, [1, 10**6] + [1] * 7), got, rtol=1e-12)
    assert np.linalg.norm(got) <= np.linalg.norm(g0) * (1 + 1e-12)  # a mean of norm-||g0|| vectors


def test_fltrust_takes_no_step_when_no_client_agrees_with_the_server() -> None:
    server = random_updates(1, seed=3)[0]
    got = fltrust_run([server * -1.0, server * -2.0], server)
    assert not got.any()


def test_fltrust_needs_the_server_update_of_the_round() -> None:
    aggregator = registry.build_spec("aggregator", "fltrust")
    aggregator.server_update = random_updates(1, seed=1)[0]
    updates = random_updates(3, seed=2)
    aggregator.aggregate(aggregator.prepare(u, 1, 1) for u in updates)
    with pytest.raises(ValueError, match="fltrust: no server update for this round"):
        aggregator.aggregate(aggregator.prepare(u, 1, 1) for u in random_updates(3, seed=2))


def test_robust_aggregators_ignore_one_huge_update_that_averaging_follows() -> None:
    updates = random_updates(9, seed=5)
    updates[4] = updates[4] * -1000.0
    honest = np.stack([flat(u) for i, u in enumerate(updates) if i != 4])
    spread = np.abs(honest).max()
    assert np.abs(run("averaging", updates)).max() > 50 * spread
    for spec in [
        "median",
        ["trimmed-mean", {"beta": 0.2}],
        ["krum", {"f": 1}],
        ["bulyan", {"f": 1}],
        "geometric-median",
    ]:
        assert np.abs(run(spec, updates)).max() <= 1.5 * spread, spec


def test_float32_updates_give_float32_results_close_to_float64() -> None:
    updates32 = random_updates(7, seed=2, dtype=np.float32)
    updates64 = [
        Vector({n: np.asarray(a, np.float64) for n, a in u.coefs.items()}) for u in updates32
    ]
    aggregator = registry.build_spec("aggregator", ["bulyan", {"f": 1}])
    got = aggregator.aggregate(aggregator.prepare(u, 1, 1) for u in updates32)
    assert {s.dtype for s in got.specs().values()} == {"float32"}
    np.testing.assert_allclose(flat(got), run(["bulyan", {"f": 1}], updates64), rtol=1e-6)


# ---- weighting -------------------------------------------------------------------------------


def test_weighting_is_applied_on_the_server_and_capped_weights_bound_a_liar() -> None:
    counts = [10, 10, 1_000_000]
    uniform = registry.build_spec("aggregator", "geometric-median")
    capped = registry.build_spec(
        "aggregator", ["geometric-median", {"weighting": "capped", "max_samples": 20}]
    )
    samples = registry.build_spec("aggregator", ["krum", {"weighting": "samples"}])
    np.testing.assert_allclose(uniform.weights.normalized(counts), [1 / 3] * 3)
    np.testing.assert_allclose(capped.weights.normalized(counts), [0.25, 0.25, 0.5])
    np.testing.assert_allclose(samples.weights.normalized(counts), np.array(counts) / sum(counts))
    with pytest.raises(ValueError, match="total client weight is 0"):
        samples.weights.normalized([0, 0])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["krum", {"f": -1}], "krum: f=-1; expected an integer >= 0"),
        (["krum", {"m": 0}], "krum: m=0; expected an integer >= 1"),
        (["krum", {"weighting": "capped"}], "weighting='capped' needs max_samples"),
        (["bulyan", {"f": 1.5}], "bulyan: f=1.5"),
        (["trimmed-mean", {"beta": 0.5}], r"beta=0.5; expected a fraction in \[0, 0.5\)"),
        (["geometric-median", {"nu": 0}], "nu=0; expected a number > 0"),
        (
            ["geometric-median", {"weighting": "votes"}],
            "weighting='votes'; expected 'samples', 'uniform' or 'capped'",
        ),
        (["fltrust", {"samples": 0}], "fltrust: samples=0; expected an integer >= 1"),
        (["fltrust", {"dataset": ""}], "fltrust: dataset=''; expected a dataset name or path"),
    ],
)
def test_bad_configs_say_field_value_and_expectation(spec: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        registry.build_spec("aggregator", spec)


@pytest.mark.parametrize(
    ("spec", "k", "message"),
    [
        (["krum", {"f": 2}], 6, "krum: 6 replies with f=2, m=1; expected at least max"),
        (["bulyan", {"f": 1}], 6, "bulyan: 6 replies with f=1; expected at least 4f \\+ 3 = 7"),
    ],
)
def test_too_few_replies_for_f_is_an_error(spec: Any, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run(spec, random_updates(k, seed=0))


# ---- the reply buffer: spill to memory-mapped files ------------------------------------------


def buffered(spec: Any, memory_bytes: int, spill_dir: Path) -> BufferedAggregator:
    aggregator: BufferedAggregator = registry.build_spec("aggregator", spec)
    aggregator.memory_bytes, aggregator.spill_dir = memory_bytes, spill_dir
    return aggregator


SPECS = [
    "median",
    ["trimmed-mean", {"beta": 0.2}],
    ["krum", {"f": 1, "m": 3}],
    ["bulyan", {"f": 1}],
    "geometric-median",
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s if isinstance(s, str) else s[0]))
@pytest.mark.parametrize("budget_replies", [0, 3])
def test_spilled_replies_give_bit_identical_results_and_their_files_go(
    tmp_path: Path, spec: Any, budget_replies: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = random_updates(8, seed=7, dtype=np.float32)
    in_memory = buffered(spec, 1 << 30, tmp_path)
    want = in_memory.aggregate(in_memory.prepare(u.copy(), 10, 1) for u in updates)
    spilling = buffered(spec, budget_replies * updates[0].nbytes, tmp_path)
    seen: list[ReplyBuffer] = []
    finalize = spilling.finalize

    def spy(total: Summable) -> Vector:
        assert isinstance(total, ReplyBuffer) and total.directory is not None
        assert total.spilled == 8 - budget_replies
        assert len(list(total.directory.glob("reply-*.bin"))) == 8 - budget_replies
        seen.append(total)
        return finalize(total)

    monkeypatch.setattr(spilling, "finalize", spy)
    got = spilling.aggregate(spilling.prepare(u.copy(), 10, 1) for u in updates)
    assert got.array_equal(want)
    assert seen and seen[0].directory is not None and not seen[0].directory.exists()
    assert list(tmp_path.iterdir()) == []


def test_spill_files_go_when_the_reduction_fails_or_the_round_is_dropped(tmp_path: Path) -> None:
    aggregator = buffered(["krum", {"f": 2}], 0, tmp_path)
    with pytest.raises(ValueError, match="krum: 3 replies"):
        aggregator.aggregate(aggregator.prepare(u, 1, 1) for u in random_updates(3, seed=0))
    assert list(tmp_path.iterdir()) == []
    kept = aggregator.start(aggregator.prepare(random_updates(1, seed=0)[0], 1, 1))
    assert [p.name.startswith(SPILL_PREFIX) for p in tmp_path.iterdir()] == [True]
    del kept  # a round that failed before reducing drops its buffer
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_stale_spill_directories_are_removed(tmp_path: Path) -> None:
    (tmp_path / f"{SPILL_PREFIX}abc").mkdir()
    (tmp_path / f"{SPILL_PREFIX}abc" / "reply-0.bin").write_bytes(b"x")
    (tmp_path / "checkpoint.fpk").write_bytes(b"keep")
    remove_stale_spills(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.fpk"]


def test_a_reply_with_other_specs_is_refused_by_the_buffer() -> None:
    buffer = ReplyBuffer(1 << 20)
    buffer.add_(Summable({"update": Vector({"w": np.zeros(3)}), "n_samples": 1}))
    with pytest.raises(ValueError, match="update"):
        buffer.add_(Summable({"update": Vector({"w": np.zeros(4)}), "n_samples": 1}))
