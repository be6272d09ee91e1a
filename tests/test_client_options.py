"""Client-side behaviour of the baselines (ClientTask.options), on the tiny model."""

from __future__ import annotations

import pytest
import torch

from flexlora import lora
from flexlora.client import ClientTask, train_client
from flexlora.config import load_config
from flexlora.data.synthetic import make_federation
from flexlora.methods import ClientUpdate, HetLoRA, parse_client_options
from flexlora.methods.fedprox import proximal_loss
from flexlora.methods.hetlora import RankRegularizer, prune_factors, rank_regularizer_loss, tail_start
from flexlora.methods.slora import lora_budget_density, sparse_mask
from flexlora.models import TINY, default_target_modules, load_model
from flexlora.server import FederatedServer

OVERRIDES = ["model=tiny-llama", "device=cpu", "train.steps=2", "train.batch_size=2", "data.cutoff_len=256", "lora.dropout=0"]


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = load_model(TINY, "cpu")
    targets = default_target_modules(model)
    shapes = lora.module_shapes(model, targets)
    data = make_federation(num_clients=1, train_per_client=4, test_per_client=1, seed=0).clients[0]
    return model, tokenizer, targets, shapes, data


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(setup, options=None, factors=None, ranks=4, base_offset=None, cfg_overrides=()):
    model, tokenizer, targets, shapes, data = setup
    cfg = load_config(overrides=[*OVERRIDES, *cfg_overrides])
    task = ClientTask(
        data.client_id, 1, "T1", {m: ranks for m in shapes}, factors, seed=7, options=options or {}, base_offset=base_offset
    )
    return train_client(model, tokenizer, data, task, cfg, targets)


