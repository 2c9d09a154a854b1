from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2_contingency, chisquare

from fedpipe.common.aggregators.averaging import AveragingAggregator
from fedpipe.common.secagg import SecAggClient, SecAggServer, SecureAggregationError
from fedpipe.common.secagg.messages import ForwardedShares, UnmaskRequest
from fedpipe.common.vector import Vector
from tests.common.secagg_run import plain_sum, random_updates, run_secagg, seeded


def _assert_sum(result_total: Vector, expected: dict[str, np.ndarray], bound: float) -> None:
    for name, array in expected.items():
        assert result_total.coefs[name].dtype == np.float64
        assert np.abs(result_total.coefs[name] - array).max() <= bound


def test_unmasked_sum_equals_the_plain_sum_within_the_quantization_bound() -> None:
    updates = random_updates(8)
    result, roster, masked = run_secagg(updates, SecAggServer(threshold=5, entropy=seeded(99)))
    _assert_sum(result.total, plain_sum(updates, updates), roster.encoding.error_bound(8))
    assert result.survivors == tuple(updates) and result.dropped == result.excluded == ()
    assert result.total_weight == 8
    assert masked["client-0"].masked.coefs["w"].dtype == np.uint32


def test_thirty_percent_dropping_after_masked_input_still_recovers_the_sum() -> None:
    updates = random_updates(10)
    late = {"client-1", "client-4", "client-8"}
    result, roster, _ = run_secagg(
        updates, SecAggServer(threshold=6, entropy=seeded(99)), drop_before_unmasking=late
    )
    _assert_sum(result.total, plain_sum(updates, updates), roster.encoding.error_bound(10))
    assert len(result.survivors) == 10 and result.dropped == ()


def test_dropping_before_masked_input_removes_the_pairwise_masks() -> None:
    updates = random_updates(10)
    gone = {"client-0", "client-5", "client-9"}
    result, roster, _ = run_secagg(
        updates, SecAggServer(threshold=6, entropy=seeded(99)), drop_before_masking=gone
    )
    kept = [n for n in updates if n not in gone]
    _assert_sum(result.total, plain_sum(updates, kept), roster.encoding.error_bound(7))
    assert set(result.dropped) == gone and result.survivors == tuple(kept)


def test_dropouts_at_every_stage_with_the_secagg_plus_graph() -> None:
    updates = random_updates(20)
    result, roster, _ = run_secagg(
        updates,
        SecAggServer(threshold=4, neighbours=6, bits=24, entropy=seeded(99)),
        drop_before_shares={"client-3"},
        drop_before_masking={"client-7", "client-12"},
        drop_before_unmasking={"client-15"},
    )
    assert all(len(n) == 6 for n in roster.neighbours.values())
    kept = [n for n in updates if n not in {"client-3", "client-7", "client-12"}]
    _assert_sum(result.total, plain_sum(updates, kept), roster.encoding.error_bound(17))


def test_sample_weighted_average_equals_fedavg_within_the_bound() -> None:
    """FedAvg through secure aggregation: each client masks its update times its sample
    count; the weighted sum over the total weight is fedpipe's averaging aggregate."""
    updates = random_updates(10, clip=0.5)
    samples = {name: 40 + 17 * i for i, name in enumerate(updates)}
    gone = {"client-2", "client-6"}
    server = SecAggServer(threshold=6, clip=0.5, max_weight=500, entropy=seeded(3))
    result, roster, _ = run_secagg(updates, server, drop_before_masking=gone, weights=samples)
    kept = [n for n in updates if n not in gone]
    averaging = AveragingAggregator("samples")
    expected = averaging.aggregate(
        averaging.prepare(updates[n].apply(lambda a: a.astype(np.float64)), samples[n], 1)
        for n in kept
    )
    assert result.total_weight == sum(samples[n] for n in kept)
    average = result.total * (1.0 / result.total_weight)
    _assert_sum(
        average,
        expected.coefs,
        roster.encoding.error_bound(result.total_weight) / result.total_weight,
    )


def test_a_client_revealing_a_wrong_share_is_detected_and_excluded() -> None:
    updates = random_updates(8)
    result, roster, _ = run_secagg(
        updates, SecAggServer(threshold=5, entropy=seeded(99)), liars={"client-2"}
    )
    assert result.excluded == ("client-2",)
    _assert_sum(result.total, plain_sum(updates, updates), roster.encoding.error_bound(8))


