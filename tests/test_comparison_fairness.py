"""Comparison hygiene: every method starts round 1 from one shared adapter, server optimizers
step from what the clients started from, and the factorisations are the ones documented (not
just the same product)."""

from __future__ import annotations

import pytest
import torch

from flexlora.config import load_config
from flexlora.methods import METHODS, FlexLoRA, SLoRA, SparseDelta, compose_method, make_method
from flexlora.methods.base import ClientUpdate
from flexlora.methods.server_opt import starting_point
from flexlora.server import FederatedServer

SHAPES = {"l0.q_proj": (64, 48), "l0.up_proj": (96, 48)}
CLIENTS = ["a", "b", "c", "d"]
ALPHA = 16.0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_round_one_clients_share_one_starting_adapter(name):
    cfg = load_config(overrides=[f"method={name}", "resources.profile=[T1, T4, T3, T2]"])
    server = FederatedServer(cfg, CLIENTS, SHAPES)
    tasks = server.configure(1, CLIENTS)
    if name == "slora":  # stage 1 trains the weights under masks drawn from one shared seed
        assert all(t.factors is None for t in tasks)
        assert len({t.options["sparse"]["seed"] for t in tasks}) == 1
        return
    if name == "lora_a2":  # one global adapter at the largest rank for all; a client's ranks are its upload budget
        for module in SHAPES:
            A0, B0 = tasks[0].factors[module]
            assert all(torch.equal(t.factors[module][0], A0) and torch.equal(t.factors[module][1], B0) for t in tasks)
            assert A0.shape[0] == max(t.module_ranks[module] for t in tasks) and not B0.any() and A0.abs().max() > 0
        return
    for module in SHAPES:
        starts = sorted(((t.factors[module], t.module_ranks[module]) for t in tasks), key=lambda x: -x[1])
        (A_max, _), r_max = starts[0]
        assert (
            len({r for _, r in starts}) > 1 or server.method.homogeneous
        )  # heterogeneous ranks, except FedIT (and any homogeneous method)
        for (A, B), r in starts:
            assert A.shape[0] == r and B.shape[1] == r
            assert torch.equal(A, A_max[:r]), f"{name}: {module} rank {r} is not a prefix of the shared A"
            assert not B.any(), f"{name}: round-1 B must be 0 (no update yet)"
        assert A_max.abs().max() > 0


def echo_updates(method, state, ranks_by_client, sizes):
    """Clients that send back exactly what they were handed."""
    return [
        ClientUpdate(cid, n, ALPHA, method.client_factors(state, ranks, ALPHA))
        for (cid, ranks), n in zip(ranks_by_client.items(), sizes)
    ]


def trained_state(inner_name, ranks_by_client, sizes, seed=0):
    """A nonzero global state with no server-optimizer moments (e.g. right after round 1)."""
    gen = torch.Generator().manual_seed(seed)
    ups = []
    for (cid, ranks), n in zip(ranks_by_client.items(), sizes):
        factors = {
            m: (torch.randn(r, SHAPES[m][1], generator=gen), torch.randn(SHAPES[m][0], r, generator=gen))
            for m, r in ranks.items()
        }
        ups.append(ClientUpdate(cid, n, ALPHA, factors))
    return make_method(inner_name).aggregate(ups, None)


def aggregate_with_step(composition, ups, previous):
    method = composition.method
    start = method.aggregate([starting_point(method, u, previous) for u in ups], previous)
    return composition.server_step(method, start, method.aggregate(ups, previous))


