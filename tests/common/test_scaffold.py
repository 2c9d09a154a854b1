"""SCAFFOLD (Karimireddy et al. 2020): the exchange, counting clients by name, the paper's
partial-participation rule, and several local steps against the paper's Alg. 1 in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedpipe.common.codec import state_from_bytes, state_to_bytes
from fedpipe.common.modules import AuxVarError, ScaffoldClient, ScaffoldServer
from fedpipe.common.optim import BareWeights, Optimizer
from fedpipe.common.summable import Summable
from fedpipe.common.vector import Vector


def vec(*values: float) -> Vector:
    return Vector({"w": np.array(values, dtype=np.float64)})


def delta(*values: float) -> dict[str, Summable]:
    return {"scaffold": Summable({"delta": vec(*values)})}


def global_state(server: Optimizer) -> Vector:
    return server.collect_aux_var()["scaffold"].vector("global_state")


def test_two_clients_exchange() -> None:
    server = Optimizer(lrate=1.0, modules=["scaffold-server"])
    clients = [Optimizer(lrate=1.0, modules=["scaffold-client"]) for _ in range(2)]
    # specs unknown before the server ran or heard from a client: nothing to send
    assert server.collect_aux_var() == {}

    def correct(client: Optimizer, grads: Vector) -> Vector:
        return client.modules[0].run(grads)

    # Round 1: c = c_i = 0, outputs are the raw gradients.
    assert correct(clients[0], vec(1, 2)).array_equal(vec(1, 2))
    correct(clients[0], vec(3, 4))  # client 0 averages [2, 3]
    correct(clients[1], vec(5, 6))  # client 1 averages [5, 6]
    replies = [client.collect_aux_var()["scaffold"] for client in clients]
    assert list(replies[0].fields) == ["delta"]
    assert replies[0].vector("delta").array_equal(vec(2, 3))
    server.process_aux_var({"scaffold": replies[0] + replies[1]}, senders=["a", "b"])
    broadcast = server.collect_aux_var()["scaffold"]
    assert broadcast.vector("global_state").array_equal(vec(3.5, 4.5))  # mean of [2,3], [5,6]

    # Round 2: g - c_i + c.
    for client in clients:
        client.process_aux_var({"scaffold": broadcast})
    assert correct(clients[0], vec(1, 1)).array_equal(vec(2.5, 2.5))  # [1,1]-[2,3]+[3.5,4.5]
    assert correct(clients[1], vec(7, 8)).array_equal(vec(5.5, 6.5))  # [7,8]-[5,6]+[3.5,4.5]
    replies = [client.collect_aux_var()["scaffold"] for client in clients]
    assert replies[0].vector("delta").array_equal(vec(-1, -2))  # [1,1] - [2,3]
    server.process_aux_var({"scaffold": replies[0] + replies[1]}, senders=["a", "b"])
    assert server.modules[0].get_state()["clients"] == ["a", "b"]
    client_states = [c.modules[0].get_state()["local_state"] for c in clients]
    assert client_states[0].array_equal(vec(1, 1))
    assert client_states[1].array_equal(vec(7, 8))
    assert global_state(server).array_equal((client_states[0] + client_states[1]) / 2.0)


def test_server_learns_specs_from_run() -> None:
    server = ScaffoldServer()
    grads = Vector({"w": np.ones(3, np.float32)})
    assert server.run(grads) is grads
    sent = server.collect_aux_var()
    assert sent is not None
    assert sent.vector("global_state").array_equal(grads.zeros_like())


def test_client_rejects_wrong_specs() -> None:
    client = ScaffoldClient()
    client.run(vec(1, 2))
    bad = Summable({"global_state": Vector({"w": np.zeros(3)})})
    with pytest.raises(AuxVarError, match=r"scaffold-client.*'w' has shape \(3,\)"):
        client.process_aux_var(bad)
    with pytest.raises(AuxVarError, match=r"scaffold-client expects .*\['global_state'\]"):
        client.process_aux_var(Summable({"delta": vec(1, 2)}))


def test_server_rejects_bad_records() -> None:
    server = ScaffoldServer()
    server.run(vec(1, 2))
    with pytest.raises(AuxVarError, match=r"scaffold-server.*names differ"):
        server.check_aux_var(Summable({"delta": Vector({"v": np.zeros(2)})}))
    # a client cannot claim to be counted: the server counts names
    claim = Summable({"delta": vec(1, 2), "new_clients": 1})
    with pytest.raises(
        AuxVarError,
        match=r"scaffold-server expects .* fields \['delta'\], got \['delta', 'new_clients'\]",
    ):
        server.check_aux_var(claim)
    with pytest.raises(AuxVarError, match="NaN"):
        server.process_aux_var(Summable({"delta": vec(math.nan, 2)}), senders=["a"])
    with pytest.raises(AuxVarError, match="with their senders"):
        server.process_aux_var(Summable({"delta": vec(1, 2)}))
    assert server.get_state()["clients"] == []
    assert server.get_state()["state_sum"].array_equal(vec(0, 0))


def send(client: ScaffoldClient) -> dict[str, Summable]:
    record = client.collect_aux_var()
    assert record is not None
    return {"scaffold": record}


def start_round(client: ScaffoldClient, server: Optimizer) -> None:
    client.process_aux_var(server.collect_aux_var()["scaffold"])


@pytest.mark.parametrize("rolled_back", [True, False])
def test_a_lost_first_reply_does_not_under_count(rolled_back: bool) -> None:
    server = Optimizer(lrate=1.0, modules=["scaffold-server"])
    server.modules[0].run(vec(0, 0))
    a, b = ScaffoldClient(), ScaffoldClient()
    base = a.get_state()
    for client, grads in ((a, vec(4, 4)), (b, vec(2, 6))):
        start_round(client, server)
        client.run(grads)
    send(a)  # round 1: a's reply is lost, after a updated c_a and took itself for reported
    server.process_aux_var(send(b), senders=["b"])
    assert global_state(server).array_equal(vec(2, 6))  # c_b alone
    if rolled_back:  # what the client state store does: back to the state the server knows
        a.set_state(base)
    start_round(a, server)
    a.run(vec(8, 0))  # round 2: c_a = [8, 0]
    server.process_aux_var(send(a), senders=["a"])
    assert server.modules[0].get_state()["clients"] == ["a", "b"]
    # rolled back: S = c_a + c_b = [10, 6]. Without the roll-back, a's round-1 delta [4, 4]
    # never reached S (S = [2, 6] + [8, 0] - [4, 4]): still counted once, c off by [2, 2].
    assert global_state(server).array_equal(vec(5, 3) if rolled_back else vec(3, 1))


def test_a_restarted_client_is_counted_once() -> None:
    server = Optimizer(lrate=1.0, modules=["scaffold-server"])
    server.modules[0].run(vec(0, 0))
    a, b = ScaffoldClient(), ScaffoldClient()
    for client, grads in ((a, vec(4, 4)), (b, vec(2, 6))):
        start_round(client, server)
        client.run(grads)
    server.process_aux_var({"scaffold": send(a)["scaffold"] + send(b)["scaffold"]}, ["a", "b"])
    assert global_state(server).array_equal(vec(3, 5))
    restarted = ScaffoldClient()  # a, its state lost: c_a = [4, 4] lives on only in S
    restarted.on_state_lost()
    start_round(restarted, server)  # takes c = [3, 5] for its lost c_a
    restarted.run(vec(1, 1))
    server.process_aux_var(send(restarted), senders=["a"])  # delta [1, 1] - [3, 5]
    assert server.modules[0].get_state()["clients"] == ["a", "b"]
    assert global_state(server).array_equal(vec(2, 3))  # ([6, 10] + [-2, -4]) / 2
    newcomer = ScaffoldClient()  # a again, restarted without saying so: still one name
    start_round(newcomer, server)
    newcomer.run(vec(0, 0))
    server.process_aux_var(send(newcomer), senders=["a"])
    assert server.modules[0].get_state()["clients"] == ["a", "b"]


def test_partial_participation_rule_of_the_paper() -> None:
    # Karimireddy et al. eq. (5), N = 4: c += |S| / N * mean over S of delta c_i
    # round 1, S = {a, b}, deltas [1, 2], [3, 4]: c = 2/4 * [2, 3] = [1, 1.5]
    # round 2, S = {c, a}, deltas [4, 4], [-1, 0]: c += 2/4 * [1.5, 2] -> [1.75, 2.5]
    paper = Optimizer(lrate=1.0, modules=[["scaffold-server", {"population": 4}]])
    seen = Optimizer(lrate=1.0, modules=["scaffold-server"])
    for server in (paper, seen):
        server.modules[0].run(vec(0, 0))
        server.process_aux_var(delta(4, 6), senders=["a", "b"])
    assert global_state(paper).array_equal(vec(1, 1.5))
    assert global_state(seen).array_equal(vec(2, 3))  # [4, 6] / 2 clients seen
    for server in (paper, seen):
        server.process_aux_var(delta(3, 4), senders=["c", "a"])
    assert global_state(paper).array_equal(vec(1.75, 2.5))
    assert global_state(seen).array_equal(vec(7 / 3, 10 / 3))  # [7, 10] / 3 clients seen
    with pytest.raises(AuxVarError, match="population=4, but 5 distinct clients reported"):
        paper.process_aux_var(delta(1, 1), senders=["d", "e"])
    assert paper.modules[0].get_state()["clients"] == ["a", "b", "c"]  # unchanged


def test_server_state_round_trip_keeps_the_names() -> None:
    server = ScaffoldServer(population=3)
    server.run(vec(0, 0))
    server.process_aux_var(Summable({"delta": vec(3, 6)}), senders=["b", "a"])
    restored = ScaffoldServer(population=3)
    restored.set_state(state_from_bytes(state_to_bytes(server.get_state())))
    assert restored.get_state()["clients"] == ["a", "b"]
    sent = restored.collect_aux_var()
    assert sent is not None and sent.vector("global_state").array_equal(vec(1, 2))
    with pytest.raises(ValueError, match="state 'clients' must be a list of client names, got 2"):
        restored.set_state({"state_sum": None, "clients": 2})
    with pytest.raises(ValueError, match="population=0; expected a positive int or None"):
        ScaffoldServer(population=0)


# ---- several local steps, against the paper's Algorithm 1 (option II) in numpy -------------

N_CLIENTS, K_STEPS, LR, SERVER_LR, DIM = 3, 5, 0.05, 0.8, 4
PARTICIPANTS = [[0, 1], [1, 2], [0, 2], [0, 1, 2]]


def problems() -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Per client a quadratic (A_i, b_i), and gradient noise per round, client and step."""
    rng = np.random.default_rng(3)
    a = [np.diag(rng.uniform(0.5, 4.0, DIM)) for _ in range(N_CLIENTS)]
    b = [rng.normal(scale=2.0, size=DIM) for _ in range(N_CLIENTS)]
    noise = rng.normal(scale=0.1, size=(len(PARTICIPANTS), N_CLIENTS, K_STEPS, DIM))
    return a, b, noise


