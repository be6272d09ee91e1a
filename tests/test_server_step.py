"""The server step's cost: FlexLoRA keeps ΔW's spectrum only up to the largest rank it is used
at (the server's rank bound), its energy as one scalar, and a round's time breakdown counts
the server's work (validation, aggregation, checkpoint)."""

from __future__ import annotations

import pytest
import torch

from flexlora.checkpoint import Checkpointer, _snapshot_of_format_1, load_checkpoint, save_checkpoint
from flexlora.config import ExperimentConfig, ResourcesConfig, validate
from flexlora.methods import FlexLoRA
from flexlora.methods.base import ClientUpdate
from flexlora.methods.flexlora import dense_delta
from flexlora.server import FederatedServer, run_rounds

SHAPES = {"attn": (24, 16), "mlp": (16, 40)}
ALPHA = 16.0


def updates(ranks: list[int], seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        factors = {m: (torch.randn(r, n, generator=g), torch.randn(m_, r, generator=g)) for m, (m_, n) in SHAPES.items()}
        out.append(ClientUpdate(f"c{i}", 5 + i, ALPHA, factors, {}))
    return out


@pytest.mark.parametrize("ranks", [[2, 3], [6, 8, 8]])  # Σr < min(m, n): factored; Σr >= min(m, n): dense
@pytest.mark.parametrize("bound", [1, 5, 8])
def test_a_bounded_state_is_the_top_of_the_exact_one(ranks, bound):
    ups = updates(ranks)
    exact = FlexLoRA().aggregate(ups)
    method = FlexLoRA()
    method.bound_ranks({m: bound for m in SHAPES})
    cheap = method.aggregate(ups)
    for module, (m, n) in SHAPES.items():
        K = min(sum(ranks), m, n, bound)
        assert cheap[f"{module}.S"].shape == (K,) and cheap[f"{module}.U"].shape == (m, K)
        torch.testing.assert_close(cheap[f"{module}.S"], exact[f"{module}.S"][:K], rtol=1e-5, atol=1e-5)
        # ‖ΔW‖²_F of the whole ΔW, not of the kept part
        full = float(dense_delta(exact, module).double().square().sum())
        assert float(cheap[f"{module}.E"]) == pytest.approx(full, rel=1e-5)
        assert float(exact[f"{module}.E"]) == pytest.approx(full, rel=1e-5)
    # What every client (rank <= bound) receives is the same, and so is the truncation report.
    client = {m: min(r, bound) for m, r in zip(SHAPES, (bound, max(1, bound - 1)))}
    got, want = method.client_factors(cheap, client, ALPHA), FlexLoRA().client_factors(exact, client, ALPHA)
    for module in SHAPES:
        sa, sb = got[module], want[module]
        torch.testing.assert_close(sa[1] @ sa[0], sb[1] @ sb[0], rtol=1e-4, atol=1e-4)
    report = {m: {1, bound} for m in SHAPES}
    cheap_report, exact_report = method.truncation(cheap, report), FlexLoRA().truncation(exact, report)
    for kind in exact_report:
        for r, row in exact_report[kind].items():
            for key, value in row.items():
                assert cheap_report[kind][r][key] == pytest.approx(value, rel=1e-5, abs=1e-6)


def test_a_server_optimizer_keeps_the_whole_state():
    """A server optimizer steps the whole dense ΔW: the server does not bound the method."""
    server = make_server(method_args={"server_opt": {"name": "fedavgm", "lr": 1.0, "momentum": 0.5}})
    assert not server.method.rank_bound
    noisy_round(server, 1, seed=1)
    noisy_round(server, 2, seed=2)
    assert server.state["attn.S"].shape == (1 + 2 + 2 + 3,) and server.server_step.moments  # Σr, not the bound 3


def test_the_server_asks_every_client_for_fedprox_after_the_method_options():
    server = make_server(method="hetlora", method_args={"fedprox_mu": 0.5})
    for task in server.configure(1, server.sample(1)):
        assert list(task.options) == [*server.method.client_options(server.state, 1, task.rank_type), "fedprox_mu"]
        assert task.options["fedprox_mu"] == 0.5
    assert make_server(method="hetlora").configure(1, ["c0"])[0].options.get("fedprox_mu") is None


def make_server(export_rank=None, method="flexlora", method_args=None) -> FederatedServer:
    cfg = ExperimentConfig(method=method, method_args=method_args or {})
    cfg.resources = ResourcesConfig(profile=["T1", "T2", "T3", "T4"], t1=1, t2=2, t3_attention=2, t3_mlp=3, t4=3)
    cfg.federation.rounds = 1
    cfg.federation.clients_per_round = 4
    cfg.eval.export_rank = export_rank
    validate(cfg)
    return FederatedServer(cfg, [f"c{i}" for i in range(4)], SHAPES)


@pytest.mark.parametrize("export_rank, bound", [(None, 3), (2, 3), (7, 7)])
def test_the_server_bounds_flexlora_by_the_largest_rank_it_is_used_at(export_rank, bound):
    server = make_server(export_rank)
    assert server.method.rank_bound == {m: min(bound, *SHAPES[m]) for m in SHAPES}
    tasks = server.configure(1, server.sample(1))
    server.complete_round(1, tasks, [ClientUpdate(t.client_id, 4, ALPHA, t.factors, {}) for t in tasks])
    for module in SHAPES:
        assert server.state[f"{module}.S"].shape[0] <= bound


def test_a_round_counts_tasks_validation_aggregation_and_checkpoint_as_server_time(tmp_path):
    server = make_server()

    class Runtime:
        def train(self, tasks):
            return [ClientUpdate(t.client_id, 4, ALPHA, t.factors, {}) for t in tasks]

    history = run_rounds(server, Runtime(), lambda s, r: {}, lambda rec: None, Checkpointer(tmp_path, server.cfg))
    t = history[-1]["time"]
    assert t["checkpoint_s"] > 0 and t["validation_s"] >= 0
    assert t["server_s"] == pytest.approx(t["configure_s"] + t["validation_s"] + t["aggregation_s"] + t["checkpoint_s"])
    assert t["server_share"] == pytest.approx(t["server_s"] / t["total_s"])
    parts = ("client_training_s", "configure_s", "validation_s", "aggregation_s", "checkpoint_s", "evaluation_s", "other_s")
    assert sum(t[p] for p in parts) == pytest.approx(t["total_s"])
    # What the checkpoint holds is what was logged (metrics.jsonl equals the checkpointed history).
    from flexlora.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "checkpoint").history[-1]["time"] == t


