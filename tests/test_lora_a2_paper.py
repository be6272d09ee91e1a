"""LoRA-A² as its ACL 2025 paper states it, inside a real client step on the tiny model: B trains
at 5× A's learning rate (§5.4, Appendix B); each component is scored by Eq. 4 on the client's own
update over a trial pass, ‖ΔB_k[:, i] A[i, :]‖_F; training then restarts from the round's global
factors with only the selected components free (Algorithm 2). Every expectation is computed here
by hand: plain SGD on the adapter over the client loop's batches. Also train.lr_b_ratio for any
method, and the earlier first-batch gradient rule as the named option score=gradient."""

from __future__ import annotations

import random

import pytest
import torch

from flexlora import lora
from flexlora.client import backward_batch, batches, train_client
from flexlora.config import ConfigError, load_config
from flexlora.data.prompts import tokenize_for_training
from flexlora.data.synthetic import make_federation
from flexlora.methods.lora_a2 import ComponentSelection
from flexlora.server import FederatedServer
from flexlora.validation import check_update

LR = 0.05
BASE = [
    "model=tiny-llama",
    "method=lora_a2",
    "resources.profile=[T4, T1]",
    "resources.t1=2",
    "resources.t4=6",
    "federation.clients_per_round=2",
    "train.optimizer=sgd",
    f"train.lr={LR}",
    "train.max_grad_norm=1e9",
    "train.weight_decay=0",
    "lora.dropout=0",
    "data.cutoff_len=256",
    "train.batch_size=2",
]


@pytest.fixture(scope="module")
def tiny():
    from flexlora.models import TINY, default_target_modules, load_model

    model, tokenizer = load_model(TINY, "cpu")
    targets = default_target_modules(model)
    data = make_federation(num_clients=2, train_per_client=4, test_per_client=1, seed=0)
    return model, tokenizer, targets, lora.module_shapes(model, targets), data


def setup(tiny, overrides):
    model, tokenizer, targets, shapes, data = tiny
    cfg = load_config(overrides=[*BASE, *overrides])
    ids = [c.client_id for c in data.clients]
    return cfg, FederatedServer(cfg, ids, shapes), ids


def small_task(server, round_, ids):
    """The round's task of the T1 client (budget 2 components a module, global rank 6)."""
    return min(server.configure(round_, ids), key=lambda t: sum(t.module_ranks.values()))


def sgd_by_hand(tiny, cfg, task, start: dict, train: str, steps: int, lr: float, masks=None) -> dict:
    """The trained factor (A or B per module) after `steps` plain SGD steps at `lr` from the
    factors `start`, over the batches the client loop draws (the other factor frozen; gradients
    times `masks` if given)."""
    model, tokenizer, targets, _, data = tiny
    client = next(c for c in data.clients if c.client_id == task.client_id)
    features = [
        tokenize_for_training(ex, tokenizer, cfg.data.template, cfg.data.cutoff_len, cfg.data.train_on_inputs)
        for ex in client.train
    ]
    size = min(cfg.train.batch_size, len(features))
    index = 0 if train == "A" else 1
    net = lora.attach(model, {m: A.shape[0] for m, (A, _) in start.items()}, cfg.lora.alpha, 0.0, targets, start, seed=task.seed)
    try:
        weights = lora.lora_weights(net)
        for pair in weights.values():
            pair[1 - index].requires_grad_(False)
        optimizer = torch.optim.SGD([pair[index] for pair in weights.values()], lr=lr)
        net.train()
        for batch in batches(len(features), size, steps, random.Random(task.seed)):
            optimizer.zero_grad(set_to_none=True)
            backward_batch(net, features, batch, size, torch.device("cpu"), tokenizer.pad_token_id)
            for module, pair in weights.items():
                if masks is not None:
                    pair[index].grad.mul_(masks[module])
            optimizer.step()
        return {module: pair[index].detach().clone() for module, pair in weights.items()}
    finally:
        lora.detach(net).eval()


def top_components(scores: dict[str, torch.Tensor], budget: int) -> dict[str, set[int]]:
    ranked = sorted(((float(s[i]), m, i) for m, s in scores.items() for i in range(s.numel())), reverse=True)
    assert ranked[budget - 1][0] > ranked[budget][0] * (1 + 1e-4), "a near-tie at the budget's edge: pick another setup"
    chosen = {m: set() for m in scores}
    for _, m, i in ranked[:budget]:
        chosen[m].add(i)
    return chosen


def b_masks(selected: dict[str, set[int]], task) -> dict[str, torch.Tensor]:
    out = {}
    for module, (A, _) in task.factors.items():
        keep = torch.zeros(A.shape[0])
        keep[sorted(selected[module])] = 1.0
        out[module] = keep[None, :]
    return out


