"""Each client really trains at its own rank (the released reference code trains all at r=8)."""

import torch

from flexlora import lora
from flexlora.client import train_client
from flexlora.config import load_config
from flexlora.data.synthetic import make_federation
from flexlora.models import TINY, default_target_modules, load_model
from flexlora.server import FederatedServer


def test_t4_client_trains_rank_200_and_t1_rank_8(monkeypatch):
    cfg = load_config(
        overrides=[
            "model=tiny-llama",
            "resources.profile=[T4, T1]",
            "federation.clients_per_round=2",
            "train.steps=2",
            "train.batch_size=2",
            "data.cutoff_len=512",
        ]
    )
    model, tokenizer = load_model(TINY, "cpu")
    targets = default_target_modules(model)
    shapes = lora.module_shapes(model, targets)
    data = make_federation(num_clients=2, train_per_client=4, test_per_client=1, seed=0)
    server = FederatedServer(cfg, [c.client_id for c in data.clients], shapes)
    t4, t1 = (c.client_id for c in data.clients)
    assert server.client_types == {t4: "T4", t1: "T1"}

    seen = {}  # client -> {module: (rank, A.requires_grad, B.requires_grad)} inside training
    real_get_factors = lora.get_factors

    def spy(peft_model):
        layers = dict(lora._lora_layers(peft_model))
        seen[current] = {
            name: (layer.r["default"], layer.lora_A["default"].weight.requires_grad, layer.lora_B["default"].weight.requires_grad)
            for name, layer in layers.items()
        }
        return real_get_factors(peft_model)

    monkeypatch.setattr(lora, "get_factors", spy)
    updates = {}
    for task in server.configure(1, [t4, t1]):
        current = task.client_id
        client = next(c for c in data.clients if c.client_id == current)
        updates[current] = train_client(model, tokenizer, client, task, cfg, targets)

    assert len(seen[t4]) == len(shapes) == 4 * 7
    for name, (m, n) in shapes.items():
        assert seen[t4][name] == (min(200, m, n), True, True), name
        assert seen[t1][name] == (8, True, True), name
        # What comes back has those ranks, and B (zero at PEFT init) really moved.
        a4, b4 = updates[t4].factors[name]
        assert a4.shape == (min(200, m, n), n) and b4.shape == (m, min(200, m, n))
        assert updates[t1].factors[name][0].shape == (8, n)
        assert b4.abs().sum() > 0
    # 200 is capped by the module's size: k_proj is 128 x 256 on the tiny model.
    assert {r for r, _, _ in seen[t4].values()} == {200, 128}
    assert updates[t4].metrics["trainable_params"] > 10 * updates[t1].metrics["trainable_params"]
    # The shared model is left unwrapped after each client.
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_t3_uses_attention_and_mlp_ranks():
    from flexlora.resources import module_ranks, paper_rank_types

    shapes = {"l.0.self_attn.q_proj": (576, 576), "l.0.self_attn.k_proj": (192, 576), "l.0.mlp.up_proj": (1536, 576)}
    ranks = module_ranks(paper_rank_types()["T3"], shapes)
    assert ranks == {"l.0.self_attn.q_proj": 30, "l.0.self_attn.k_proj": 30, "l.0.mlp.up_proj": 200}


def test_fedit_cuts_every_client_to_the_smallest_rank():
    cfg = load_config(overrides=["method=fedit", "resources.profile=[T4, T1, T3]"])
    shapes = {"a.q_proj": (64, 64), "a.up_proj": (128, 64)}
    server = FederatedServer(cfg, ["x", "y", "z"], shapes)
    assert all(r == {"a.q_proj": 8, "a.up_proj": 8} for r in server.client_ranks.values())


def test_factors_round_trip_through_peft():
    model, _ = load_model(TINY, "cpu")
    targets = default_target_modules(model)
    shapes = lora.module_shapes(model, targets)
    ranks = {name: 3 for name in shapes}
    factors = {name: (torch.randn(3, n), torch.randn(m, 3)) for name, (m, n) in shapes.items()}
    peft_model = lora.attach(model, ranks, 16, 0.0, targets, factors)
    back = lora.get_factors(peft_model)
    lora.detach(peft_model)
    for name in shapes:
        assert torch.equal(back[name][0], factors[name][0]) and torch.equal(back[name][1], factors[name][1])
