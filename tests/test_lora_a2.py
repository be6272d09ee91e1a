"""LoRA-A² (methods/lora_a2.py): alternating freeze of one global adapter, each client training
and uploading only the components that score highest within its budget; the server adds the
data-weighted average of the changes. Checked against the rule written out here by hand, and
against the plausible wrong rules (unsent components averaged as zeros; both factors trained).
The paper's score, learning rates and trial pass inside a real client step: test_lora_a2_paper.py."""

from __future__ import annotations

import pytest
import torch

from flexlora.config import load_config
from flexlora.methods import METHODS, make_method, parse_client_options
from flexlora.methods.base import ClientUpdate, SparseDelta
from flexlora.methods.lora_a2 import (
    ComponentSelection,
    LoRAA2,
    component_delta,
    component_scores,
    select_components,
)
from flexlora.protocol import ClientTask
from flexlora.server import FederatedServer
from flexlora.validation import check_update

F64 = torch.float64
ALPHA = 16.0
SHAPES = {"l0.q_proj": (6, 5), "l0.up_proj": (7, 5)}  # (m, n)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.py


def method(rank=4, **kw) -> LoRAA2:
    return LoRAA2(rank=rank, **kw)


def update(cid, n_ex, changes: dict, train: str) -> ClientUpdate:
    """changes: module -> {component j: change of the trained factor's component j (a vector)}."""
    deltas = {}
    for module, (m, n) in SHAPES.items():
        r = 4
        full = torch.zeros(r, n) if train == "A" else torch.zeros(m, r)
        for j, v in changes.get(module, {}).items():
            if train == "A":
                full[j] = v
            else:
                full[:, j] = v
        deltas[module] = component_delta(full, sorted(changes.get(module, {})), train, (m, n))
    return ClientUpdate(cid, n_ex, ALPHA, {}, deltas=deltas)


def test_aggregate_by_hand_exact_and_not_the_wrong_rules():
    meth = method()
    state = meth.init_state(SHAPES)
    module, (m, _n) = "l0.q_proj", SHAPES["l0.q_proj"]
    s = ALPHA / 4
    # Round 1 trains B. Client a (n=1) changes component 0 by 1s; client b (n=3) components 0, 2.
    ua = update("a", 1, {module: {0: torch.ones(m)}}, "B")
    ub = update("b", 3, {module: {0: 2 * torch.ones(m), 2: torch.full((m,), -4.0)}}, "B")
    new = meth.aggregate([ua, ub], state)
    B0, A0 = state[f"{module}.B"], state[f"{module}.A"]
    # By hand: column 0 moves by s·(¼·1 + ¾·2) = 1.75 s; column 2 by s·(¾·(−4)) = −3 s (client a
    # did not send it: it counts as unchanged, with its weight ¼); the rest stays; A is untouched.
    expected = B0.clone()
    expected[:, 0] += s * 1.75
    expected[:, 2] += s * -3.0
    torch.testing.assert_close(new[f"{module}.B"], expected)
    torch.testing.assert_close(new[f"{module}.A"], A0)
    assert torch.equal(new["l0.up_proj.B"], state["l0.up_proj.B"])  # nobody sent anything there
    # Exact: the global ΔW is the weighted average of the clients' own ΔW_k = s B_k A.
    Bk = {"a": B0.clone(), "b": B0.clone()}
    Bk["a"][:, 0] += s * 1
    Bk["b"][:, 0] += s * 2
    Bk["b"][:, 2] += s * -4
    exact = 0.25 * Bk["a"] @ A0 + 0.75 * Bk["b"] @ A0
    torch.testing.assert_close(new[f"{module}.B"] @ new[f"{module}.A"], exact)
    # Wrong rule 1: average each component only over the clients that sent it (renormalised):
    # column 2 would move by the full −4 s, and ΔW would no longer be the clients' average.
    renormalised = B0.clone()
    renormalised[:, 0] += s * 1.75
    renormalised[:, 2] += s * -4.0
    assert not torch.allclose(new[f"{module}.B"], renormalised)
    # Wrong rule 2: a component a client did not send averaged as zero over all clients.
    zeros = torch.zeros_like(B0)
    zeros[:, 0] = 0.25 * Bk["a"][:, 0] + 0.75 * Bk["b"][:, 0]
    zeros[:, 2] = 0.75 * Bk["b"][:, 2]
    state_b = dict(state, **{f"{module}.B": B0 + 1.0})  # a global B that is not zero
    new_b = meth.aggregate([ua, ub], state_b)
    assert torch.allclose(new_b[f"{module}.B"][:, 1], B0[:, 1] + 1.0)  # unsent: kept, not zeroed
    assert not torch.allclose(new_b[f"{module}.B"], zeros + 0.0)
    # Wrong rule 3: both factors trained and averaged separately is not exact (discordance):
    A1, A2 = A0 + 0.3, A0 - 0.5
    assert not torch.allclose(
        (0.25 * Bk["a"] + 0.75 * Bk["b"]) @ (0.25 * A1 + 0.75 * A2), 0.25 * Bk["a"] @ A1 + 0.75 * Bk["b"] @ A2
    )