def sent(update, shapes, train: str) -> tuple[dict[str, set[int]], dict[str, torch.Tensor]]:
    """(components, change of the trained factor) per module, read back from the SparseDeltas."""
    components, changes = {}, {}
    for module, (m, n) in shapes.items():
        d = update.deltas[module]
        r = d.shape[0]
        full = torch.zeros(r, n + m).view(-1)
        full[d.indices] = d.values
        full = full.view(r, n + m)
        components[module] = set(torch.unique(d.indices // (n + m)).tolist())
        changes[module] = full[:, :n] if train == "A" else full[:, n:].T
    return components, changes


def test_b_trains_at_five_times_a_learning_rate_inside_a_client_step(tiny):
    """One local step, default arguments: in the B round the change sent is −5·lr·∂L/∂B (masked),
    in the A round −lr·∂L/∂A: η_B = 5·η_A with η_A = train.lr (Appendix B). Fails on the rule
    that trained both factors at train.lr."""
    model, tokenizer, targets, shapes, data = tiny
    cfg, server, ids = setup(tiny, ["train.steps=1"])
    for round_, train, lr in ((1, "B", 5 * LR), (2, "A", LR)):
        tasks = server.configure(round_, ids)
        updates = [
            train_client(model, tokenizer, c, t, cfg, targets) for t in tasks for c in data.clients if c.client_id == t.client_id
        ]
        task, u = min(zip(tasks, updates), key=lambda tu: sum(tu[0].module_ranks.values()))  # the T1 client
        assert check_update(u, task, shapes, cfg.lora.alpha) is None
        components, change = sent(u, shapes, train)
        index = 0 if train == "A" else 1
        # One SGD step at lr on every component; the sent components' change must be exactly it.
        free = sgd_by_hand(tiny, cfg, task, task.factors, train, 1, lr)
        for module in shapes:
            rows = sorted(components[module])
            expected = free[module] - task.factors[module][index]
            if train == "A":
                torch.testing.assert_close(change[module][rows], expected[rows], rtol=1e-5, atol=1e-8)
            else:
                torch.testing.assert_close(change[module][:, rows], expected[:, rows], rtol=1e-5, atol=1e-8)
        assert sum(len(c) for c in components.values()) == sum(task.module_ranks.values())
        assert max(float(change[m].abs().max()) for m in shapes) > 0
        server.round = round_
        server.aggregate(updates)


@pytest.fixture(scope="module")
def two_steps(tiny):
    """A B round of two local steps on the T1 client: the client's update, and by hand the trial
    pass's ΔB and the selections of Eq. 4 and of the first-batch gradient."""
    model, tokenizer, targets, shapes, data = tiny
    cfg, server, ids = setup(tiny, ["train.steps=2"])
    task = small_task(server, 1, ids)
    u = train_client(model, tokenizer, next(c for c in data.clients if c.client_id == task.client_id), task, cfg, targets)
    budget = sum(task.module_ranks.values())
    trial_end = sgd_by_hand(tiny, cfg, task, task.factors, "B", 2, 5 * LR)
    delta = {m: trial_end[m] - task.factors[m][1] for m in shapes}
    # Eq. 4 literally: the Frobenius norm of the rank-1 matrix ΔB[:, i] A[i, :].
    eq4 = {
        m: torch.tensor([torch.linalg.matrix_norm(torch.outer(delta[m][:, i], A[i]).double()).item() for i in range(A.shape[0])])
        for m, (A, _) in task.factors.items()
    }
    first = sgd_by_hand(tiny, cfg, task, task.factors, "B", 1, 1.0)  # B0 − ∂L/∂B on the first batch
    gradient = {
        m: torch.linalg.vector_norm((first[m] - task.factors[m][1]).double(), dim=0) * torch.linalg.vector_norm(A.double(), dim=1)
        for m, (A, _) in task.factors.items()
    }
    return cfg, task, u, top_components(eq4, budget), top_components(gradient, budget)


def test_the_components_are_those_eq4_scores_highest_on_the_trial_update(tiny, two_steps):
    """Fails on the first-batch gradient rule: here the two select different components."""
    shapes = tiny[3]
    cfg, task, u, by_eq4, by_gradient = two_steps
    assert by_eq4 != by_gradient  # the setup tells the two rules apart
    components, _ = sent(u, shapes, "B")
    assert components == by_eq4
    assert u.metrics["trial_steps"] == 2 and u.metrics["trial_time_s"] > 0


def test_training_after_the_trial_starts_from_the_global_factors(tiny, two_steps):
    """The sent change is masked SGD from the round's global B (Algorithm 2: B_k^(t;0) = B^(t)),
    not masked SGD continued from where the trial pass ended."""
    shapes = tiny[3]
    cfg, task, u, by_eq4, _ = two_steps
    masks = b_masks(by_eq4, task)
    _, change = sent(u, shapes, "B")
    from_global = sgd_by_hand(tiny, cfg, task, task.factors, "B", 2, 5 * LR, masks)
    trial_end = sgd_by_hand(tiny, cfg, task, task.factors, "B", 2, 5 * LR)
    continued = sgd_by_hand(tiny, cfg, task, {m: (A, trial_end[m]) for m, (A, _) in task.factors.items()}, "B", 2, 5 * LR, masks)
    for module, (_, B0) in task.factors.items():
        torch.testing.assert_close(change[module], from_global[module] - B0, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(
        torch.cat([change[m].flatten() for m in shapes]),
        torch.cat([(continued[m] - task.factors[m][1]).flatten() for m in shapes]),
        atol=1e-6,
    )


def test_score_gradient_is_the_earlier_rule_without_a_trial_pass(tiny, two_steps):
    """method_args score=gradient, lr_b_ratio=1: no trial pass, the components the first batch's
    gradient scores highest, B at train.lr."""
    model, tokenizer, targets, shapes, data = tiny
    _, _, _, _, by_gradient = two_steps
    cfg, server, ids = setup(tiny, ["train.steps=2", "method_args.score=gradient", "method_args.lr_b_ratio=1"])
    task = small_task(server, 1, ids)
    assert task.options["lora_a2"]["score"] == "gradient" and task.options["lora_a2"]["lr_b_ratio"] == 1
    u = train_client(model, tokenizer, next(c for c in data.clients if c.client_id == task.client_id), task, cfg, targets)
    components, change = sent(u, shapes, "B")
    assert components == by_gradient and "trial_steps" not in u.metrics
    expected = sgd_by_hand(tiny, cfg, task, task.factors, "B", 2, LR, b_masks(by_gradient, task))
    for module, (_, B0) in task.factors.items():
        torch.testing.assert_close(change[module], expected[module] - B0, rtol=1e-5, atol=1e-8)


def test_train_lr_b_ratio_for_any_method(tiny):
    """train.lr_b_ratio: B at ratio × lr, A at lr, in one SGD step of a FedIT client (an adapter
    whose A and B both train), checked against the gradients by hand."""
    model, tokenizer, targets, shapes, data = tiny
    cfg = load_config(overrides=[*BASE, "method=fedit", "train.steps=1", "train.lr_b_ratio=3"])
    ids = [c.client_id for c in data.clients]
    task = FederatedServer(cfg, ids, shapes).configure(1, ids)[0]
    gen = torch.Generator().manual_seed(0)  # a non-zero B, so that A has a gradient too
    task.factors = {m: (A, 0.1 * torch.randn(B.shape, generator=gen)) for m, (A, B) in task.factors.items()}
    u = train_client(model, tokenizer, next(c for c in data.clients if c.client_id == task.client_id), task, cfg, targets)
    step_a = sgd_by_hand(tiny, cfg, task, task.factors, "A", 1, LR)
    step_b = sgd_by_hand(tiny, cfg, task, task.factors, "B", 1, 3 * LR)
    for module, (A0, B0) in task.factors.items():
        A1, B1 = u.factors[module]
        torch.testing.assert_close(A1 - A0, step_a[module] - A0, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(B1 - B0, step_b[module] - B0, rtol=1e-5, atol=1e-8)
    with pytest.raises(ConfigError, match="lr_b_ratio"):
        load_config(overrides=["train.lr_b_ratio=0"])


def test_trial_length_and_options_are_checked():
    hook = ComponentSelection("B")
    assert hook.trial_steps(6, None) == 6  # train.steps: the whole local budget
    assert hook.trial_steps(12, 3) == 3 and hook.trial_steps(2, 3) == 2  # epochs: one epoch of it
    assert ComponentSelection("B", score="gradient").trial_steps(6, None) == 0
    assert ComponentSelection.parse({"train": "A", "lr_b_ratio": 5}).lr_b_ratio() == 5.0
    with pytest.raises(ValueError, match="lora_a2.score must be one of update, gradient"):
        ComponentSelection.parse({"train": "A", "score": "snip"})
    with pytest.raises(ValueError, match="lora_a2.lr_b_ratio must be a number"):
        ComponentSelection.parse({"train": "A", "lr_b_ratio": -1})