def random_factors(shapes, r, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn(r, n, generator=gen) * scale, torch.randn(mm, r, generator=gen) * scale) for m, (mm, n) in shapes.items()
    }


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "options, message",
    [
        ({"regulariser": {}}, "client option 'regulariser' is unknown"),
        ({"rank_regularizer": {"lambda": -1}}, "rank_regularizer.lambda must be a number in [0, inf)"),
        ({"rank_regularizer": {"gamma": 1.0}}, "rank_regularizer.gamma must be a number in (0, 1)"),
        ({"rank_regularizer": {"lam": 1}}, "rank_regularizer.lam is unknown"),
        ({"sparse": {"density": 0}}, "sparse.density must be a number in (0, 1]"),
        ({"sparse": {"density": 0.1}, "freeze_A": True}, "excludes freeze_A"),
        ({"freeze_A": "yes"}, "freeze_A must be true or false"),
        ({"fedprox_mu": "big"}, "fedprox_mu must be a number"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError) as err:
        parse_client_options(options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_options_parse():
    opts = {
        h.option: h
        for h in parse_client_options(
            {"rank_regularizer": {"lambda": 0.1, "gamma": 0.5, "prune_threshold": None}, "fedprox_mu": 0.2, "timeout_s": 3}
        )
    }
    assert opts["rank_regularizer"] == RankRegularizer(0.1, 0.5, None) and opts["fedprox_mu"].mu == 0.2 and "freeze_A" not in opts
    assert parse_client_options({"sparse": {"seed": 3}})[0].density == "lora_budget"


# ---------------------------------------------------------------- HetLoRA regularizer and pruning


def test_rank_regularizer_has_the_analytic_gradient():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(10, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    reg = RankRegularizer(lam=0.3, gamma=0.8)
    assert tail_start(10, 0.8) == 8 and tail_start(8, 0.99) == 7 and tail_start(1, 0.99) == 0
    loss = rank_regularizer_loss({"m": (A, B)}, reg)
    loss.backward()
    At, Bt = A.detach()[8:], B.detach()[:, 8:]
    assert loss.item() == pytest.approx(0.3 * At.norm().item() * Bt.norm().item())
    assert torch.allclose(A.grad[8:], 0.3 * Bt.norm() * At / At.norm())
    assert torch.allclose(B.grad[:, 8:], 0.3 * At.norm() * Bt / Bt.norm())
    assert torch.all(A.grad[:8] == 0) and torch.all(B.grad[:, :8] == 0)  # only the tail is pushed


def test_regularizer_changes_local_training(setup):
    shapes = setup[3]
    factors = random_factors(shapes, 4)
    plain = run(setup, factors=factors)
    reg = run(setup, {"rank_regularizer": {"lambda": 50.0, "gamma": 0.5}}, factors=factors)
    module = sorted(shapes)[0]
    A0, _ = factors[module]
    # the tail (rows 2, 3) of A shrinks more under the regularizer; the rest trains the same way
    tail_plain = plain.factors[module][0][2:].norm()
    tail_reg = reg.factors[module][0][2:].norm()
    assert tail_reg < tail_plain - 1e-4
    assert not torch.allclose(plain.factors[module][0], reg.factors[module][0])
    assert A0.shape == reg.factors[module][0].shape


def test_pruning_cuts_small_tails_and_keeps_the_head():
    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(10, 6, generator=gen), torch.randn(5, 10, generator=gen)
    small = (A.clone(), B.clone())
    small[1][:, 9:] *= 1e-4  # the tail (s = ⌊0.9·10⌋ = 9) is tiny
    out, pruned = prune_factors({"big": (A, B), "small": small}, RankRegularizer(0.0, 0.9, prune_threshold=0.01))
    assert pruned == {"small": 9}
    assert out["big"][0].shape == (10, 6)
    a, b = out["small"]
    assert a.shape == (9, 6) and b.shape == (5, 9)
    # the kept part of the update is unchanged at the new scale α/9
    assert torch.allclose((16 / 9) * b @ a, (16 / 10) * small[1][:, :9] @ small[0][:9], atol=1e-6)


def test_server_keeps_a_pruned_rank():
    cfg = load_config(overrides=["method=hetlora", "resources.profile=[T4, T1]"])
    shapes = {"l.q_proj": (64, 64)}
    server = FederatedServer(cfg, ["x", "y"], shapes)
    assert server.client_ranks["x"]["l.q_proj"] == 64
    ups = [ClientUpdate(cid, 4, 16.0, {"l.q_proj": (torch.randn(r, 64), torch.randn(64, r))}) for cid, r in (("x", 50), ("y", 8))]
    server.aggregate(ups)
    assert server.client_ranks == {"x": {"l.q_proj": 50}, "y": {"l.q_proj": 8}}
    task = server.configure(2, ["x"])[0]
    assert task.module_ranks == {"l.q_proj": 50} and task.factors["l.q_proj"][0].shape == (50, 64)
    assert task.options == HetLoRA().client_options(None, 2, "T4")


# ---------------------------------------------------------------- FFA, FedProx


def test_freeze_A_trains_only_B(setup):
    shapes = setup[3]
    factors = random_factors(shapes, 3, seed=2)
    up = run(setup, {"freeze_A": True}, factors=factors, ranks=3)
    trainable = run(setup, factors=factors, ranks=3).metrics["trainable_params"]
    for module in shapes:
        assert torch.equal(up.factors[module][0], factors[module][0])
        assert not torch.equal(up.factors[module][1], factors[module][1])
    assert 0 < up.metrics["trainable_params"] < trainable


def test_fedprox_pulls_towards_the_start(setup):
    shapes = setup[3]
    factors = random_factors(shapes, 3, seed=3)
    free = run(setup, factors=factors, ranks=3, cfg_overrides=["train.lr=0.01"])
    prox = run(setup, {"fedprox_mu": 1000.0}, factors=factors, ranks=3, cfg_overrides=["train.lr=0.01"])

    def moved(up):
        return sum(float((up.factors[m][i] - factors[m][i]).norm() ** 2) for m in shapes for i in (0, 1))

    assert moved(prox) < moved(free)
    p = [torch.tensor([1.0, 2.0], requires_grad=True)]
    loss = proximal_loss(p, [torch.tensor([0.0, 1.0])], mu=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.5) and torch.allclose(p[0].grad, torch.tensor([0.5, 0.5]))


# ---------------------------------------------------------------- base offset and SLoRA's sparse stage


def test_base_offset_is_used_and_restored_exactly(setup):
    model, shapes = setup[0], setup[3]
    before = snapshot(model)
    gen = torch.Generator().manual_seed(4)
    offset = {m: torch.randn(mm, n, generator=gen) * 0.05 for m, (mm, n) in shapes.items()}
    seen = {}
    module = sorted(shapes)[0]
    layer = lora.target_layers(model, [module])[module]

    def spy(mod, args):
        seen.setdefault("w", mod.weight.detach().clone())

    handle = layer.register_forward_pre_hook(spy)
    try:
        with_offset = run(setup, base_offset=offset)
    finally:
        handle.remove()
    without = run(setup)
    assert torch.allclose(seen["w"], before[f"{module}.weight"] + offset[module])  # trained on base + offset
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    assert with_offset.metrics["train_loss_first"] != without.metrics["train_loss_first"]


def test_sparse_training_changes_only_masked_entries(setup):
    model, shapes = setup[0], setup[3]
    before = snapshot(model)
    up = run(setup, {"sparse": {"density": "lora_budget", "seed": 11, "lr": 1e-2}}, ranks=2)
    assert up.factors == {} and set(up.deltas) == set(shapes)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored, nothing else trained
    total = 0
    for module, (m, n) in shapes.items():
        delta = up.deltas[module]
        density = lora_budget_density(2, (m, n))
        mask = sparse_mask((m, n), density, 11, module)
        assert torch.equal(delta.indices, mask.flatten().nonzero().squeeze(1))  # exactly the mask's entries
        assert delta.shape == (m, n) and delta.values.abs().sum() > 0
        total += int(mask.sum())
    assert up.metrics["trainable_params"] == total
    # masks are shared (seeded) and nested across densities
    lo, hi = sparse_mask((40, 30), 0.1, 5, "x"), sparse_mask((40, 30), 0.4, 5, "x")
    assert torch.all(hi[lo]) and 0.05 < lo.float().mean() < 0.15 and 0.3 < hi.float().mean() < 0.5


def test_merged_export_holds_the_offset(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, shapes = setup[0], setup[1], setup[3]
    module = sorted(shapes)[0]
    offset = {module: torch.full(shapes[module], 0.01)}
    r = 2
    factors = {module: (torch.ones(r, shapes[module][1]), torch.ones(shapes[module][0], r) * 0.001)}
    lora.save_merged(model, tokenizer, tmp_path / "merged", offset, factors, {module: r}, 16.0)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    expected = model.state_dict()[f"{module}.weight"] + 0.01 + (16.0 / r) * 0.001 * r
    assert torch.allclose(loaded.state_dict()[f"{module}.weight"], expected, atol=1e-6)
    assert not torch.allclose(model.state_dict()[f"{module}.weight"], expected)  # in-memory model untouched