def test_a_round_updates_rows_of_A():
    meth = method()
    state = meth.init_state(SHAPES)
    module, (_m, n) = "l0.up_proj", SHAPES["l0.up_proj"]
    new = meth.aggregate(
        [update("a", 2, {module: {3: torch.arange(n, dtype=torch.float32)}}, "A"), update("b", 2, {}, "A")], state
    )
    expected = state[f"{module}.A"].clone()
    expected[3] += 0.5 * torch.arange(n, dtype=torch.float32)
    torch.testing.assert_close(new[f"{module}.A"], expected)
    torch.testing.assert_close(new[f"{module}.B"], state[f"{module}.B"])


def test_scores_are_the_change_of_delta_w_per_component_and_selection_is_model_wide():
    gen = torch.Generator().manual_seed(0)
    A, B, g = torch.randn(4, 5, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    scores = component_scores(A, B, g, "B")
    # Eq. 4, ‖ΔB[:, j] A[j, :]‖_F, with g a trial pass's ΔB (score "update") or a gradient ("gradient").
    for j in range(4):
        assert scores[j].item() == pytest.approx(torch.linalg.norm(torch.outer(g[:, j], A[j]).double()).item())
    gA = torch.randn(4, 5, generator=gen)
    scores_a = component_scores(A, B, gA, "A")
    assert scores_a[1].item() == pytest.approx(torch.linalg.norm(torch.outer(B[:, 1], gA[1]).double()).item())
    # Across the model: a budget of 1 + 1 may go to one module; per module it may not.
    s = {"x": torch.tensor([5.0, 4.0, 0.0]), "y": torch.tensor([1.0, 3.0, 0.5])}
    assert select_components(s, {"x": 1, "y": 1}, "model") == {"x": [0, 1], "y": []}
    assert select_components(s, {"x": 1, "y": 1}, "module") == {"x": [0], "y": [1]}
    assert select_components(s, {"x": 2, "y": 2}, "model") == {"x": [0, 1], "y": [0, 1]}


def test_round_one_start_is_shared_and_every_client_gets_the_global_rank():
    cfg = load_config(overrides=["method=lora_a2", "resources.profile=[T4, T1]", "resources.t1=2", "resources.t4=4"])
    server = FederatedServer(cfg, ["a", "b"], SHAPES)
    tasks = server.configure(1, ["a", "b"])
    assert tasks[0].module_ranks != tasks[1].module_ranks  # budgets 4 and 2
    for module in SHAPES:
        (A0, B0), (A1, B1) = tasks[0].factors[module], tasks[1].factors[module]
        assert A0.shape[0] == A1.shape[0] == 4  # the global rank, whatever the budget
        assert torch.equal(A0, A1) and torch.equal(B0, B1) and not B0.any()
    assert tasks[0].options["lora_a2"] == {"train": "B", "selection": "model", "score": "update", "lr_b_ratio": 5.0}
    assert server.configure(2, ["a"])[0].options["lora_a2"]["train"] == "A"


def test_streaming_equals_all_at_once():
    meth = method()
    state = meth.init_state(SHAPES)
    gen = torch.Generator().manual_seed(1)
    ups = [
        update(c, n, {mod: {j: torch.randn(m, generator=gen) for j in js} for mod, (m, _) in SHAPES.items()}, "B")
        for c, n, js in (("a", 3, [0, 1]), ("b", 5, [2]), ("c", 1, [1, 3]))
    ]
    acc = meth.accumulator(state)
    for u in ups:
        acc.add(u, u.num_examples)
    streamed, at_once = acc.result(), meth.aggregate(ups, state)
    for key in at_once:
        torch.testing.assert_close(streamed[key], at_once[key])


def test_checkpoint_and_resume(tmp_path):
    from flexlora.checkpoint import load_checkpoint, save_checkpoint

    cfg = load_config(overrides=["method=lora_a2", "resources.profile=[T4, T1]", "resources.t1=2", "resources.t4=4"])
    server = FederatedServer(cfg, ["a", "b"], SHAPES)
    gen = torch.Generator().manual_seed(2)
    server.round = 1
    server.aggregate(
        [
            update("a", 2, {"l0.q_proj": {1: torch.randn(6, generator=gen)}}, "B"),
            update("b", 1, {"l0.up_proj": {0: torch.randn(7, generator=gen)}}, "B"),
        ]
    )
    save_checkpoint(tmp_path, server, [], cfg.to_dict())
    resumed = FederatedServer(cfg, ["a", "b"], SHAPES)
    load_checkpoint(tmp_path).restore(resumed)
    for key in server.state:
        assert torch.equal(server.state[key], resumed.state[key])
    t1, t2 = server.configure(2, ["a"])[0], resumed.configure(2, ["a"])[0]
    assert t1.options == t2.options
    for module in SHAPES:
        assert all(torch.equal(x, y) for x, y in zip(t1.factors[module], t2.factors[module]))


def test_codec_round_trip():
    pytest.importorskip("flwr")
    from flexlora.engines.flower.codec import decode_update, encode_update

    u = update("a", 3, {"l0.q_proj": {0: torch.ones(6), 3: torch.arange(6.0)}}, "B")
    back = decode_update(encode_update(u, "float32"))
    assert back.factors == {} and set(back.deltas) == set(SHAPES)
    for module, d in u.deltas.items():
        assert torch.equal(back.deltas[module].indices, d.indices) and torch.equal(back.deltas[module].values, d.values)
        assert tuple(back.deltas[module].shape) == tuple(d.shape)
    meth = method()
    state = meth.init_state(SHAPES)
    assert all(torch.equal(a, b) for a, b in zip(meth.aggregate([back], state).values(), meth.aggregate([u], state).values()))


def task_for(train: str, budget: dict[str, int], selection: str = "model") -> ClientTask:
    meth = method(selection=selection)
    state = meth.init_state(SHAPES)
    return ClientTask(
        "a",
        1,
        "T1",
        budget,
        meth.client_factors(state, budget, ALPHA),
        0,
        options={"lora_a2": {"train": train, "selection": selection}},
    )


def test_validation_rejects_over_budget_and_frozen_factor_changes():
    budget = {"l0.q_proj": 1, "l0.up_proj": 1}  # two components in all
    task = task_for("B", budget)
    ok = update("a", 2, {"l0.q_proj": {0: torch.ones(6), 1: torch.ones(6)}}, "B")  # 2 in one module: allowed
    assert check_update(ok, task, SHAPES, ALPHA) is None
    over = update("a", 2, {"l0.q_proj": {0: torch.ones(6), 1: torch.ones(6)}, "l0.up_proj": {2: torch.ones(7)}}, "B")
    reason = check_update(over, task, SHAPES, ALPHA)
    assert reason is not None and "budget of 2" in reason and "\n" not in reason
    per_module = task_for("B", budget, "module")
    reason = check_update(ok, per_module, SHAPES, ALPHA)
    assert reason is not None and "above the budget of 1" in reason
    # A change of the frozen factor (A, in a B round) is rejected.
    sneaky = update("a", 2, {"l0.q_proj": {0: torch.ones(5)}}, "A")
    reason = check_update(sneaky, task, SHAPES, ALPHA)
    assert reason is not None and "A changed although the task froze it" in reason
    # Malformed deltas.
    bad = update("a", 2, {}, "B")
    d = bad.deltas["l0.q_proj"]
    bad.deltas["l0.q_proj"] = SparseDelta(torch.tensor([0, 0]), torch.ones(2), d.shape)
    assert "repeat" in check_update(bad, task, SHAPES, ALPHA)
    bad.deltas["l0.q_proj"] = SparseDelta(torch.tensor([5]), torch.tensor([float("nan")]), d.shape)
    assert "NaN" in check_update(bad, task, SHAPES, ALPHA)
    bad.deltas["l0.q_proj"] = SparseDelta(torch.tensor([5]), torch.ones(1), (3, 11))
    assert "differs from the components'" in check_update(bad, task, SHAPES, ALPHA)
    with_factors = ClientUpdate("a", 2, ALPHA, {mod: (torch.zeros(4, n), torch.zeros(m, 4)) for mod, (m, n) in SHAPES.items()})
    assert check_update(with_factors, task, SHAPES, ALPHA) == "empty update (no deltas)"  # factors are not what it asked


def test_options_and_arguments_are_checked():
    assert METHODS["lora_a2"] is LoRAA2
    with pytest.raises(ValueError, match="lora_a2.train must be A or B"):
        parse_client_options({"lora_a2": {"train": "C"}})
    with pytest.raises(ValueError, match="lora_a2.bogus is unknown"):
        parse_client_options({"lora_a2": {"train": "A", "bogus": 1}})
    assert isinstance(parse_client_options({"lora_a2": {"train": "A"}})[0], ComponentSelection)
    with pytest.raises(ValueError, match="selection must be one of"):
        make_method("lora_a2", selection="layer")
    with pytest.raises(ValueError, match="rank must be an integer"):
        make_method("lora_a2", rank=0)
    with pytest.raises(ValueError, match="no global rank"):
        LoRAA2().init_state(SHAPES)


def test_inside_training_only_selected_components_of_the_unfrozen_factor_move(monkeypatch):
    from flexlora import lora
    from flexlora.client import train_client
    from flexlora.data.synthetic import make_federation
    from flexlora.models import TINY, default_target_modules, load_model

    cfg = load_config(
        overrides=[
            "model=tiny-llama",
            "method=lora_a2",
            "resources.profile=[T4, T1]",
            "resources.t1=2",
            "resources.t4=6",
            "federation.clients_per_round=2",
            "train.steps=2",
            "train.batch_size=2",
            "data.cutoff_len=256",
            "train.weight_decay=0.1",
        ]
    )
    model, tokenizer = load_model(TINY, "cpu")
    targets = default_target_modules(model)
    shapes = lora.module_shapes(model, targets)
    data = make_federation(num_clients=2, train_per_client=4, test_per_client=1, seed=0)
    ids = [c.client_id for c in data.clients]
    server = FederatedServer(cfg, ids, shapes)
    seen = {}
    real_get_factors = lora.get_factors

    def spy(peft_model):  # inside training, just before the result is read
        seen[current] = {
            name: (
                layer.r["default"],
                layer.lora_A["default"].weight.requires_grad,
                layer.lora_B["default"].weight.requires_grad,
                layer.lora_A["default"].weight.detach().clone(),
                layer.lora_B["default"].weight.detach().clone(),
            )
            for name, layer in lora._lora_layers(peft_model)
        }
        return real_get_factors(peft_model)

    monkeypatch.setattr(lora, "get_factors", spy)
    for round_, train in ((1, "B"), (2, "A")):
        server.round = round_ - 1
        updates = []
        for task in server.configure(round_, ids):
            current = task.client_id
            client = next(c for c in data.clients if c.client_id == current)
            u = train_client(model, tokenizer, client, task, cfg, targets)
            budget = sum(task.module_ranks.values())
            assert u.factors == {} and u.metrics["lora_a2_budget"] == budget
            assert 0 < u.metrics["lora_a2_components"] <= budget
            touched = 0
            for name, (m, n) in shapes.items():
                r, a_grad, b_grad, A_live, B_live = seen[current][name]
                assert r == task.factors[name][0].shape[0] == min(6, m, n)  # the global rank, not the budget
                assert (a_grad, b_grad) == ((True, False) if train == "A" else (False, True))
                A0, B0 = task.factors[name]
                d = u.deltas[name]
                cols = d.indices % (n + m)
                sent = set(torch.unique(d.indices // (n + m)).tolist())
                if train == "B":  # the live adapter: A as sent, B moved in the uploaded columns only
                    assert torch.equal(A_live, A0) and bool((cols >= n).all())
                    moved = set(torch.nonzero((B_live != B0).any(dim=0)).flatten().tolist())
                else:
                    assert torch.equal(B_live, B0) and bool((cols < n).all())
                    moved = set(torch.nonzero((A_live != A0).any(dim=1)).flatten().tolist())
                assert moved <= sent, name  # (a selected component may happen not to move)
                touched += len(sent)
            assert touched == u.metrics["lora_a2_components"]
            assert check_update(u, task, shapes, cfg.lora.alpha) is None
            updates.append(u)
        # The T1 client (budget 2 per module) really trained fewer components than the T4 one.
        small, big = sorted(updates, key=lambda u: u.metrics["lora_a2_budget"])
        assert small.metrics["lora_a2_components"] < big.metrics["lora_a2_components"]
        before = dict(server.state)
        server.round = round_
        server.aggregate(updates)
        changed = "B" if train == "B" else "A"
        assert any(not torch.equal(server.state[k], before[k]) for k in before if k.endswith("." + changed))
        assert all(torch.equal(server.state[k], before[k]) for k in before if not k.endswith("." + changed))
    assert not any("lora" in n for n, _ in model.named_parameters())
