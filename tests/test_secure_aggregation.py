"""Secure aggregation without the protocol (flexlora.privacy.secagg): each compatible method's
state from the weighted mean of its clients' uploads equals its plain aggregate; every other
method, and what cannot compose with it, is refused in one line; the configuration's checks;
the quantisation bound against numbers worked out by hand. The protocol itself (Flower's
SecAgg+) is in test_secure_aggregation_flower.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from small_federation import UPDATE_SHAPES, random_updates

from flexlora.config import ConfigError, load_config
from flexlora.methods import METHODS, make_method
from flexlora.methods.ffa import shared_A
from flexlora.privacy.secagg import SecureSpec, check_secure, quantization_bound, summands

COMPATIBLE = {"flexlora", "flora", "fedex", "fedit", "hetlora", "ffa"}
ALPHA = 16.0


def secure_state(method, updates, weights, state):
    """What the server makes of the clients' uploads when it sees only their weighted mean:
    the exact (float64) mean, as SecAgg+ gives it up to its quantisation."""
    ranks = [{m: A.shape[0] for m, (A, _) in u.factors.items()} for u in updates]
    spec = SecureSpec.of_round(check_secure(method), UPDATE_SHAPES, ranks)
    uploads = [summands({m: (A.numpy(), B.numpy()) for m, (A, B) in u.factors.items()}, u.lora_alpha, spec) for u in updates]
    total = sum(weights)
    mean = [sum(w * up[i] for w, up in zip(weights, uploads)) / total for i in range(len(spec.entries()))]
    tensors = {name: torch.from_numpy(a) for (name, _), a in zip(spec.entries(), mean)}
    module_ranks = {m: [r[m] for r in ranks] for m in UPDATE_SHAPES}
    return method.from_secure_mean(tensors, state, ALPHA, module_ranks)


def global_update(method, state) -> dict[str, torch.Tensor]:
    """The global model's change of each module: base offset plus its adapter's s·B·A."""
    factors, ranks = method.global_factors(state, ALPHA)
    offsets = method.base_offset(state) or {}
    out = {m: offsets.get(m, torch.zeros(shape, dtype=torch.float64)).double().clone() for m, shape in UPDATE_SHAPES.items()}
    for m, (A, B) in factors.items():
        out[m] += (ALPHA / ranks[m]) * B.double() @ A.double()
    return out


@pytest.mark.parametrize("name", sorted(COMPATIBLE))
def test_each_compatible_method_makes_its_plain_state_from_the_weighted_mean_of_the_uploads(name, one_thread):
    method = make_method(name, **({"device": None} if name == "flexlora" else {}))
    if name == "flexlora":
        method.bound_ranks({m: min(shape) for m, shape in UPDATE_SHAPES.items()})
    homogeneous = {"attn": 4, "mlp": 4} if method.homogeneous else None
    updates = random_updates(seed=3, ranks=homogeneous)
    if name == "ffa":  # A frozen at the shared rows: the uploads leave it out, the server knows it
        updates = [
            dataclasses.replace(
                u, factors={m: (shared_A(0, m, A.shape[0], A.shape[1], A.dtype), B) for m, (A, B) in u.factors.items()}
            )
            for u in updates
        ]
    weights = [u.num_examples for u in updates]  # unequal: 10, 50, 7, 21
    previous = method.init_state(UPDATE_SHAPES)
    for round_ in (1, 2):  # round 2 from round 1's state: FLoRA and FedEx carry an offset over
        plain = method.aggregate(updates, previous)
        secure = secure_state(method, updates, weights, previous)
        assert secure.keys() == plain.keys()
        for m, delta in global_update(method, plain).items():
            torch.testing.assert_close(global_update(method, secure)[m], delta, rtol=1e-9, atol=1e-9)
            assert delta.abs().max() > 0.1  # a real update, not two zeros
        previous = plain
        updates = random_updates(seed=10 + round_, ranks=homogeneous) if name != "ffa" else updates


@pytest.mark.parametrize("name", sorted(set(METHODS) - COMPATIBLE))
def test_a_method_that_needs_each_clients_factors_is_refused_in_one_line(name):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"method={name}", "engine=flower", "flower.secure_aggregation=true"])
    assert str(e.value) == (
        f"flower.secure_aggregation: method {name} needs each client's own factors, which secure aggregation hides from the server"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["method=hetlora", "method_args.weighting=sparsity"],
            "weighting=sparsity weighs each client by the norm of its own update",
        ),
        (["method=hetlora", "method_args.padding=replication"], "secure aggregation supports zero padding only"),
        (["method=hetlora", "method_args.prune_threshold=0.1"], "pruning (prune_threshold) changes a client's rank"),
        (
            ["method=flexlora", "method_args.server_opt.name=fedadam"],
            "server_opt: a server optimizer needs each client's starting point",
        ),
        (["engine=local"], "flower.secure_aggregation: needs engine=flower"),
        (["privacy.enabled=true", "privacy.clipping_norm=1.0"], "flower.secure_aggregation: not with privacy.enabled yet"),
        (["federation.clients_per_round=1"], "needs federation.clients_per_round >= 2"),
        (["federation.clients_per_round=1024"], "1024 clients a round x q = 4.29497e+09 must stay below secagg_modulus_range"),
        (["flower.secagg_modulus_range=3000000000"], "flower.secagg_modulus_range: a power of 2 above secagg_quantization_range"),
        (["flower.secagg_num_shares=2"], "flower.secagg_num_shares: a fraction (<= 1) or an integer >= 3, got 2"),
        (
            ["flower.secagg_num_shares=5", "flower.secagg_reconstruction_threshold=5"],
            "threshold: 5 must be below secagg_num_shares (5)",
        ),
    ],
)
def test_what_cannot_run_under_secure_aggregation_is_a_one_line_config_error(overrides, message):
    with pytest.raises(ConfigError, match="^[^\n]*$") as e:
        load_config(overrides=["engine=flower", "flower.secure_aggregation=true", *overrides])
    assert message in str(e.value)


def test_a_subclass_with_its_own_aggregation_rule_does_not_inherit_secure_aggregation():
    class Renormalised(METHODS["fedit"]):
        name = "fedit-renormalised"

        def aggregate(self, updates, state=None):  # any rule of its own
            return super().aggregate(updates, state)

    with pytest.raises(ValueError, match="method fedit-renormalised needs each client's own factors"):
        check_secure(Renormalised())
    assert check_secure(make_method("fedit")) == ("A", "B")


def test_the_uploads_are_padded_scaled_and_checked():
    spec = SecureSpec(("A", "B", "dense"), {"m": (3, 2)}, {"m": 4})
    A, B = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    up_A, up_B, dense = summands({"m": (A, B)}, 16.0, spec)  # rank 2: s = 8
    assert up_A.shape == (4, 2) and np.array_equal(up_A[:2], A) and not up_A[2:].any()
    assert up_B.shape == (3, 4) and np.array_equal(up_B[:, :2], 8 * B) and not up_B[:, 2:].any()
    assert np.array_equal(dense, 8 * B @ A)
    assert SecureSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="module m: the update is not finite"):
        summands({"m": (A, B * np.nan)}, 16.0, spec)
    with pytest.raises(ValueError, match=r"do not fit \(r, 2\) and \(3, r\) with 1 <= r <= 4"):
        summands({"m": (np.ones((5, 2)), np.ones((3, 5)))}, 16.0, spec)
    with pytest.raises(ValueError, match="module x is not in the round"):
        summands({"m": (A, B), "x": (A, B)}, 16.0, spec)


def test_the_quantisation_bound_by_hand():
    c, q = 1.0, 2**22
    # Equal weights: each client's weight is sent exactly (q_k = q), K errors below one step
    # 2c/q divided by Σ d_k = K: 2c/q.
    assert quantization_bound([5.0, 5.0, 5.0], c, q) == pytest.approx(2 * c / q, rel=1e-12)
    # Weights 1 and 1/3: d = (1, round(q/3)/q), the second off by 1/(3q); K = 2 steps of 2c/q
    # over Σ d, plus 2·max|x|·(1/(3q)) over Σ d.
    d2 = round(q / 3) / q
    expected = (2 * 2 * c / q + 2 * 0.5 * abs(d2 - 1 / 3)) / (1 + d2)
    assert quantization_bound([3.0, 1.0], c, q, max_abs=0.5) == pytest.approx(expected, rel=1e-12)


def test_the_benchmark_reads_bytes_and_time_per_round_and_checks_what_the_server_received(tmp_path):
    from flexlora.bench import secagg as bench

    client = {"train_time_s": 2.0, "bytes_up": 1000, "bytes_down": 300, "arrays_received": 0, "share_in_unmasked_range": 0.001}
    record = {"clients": {"a": client, "b": {**client, "train_time_s": 3.0}}, "failures": {}}
    lines = [
        {"round": 0, "time": {}},
        {"round": 1, "time": {"total_s": 10.0, "evaluation_s": 4.0}, **record},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    (row,) = bench.read_rounds(tmp_path)
    assert (row["wall_s"], row["slowest_train_s"], row["bytes_up"], row["bytes_down"], row["clients"]) == (6.0, 3.0, 2000, 600, 2)
    result = {"rows": [{"method": "flexlora", "secagg": True, **row}], "config": {"nodes": 2}}
    assert bench.goals(result)[-1] == "goals: 2 of 2 met"
    assert "| flexlora | yes | 1 | 6.0 | 3.0 | 0.00 | 0.00 | 2 (0) |" in bench.format_table(result)
    result["rows"][0]["arrays_received"] = 1  # the server held an array: the goal fails
    assert bench.goals(result)[1].startswith("FAIL under SecAgg+ the ServerApp receives no array")