def noisy_round(server: FederatedServer, round_: int, seed: int) -> None:
    """One round of clients that change their starting factors a little."""
    g = torch.Generator().manual_seed(seed)
    tasks = server.configure(round_, server.sample(round_))
    results = [
        ClientUpdate(
            t.client_id,
            4 + i,
            ALPHA,
            {
                m: (A + 0.01 * torch.randn(A.shape, generator=g), B + 0.01 * torch.randn(B.shape, generator=g))
                for m, (A, B) in t.factors.items()
            },
            {},
        )
        for i, t in enumerate(tasks)
    ]
    assert not server.complete_round(round_, tasks, results).rejected


def test_server_optimizer_moments_survive_a_checkpoint(tmp_path):
    """The server step's moments are checkpointed beside the method's state: a resumed server
    takes the next step exactly as the uninterrupted one."""
    args = {"server_opt": {"name": "fedadam", "lr": 0.01}}
    server = make_server(method_args=args)
    for round_ in (1, 2):
        noisy_round(server, round_, seed=round_)
    save_checkpoint(tmp_path, server, [], server.cfg.to_dict())
    tensors, meta = load_checkpoint(tmp_path).tensors, load_checkpoint(tmp_path).meta
    assert meta["type"] == "ServerSnapshot" and any(k.startswith("server_opt/m/") for k in tensors)
    fresh = make_server(method_args=args)
    fresh.load_state_dict(tensors, meta)
    assert fresh.server_step.moments.keys() == server.server_step.moments.keys()
    noisy_round(server, 3, seed=3)
    noisy_round(fresh, 3, seed=3)
    assert all(torch.equal(fresh.state[k], server.state[k]) for k in server.state)


def test_a_checkpoint_of_format_1_is_still_read():
    """Format 1 kept the moments inside the global state and method extras under method/."""
    args = {"server_opt": {"name": "fedavgm", "momentum": 0.5}}
    server = make_server(method_args=args)
    noisy_round(server, 1, seed=1)
    noisy_round(server, 2, seed=2)
    old_tensors = {f"state/{k}": v for k, v in server.state.items()}
    old_tensors.update({f"state/server_opt.{k}": v for k, v in server.server_step.moments.items()})
    old_meta = {
        "round": 2,
        "method": "flexlora",
        "has_state": True,
        "client_types": server.client_types,
        "client_ranks": server.client_ranks,
        "declared_sizes": {},
    }
    fresh = make_server(method_args=args)
    fresh.load_state_dict(*_snapshot_of_format_1(old_tensors, old_meta))
    assert fresh.round == 2 and fresh.state.keys() == server.state.keys()
    assert all(torch.equal(fresh.server_step.moments[k], v) for k, v in server.server_step.moments.items())