def paper_scaffold(population: int | None) -> list[tuple[np.ndarray, np.ndarray, list]]:
    """Alg. 1 with option II: y -= lr (g - c_i + c); c_i+ = c_i - c + (x - y) / (K lr);
    x += lr_g mean(y - x); c += |S| / N mean(c_i+ - c_i), or (population None) c = the mean
    of the c_i of the clients seen so far."""
    a, b, noise = problems()
    x, c = np.zeros(DIM), np.zeros(DIM)
    c_i = [np.zeros(DIM) for _ in range(N_CLIENTS)]
    seen: set[int] = set()
    out = []
    for r, sampled in enumerate(PARTICIPANTS):
        dy, dc = [], []
        for i in sampled:
            y = x.copy()
            for k in range(K_STEPS):
                y = y - LR * (a[i] @ y - b[i] + noise[r, i, k] - c_i[i] + c)
            c_plus = c_i[i] - c + (x - y) / (K_STEPS * LR)
            dy.append(y - x)
            dc.append(c_plus - c_i[i])
            c_i[i] = c_plus
        x = x + SERVER_LR * np.mean(dy, axis=0)
        seen.update(sampled)
        if population is None:
            c = np.sum([c_i[i] for i in sorted(seen)], axis=0) / len(seen)
        else:
            c = c + len(sampled) / population * np.mean(dc, axis=0)
        out.append((x, c, [v.copy() for v in c_i]))
    return out


