"""protocol.flatten / unflatten: every protocol object round-trips through (tensors, JSON)."""

from __future__ import annotations

import json

import pytest
import torch

from flexlora.protocol import ClientFailure, ClientTask, ClientUpdate, SparseDelta, flatten, unflatten


def roundtrip(obj):
    tensors, meta = flatten(obj)
    return unflatten(dict(tensors), json.loads(json.dumps(meta)))  # the metadata is plain JSON


def test_task_with_factors_and_offset_round_trips():
    factors = {"q": (torch.randn(2, 5), torch.randn(4, 2))}
    task = ClientTask("c1", 3, "T2", {"q": 2}, factors, 7, {"freeze_A": True}, base_offset={"q": torch.randn(4, 5)})
    back = roundtrip(task)
    assert (back.client_id, back.round, back.rank_type, back.module_ranks, back.seed, back.options) == (
        "c1",
        3,
        "T2",
        {"q": 2},
        7,
        {"freeze_A": True},
    )
    assert torch.equal(back.factors["q"][0], factors["q"][0]) and torch.equal(back.factors["q"][1], factors["q"][1])
    assert torch.equal(back.base_offset["q"], task.base_offset["q"])
    fresh = roundtrip(ClientTask("c2", 1, "T1", {"q": 2}, None, 1))
    assert fresh.factors is None and fresh.base_offset is None and fresh.options == {}


def test_update_with_deltas_round_trips_and_its_weight_is_never_sent():
    delta = SparseDelta(torch.tensor([0, 3]), torch.tensor([0.5, -1.0]), (2, 3))
    update = ClientUpdate("c1", 12, 16.0, {}, {"loss": 1.5}, deltas={"q": delta}, weight=0.9)
    tensors, meta = flatten(update)
    assert "weight" not in meta and set(tensors) == {"deltas/q.indices", "deltas/q.values"}
    back = roundtrip(update)
    assert back.weight is None and back.factors == {} and back.metrics == {"loss": 1.5}
    assert torch.equal(back.deltas["q"].indices, delta.indices) and back.deltas["q"].shape == (2, 3)
    meta["weight"] = 1.0  # a sender cannot set what the receiver assigns
    assert unflatten(tensors, meta).weight is None


def test_failure_round_trips_and_malformed_input_is_a_one_line_error():
    assert roundtrip(ClientFailure("c1", "timeout")) == ClientFailure("c1", "timeout")
    tensors, meta = flatten(ClientUpdate("c1", 1, 16.0, {"q": (torch.ones(1, 2), torch.ones(2, 1))}))
    del tensors["factors/q.lora_B"]
    with pytest.raises(ValueError, match="only one of lora_A / lora_B"):
        unflatten(tensors, meta)
    with pytest.raises(ValueError, match="unknown protocol type"):
        unflatten({}, {"type": "Pickle"})