@pytest.mark.parametrize("inner", ["flexlora", "fedit"])
@pytest.mark.parametrize("opt", [{"name": "fedavgm"}, {"name": "fedadam", "lr": 0.01}, {"name": "fedyogi", "lr": 0.01}])
def test_server_optimizer_adds_nothing_when_clients_do_not_train(inner, opt):
    """Clients that send back what they were handed give a zero pseudo-gradient: the server
    optimizer must leave the global model exactly where the method alone puts it (FedIT:
    unchanged; FlexLoRA: the weighted sum of the clients' truncations, its own behaviour)."""
    if inner == "flexlora":  # heterogeneous ranks: each client starts from a truncation of ΔW
        ranks = {
            "a": {"l0.q_proj": 2, "l0.up_proj": 3},
            "b": {"l0.q_proj": 5, "l0.up_proj": 9},
            "c": {"l0.q_proj": 8, "l0.up_proj": 4},
        }
    else:
        ranks = {cid: {"l0.q_proj": 4, "l0.up_proj": 4} for cid in "abc"}
    sizes = [10, 50, 7]
    plain, optimized = make_method(inner), compose_method(inner, server_opt=opt)
    s_plain = s_opt = trained_state(inner, ranks, sizes)
    for _ in range(6):
        s_plain = plain.aggregate(echo_updates(plain, s_plain, ranks, sizes), s_plain)
        s_opt = aggregate_with_step(optimized, echo_updates(optimized.method, s_opt, ranks, sizes), s_opt)
    expected, _ = plain.global_factors(s_plain, ALPHA)
    got, _ = optimized.method.global_factors(s_opt, ALPHA)
    for module in SHAPES:
        ref = expected[module][1] @ expected[module][0]
        drift = torch.linalg.norm(got[module][1] @ got[module][0] - ref) / torch.linalg.norm(ref)
        assert drift < 1e-4, f"{inner} + {opt['name']}: the server step moved the global update by {drift:.3f} of its norm"
    if inner == "fedit":  # and FedIT's model did not move at all
        start, _ = plain.global_factors(trained_state(inner, ranks, sizes), ALPHA)
        for module in SHAPES:
            assert torch.allclose(got[module][1] @ got[module][0], start[module][1] @ start[module][0], rtol=1e-4, atol=1e-5)


def test_flexlora_puts_all_of_S_into_B():
    """split all_in_B (the paper): A = Vh_r has orthonormal rows, B = U_r S_r / s_r."""
    gen = torch.Generator().manual_seed(1)
    ups = [
        ClientUpdate(
            c,
            n,
            ALPHA,
            {
                "l0.q_proj": (
                    torch.randn(r, 48, generator=gen, dtype=torch.float64),
                    torch.randn(64, r, generator=gen, dtype=torch.float64),
                )
            },
        )
        for c, n, r in (("a", 3, 4), ("b", 5, 6))
    ]
    method = FlexLoRA()
    state = method.aggregate(ups, None)
    S = state["l0.q_proj.S"]
    for r in (3, 8, 10):
        A, B = method.client_factors(state, {"l0.q_proj": r}, ALPHA)["l0.q_proj"]
        assert torch.allclose(A @ A.T, torch.eye(r, dtype=A.dtype), atol=1e-10)
        assert torch.allclose(torch.linalg.norm(B, dim=0), S[:r] / (ALPHA / r), rtol=1e-10)


def test_slora_svd_start_puts_all_of_S_into_B():
    method = SLoRA(sparse_rounds=1)
    gen = torch.Generator().manual_seed(2)
    m, n = SHAPES["l0.q_proj"]
    dense = torch.randn(m, n, generator=gen, dtype=torch.float64)
    flat = torch.arange(m * n)
    ups = [ClientUpdate("a", 1, ALPHA, {}, deltas={"l0.q_proj": SparseDelta(flat, dense.flatten(), (m, n))})]
    state = method.aggregate(ups, None)
    S = torch.linalg.svdvals(dense)
    r = 6
    A, B = method.client_factors(state, {"l0.q_proj": r}, ALPHA)["l0.q_proj"]
    assert torch.allclose(A @ A.T, torch.eye(r, dtype=A.dtype), atol=1e-10)
    assert torch.allclose(torch.linalg.norm(B, dim=0), S[:r] / (ALPHA / r), rtol=1e-8)
