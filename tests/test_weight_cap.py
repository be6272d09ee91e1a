"""Claimed dataset sizes: a client's n_k is declared once (a reply claiming more is rejected,
a checkpoint keeps the sizes first declared), and federation.max_weight_share caps any client's
share of a round's weight (water-filling, the excess spread by n_k). The servers and honest
clients are tests/test_validation.py's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_validation import BAD, CLIENTS, SHAPES, FakeRuntime, make_server

from flexlora.methods import capped_weights, make_method
from flexlora.methods.flexlora import dense_delta
from flexlora.server import run_rounds


def test_capped_weights_water_fill_to_the_cap_and_sum_to_one():
    assert capped_weights([1, 1, 2], None) == ([0.25, 0.25, 0.5], True)
    assert capped_weights([1, 1, 2], 0.5) == ([0.25, 0.25, 0.5], True)  # nobody above: unchanged
    w, ok = capped_weights([10**9, 10, 20, 30], 0.4)
    assert ok and w[0] == 0.4 and sum(w) == pytest.approx(1.0, abs=1e-15)
    assert w[1:] == pytest.approx([0.6 * 10 / 60, 0.6 * 20 / 60, 0.6 * 30 / 60])  # excess spread by n_k
    # Spreading the excess can push another client over the cap: it is capped in turn.
    w, ok = capped_weights([1000, 500, 10, 10], 0.35)
    assert ok and w[:2] == [0.35, 0.35] and w[2:] == pytest.approx([0.15, 0.15]) and max(w) <= 0.35
    assert capped_weights([10**9, 1, 1], 0.2) == ([1 / 3] * 3, False)  # 0.2 * 3 < 1: infeasible, all equal


@pytest.mark.parametrize("method", ["flexlora", "fedit", "hetlora"])
def test_a_client_declaring_a_billion_examples_gets_at_most_the_cap(method):
    """A client that declared (and claims) 10⁹ examples: with federation.max_weight_share=0.4 its
    weight is 0.4, the others share 0.6 by their n_k, metrics.jsonl's record says so, and the
    global state equals the aggregate computed with these weights (for FlexLoRA: ΔW = Σ p_k s_k
    B_k A_k, rebuilt here from the updates)."""
    server = make_server(method, max_weight_share=0.4)
    server.method.bound_ranks({m: min(shape) for m, shape in SHAPES.items()})  # ΔW is read back whole below
    server.declared_sizes = {c: 10**9 if c == BAD else 10 + int(c[1:]) for c in CLIENTS}
    runtime = FakeRuntime(lambda u, t: dataclasses.replace(u, num_examples=10**9))
    records = []

    def log(record):
        records.append(record)
        if not record["round"]:
            return
        weights = record["weights"]
        assert record["rejected"] == {} and set(weights) == set(CLIENTS)
        assert weights[BAD] == 0.4 and sum(weights.values()) == pytest.approx(1.0, abs=1e-12)
        others = {c: 10 + int(c[1:]) for c in CLIENTS if c != BAD}
        for c, n in others.items():
            assert weights[c] == pytest.approx(0.6 * n / sum(others.values()), rel=1e-12)
        honest = [dataclasses.replace(runtime.honest[c], num_examples=10**9) if c == BAD else runtime.honest[c] for c in CLIENTS]
        if method == "flexlora":
            for module in SHAPES:
                expected = sum(
                    weights[u.client_id] * u.scale(module) * (u.factors[module][1].double() @ u.factors[module][0].double())
                    for u in honest
                )
                torch.testing.assert_close(dense_delta(server.state, module).double(), expected, rtol=1e-5, atol=1e-6)
        elif method == "fedit":
            for module in SHAPES:
                for i, part in enumerate("AB"):
                    expected = sum(weights[u.client_id] * u.factors[module][i].double() for u in honest)
                    torch.testing.assert_close(server.state[f"{module}.{part}"].double(), expected, rtol=1e-6, atol=1e-7)
        # And the method's own aggregate with the bounded weights, to float rounding (the server
        # folds the uncapped updates with raw weights n_k, see round_aggregation.RoundAggregation; FlexLoRA's
        # ΔW is checked against the formula above, its factors may differ by a rotation).
        bounded = [dataclasses.replace(u, weight=weights[u.client_id]) for u in honest]
        expected_state = make_method(method).aggregate(bounded, None if method != "hetlora" else states[-1])
        if method != "flexlora":
            assert all(torch.allclose(server.state[k], expected_state[k], rtol=1e-6, atol=1e-7) for k in expected_state)
        states.append(server.state)

    states = [None]
    run_rounds(server, runtime, lambda s, r: {}, log)
    assert [r["round"] for r in records] == [0, 1, 2]
    # Without the cap, the same client would take (almost) the whole model.
    plain = make_server(method)
    plain.declared_sizes = server.declared_sizes
    uncapped = []
    run_rounds(plain, FakeRuntime(lambda u, t: dataclasses.replace(u, num_examples=10**9)), lambda s, r: {}, uncapped.append)
    assert uncapped[1]["weights"][BAD] > 0.999999


def test_a_reply_claiming_more_than_its_client_declared_is_rejected():
    server = make_server()
    server.declared_sizes = {c: 10 + int(c[1:]) for c in CLIENTS}
    runtime = FakeRuntime(lambda u, t: dataclasses.replace(u, num_examples=10**9))
    records = []

    def log(record):
        records.append(record)
        if record["round"]:
            method = make_method("flexlora")
            method.bound_ranks(server.method.rank_bound)  # the state goes up to the largest client rank
            expected = method.aggregate([runtime.honest[c] for c in record["clients"]])
            assert all(torch.equal(server.state[k], expected[k]) for k in expected)

    run_rounds(server, runtime, lambda s, r: {}, log)
    for record in records[1:]:
        assert record["rejected"] == {BAD: "num_examples 1000000000 is above the 11 this client declared"}
        assert BAD not in record["weights"] and sum(record["weights"].values()) == pytest.approx(1.0)
    # Claiming up to the declared size is fine; a checkpoint keeps the sizes first declared.
    tensors, meta = server.state_dict()
    fresh = make_server()
    fresh.declared_sizes = {c: 10**9 for c in CLIENTS}  # re-declared bigger on resume
    fresh.load_state_dict(tensors, meta)
    assert fresh.declared_sizes == server.declared_sizes