def test_liars_leaving_fewer_than_threshold_honest_shares_fail_clearly() -> None:
    updates = random_updates(6)
    with pytest.raises(SecureAggregationError, match="only 3 valid self-mask shares of"):
        run_secagg(
            updates,
            SecAggServer(threshold=4, entropy=seeded(9)),
            liars={"client-0", "client-1", "client-2"},
        )


def test_fewer_survivors_than_the_threshold_fail_with_a_clear_error() -> None:
    updates = random_updates(6)
    with pytest.raises(
        SecureAggregationError,
        match="only 3 clients sent masked inputs, fewer than the threshold 4",
    ):
        run_secagg(
            updates,
            SecAggServer(threshold=4, entropy=seeded(9)),
            drop_before_masking={"client-0", "client-1", "client-2"},
        )


def test_server_view_of_one_masked_update_is_independent_of_the_update() -> None:
    """Chi-square on the bytes of one client's masked input, for an update of all -clip and
    one of all +clip (same keys): the byte histograms match each other and the uniform law,
    while the unmasked encodings are told apart at once."""
    size = 20_000
    views, encodings = [], []
    for value in (-1.0, 1.0):
        updates = random_updates(3)
        updates["client-0"] = Vector({"w": np.full(size, value)})
        for name in ("client-1", "client-2"):
            updates[name] = Vector({"w": np.zeros(size)})
        server = SecAggServer(threshold=2, entropy=seeded(5))
        _, roster, masked = run_secagg(updates, server, seed=7)
        views.append(
            np.bincount(masked["client-0"].masked.coefs["w"].view(np.uint8), minlength=256)
        )
        encoded = roster.encoding.encode(updates["client-0"]).coefs["w"]
        encodings.append(np.bincount(encoded.view(np.uint8), minlength=256))
    assert chi2_contingency(np.stack(views)).pvalue > 0.01
    assert min(chisquare(view).pvalue for view in views) > 0.01
    assert chi2_contingency(np.stack(encodings) + 1).pvalue < 1e-12


def test_the_server_cannot_ask_for_both_shares_of_one_client() -> None:
    updates = random_updates(3)
    server = SecAggServer(threshold=2, entropy=seeded(1))
    clients = [SecAggClient(n, seeded(i)) for i, n in enumerate(updates)]
    for client in clients:
        server.receive_keys(client.advertise())
    roster = server.roster()
    for client in clients:
        server.receive_shares(client.share_keys(roster))
    forwarded = server.forward_shares()
    client = clients[0]
    client.masked_input(forwarded[client.name], updates[client.name])
    with pytest.raises(SecureAggregationError, match="must be disjoint"):
        client.unmask(UnmaskRequest(tuple(updates), ("client-1",)))


def test_stages_out_of_order_are_refused() -> None:
    client = SecAggClient("a", seeded(0))
    with pytest.raises(SecureAggregationError, match="asked to send masked input while at"):
        client.masked_input(ForwardedShares("a", {}), Vector({"w": np.zeros(1)}))
    server = SecAggServer(threshold=2)
    with pytest.raises(SecureAggregationError, match="at stage 'collect keys', not 'collect"):
        server.unmask_request()


def test_threshold_beyond_the_holders_of_each_client_is_refused() -> None:
    server = SecAggServer(threshold=4, entropy=seeded(0))
    for i in range(3):
        server.receive_keys(SecAggClient(f"c{i}", seeded(i)).advertise())
    with pytest.raises(SecureAggregationError, match="threshold 4 with 3 clients"):
        server.roster()


def test_tampered_relayed_shares_are_skipped_by_the_recipient() -> None:
    updates = random_updates(4)
    server = SecAggServer(threshold=3, entropy=seeded(1))
    clients = [SecAggClient(n, seeded(i)) for i, n in enumerate(updates)]
    for client in clients:
        server.receive_keys(client.advertise())
    roster = server.roster()
    for client in clients:
        server.receive_shares(client.share_keys(roster))
    forwarded = server.forward_shares()
    target = forwarded["client-0"]
    bad = dict(target.ciphertexts)
    bad["client-1"] = bad["client-1"][:-1] + bytes([bad["client-1"][-1] ^ 1])
    clients[0].masked_input(ForwardedShares("client-0", bad), updates["client-0"])
    shares = clients[0].unmask(UnmaskRequest(tuple(updates), ()))
    assert set(shares.self_mask_shares) == {"client-0", "client-2", "client-3"}