def fedpipe_scaffold(population: int | None) -> list[tuple[np.ndarray, np.ndarray, list]]:
    a, b, noise = problems()
    server = Optimizer(lrate=SERVER_LR, modules=[["scaffold-server", {"population": population}]])
    model = BareWeights(Vector({"w": np.zeros(DIM)}))
    clients = [Optimizer(lrate=LR, modules=["scaffold-client"]) for _ in range(N_CLIENTS)]
    out = []
    for r, sampled in enumerate(PARTICIPANTS):
        x = model.get_weights(copy=True)["w"]
        aux = server.collect_aux_var()
        records, updates = [], []
        for i in sampled:
            local = BareWeights(Vector({"w": x.copy()}))
            if aux:
                clients[i].process_aux_var(aux)
            for k in range(K_STEPS):
                y = local.get_weights()["w"]
                clients[i].apply(local, Vector({"w": a[i] @ y - b[i] + noise[r, i, k]}))
            records.append(clients[i].collect_aux_var()["scaffold"])
            updates.append(x - local.get_weights()["w"])
        total = records[0]
        for record in records[1:]:
            total = total + record
        server.process_aux_var({"scaffold": total}, senders=[f"site-{i}" for i in sampled])
        server.apply(model, Vector({"w": np.mean(updates, axis=0)}))
        c_i = [m.modules[0].get_state()["local_state"] for m in clients]
        out.append(
            (
                model.get_weights(copy=True)["w"],
                global_state(server)["w"],
                [np.zeros(DIM) if v is None else v["w"] for v in c_i],  # type: ignore[index]
            )
        )
    return out


@pytest.mark.parametrize("population", [N_CLIENTS, None])
def test_several_local_steps_follow_the_papers_algorithm(population: int | None) -> None:
    expected, got = paper_scaffold(population), fedpipe_scaffold(population)
    for r, ((x, c, c_i), (x_got, c_got, c_i_got)) in enumerate(zip(expected, got, strict=True)):
        np.testing.assert_allclose(x_got, x, rtol=0, atol=1e-12, err_msg=f"x, round {r + 1}")
        np.testing.assert_allclose(c_got, c, rtol=0, atol=1e-12, err_msg=f"c, round {r + 1}")
        for i in range(N_CLIENTS):
            np.testing.assert_allclose(c_i_got[i], c_i[i], rtol=0, atol=1e-12, err_msg=f"c_{i}")
    assert np.abs(expected[-1][1]).max() > 0.1  # the control variates did move
