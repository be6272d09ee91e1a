"""Client-level differential privacy (flexlora.privacy, docs/privacy.md): the clip bound on every
update the method aggregates, the noise's standard deviation, ε against dp-accounting and a
published figure, σ = 0 without clipping bit-identical to privacy off, ε in metrics.jsonl and
summary.json, the same run on Flower's simulation engine, and the config's one-line errors."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from small_federation import ALPHA, SHAPES, RecordingClients, make_server, trained

from flexlora.cli import main
from flexlora.config import ConfigError, PrivacyConfig, load_config
from flexlora.methods import FedIT, HetLoRA
from flexlora.methods.base import Accumulator, ClientUpdate
from flexlora.methods.flexlora import FlexLoRA, FlexLoRAAccumulator, dense_delta
from flexlora.privacy import accountant, dp
from flexlora.trackers import round_scalars

dp_accounting = pytest.importorskip("dp_accounting", reason="the privacy accountant: pip install 'flexlora[privacy]'")


def product(A, B, alpha=ALPHA):
    return (alpha / A.shape[0]) * (B.double() @ A.double())


def change(update_factors, start, space):
    """The change x − x₀ as one float64 vector: ΔW's (dense) or (A, s·B)'s."""
    parts = []
    for module, (A, B) in update_factors.items():
        A0, B0 = start[module]
        if space == "delta":
            parts.append((product(A, B) - product(A0, B0)).flatten())
        else:
            s = ALPHA / A.shape[0]
            parts += [(A.double() - A0.double()).flatten(), s * (B.double() - B0.double()).flatten()]
    return torch.cat(parts)


def random_factors(gen, ranks, scale=1.0):
    return {
        module: (scale * torch.randn(ranks[module], n, generator=gen), scale * torch.randn(m, ranks[module], generator=gen))
        for module, (m, n) in SHAPES.items()
    }


def test_the_change_norm_is_the_dense_norm_without_forming_it():
    gen = torch.Generator().manual_seed(0)
    sent, start = random_factors(gen, {m: 3 for m in SHAPES}), random_factors(gen, {m: 5 for m in SHAPES})
    assert dp.change_norm(sent, start, ALPHA, "delta") == pytest.approx(float(change(sent, start, "delta").norm()), rel=1e-6)
    same_rank = random_factors(gen, {m: 3 for m in SHAPES})
    assert dp.change_norm(sent, same_rank, ALPHA, "factors") == pytest.approx(
        float(change(sent, same_rank, "factors").norm()), rel=1e-6
    )


def dp_server(method: str, **privacy):
    server = make_server(method)
    server.cfg.privacy = PrivacyConfig(enabled=True, **privacy)
    server.privacy = dp.ClientLevelDP.from_config(server.cfg)
    return server


def record_accumulator(server, monkeypatch) -> list:
    """What the server folds into the method's accumulator: (update, weight) pairs."""
    seen, make = [], server.method.accumulator

    def recording(state):
        accumulator = make(state)
        add = accumulator.add
        accumulator.add = lambda update, weight: (seen.append((update, weight)), add(update, weight))[-1]
        return accumulator

    monkeypatch.setattr(server.method, "accumulator", recording)
    return seen


class FrozenAClients(RecordingClients):
    """RecordingClients that send back the A they were handed (FFA-LoRA's frozen A)."""

    def train(self, tasks):
        self.seen.clear()
        for task in tasks:
            update = trained(task)
            factors = {m: (task.factors[m][0], B) for m, (_, B) in update.factors.items()}
            self.seen.append(ClientUpdate(update.client_id, update.num_examples, ALPHA, factors))
            yield self.seen[-1]


@pytest.mark.parametrize(("method", "bound"), [("flexlora", 1.2), ("fedit", 2.6), ("hetlora", 2.1), ("ffa", 2.1)])
def test_the_clip_bound_holds_on_every_update_the_method_aggregates(method, bound, monkeypatch):
    server = dp_server(method, clipping_norm=bound)
    space = server.method.privacy_space
    seen, clients = record_accumulator(server, monkeypatch), FrozenAClients() if method == "ffa" else RecordingClients()
    clipped = kept = 0
    for round_ in (1, 2):
        previous = server.state
        seen.clear()
        outcome = server.run_round(round_, clients)
        sent = {u.client_id: u for u in clients.seen}
        assert len(seen) == len(sent) == 5
        for folded, weight in seen:
            original = sent[folded.client_id]
            start = server.method.client_factors(previous, {m: original.rank(m) for m in SHAPES}, ALPHA)
            before, after = change(original.factors, start, space), change(folded.factors, start, space)
            assert float(after.norm()) <= bound and weight == 1.0  # equal weights by default
            assert outcome.privacy["update_norms"][folded.client_id] == pytest.approx(float(before.norm()), rel=1e-6)
            if before.norm() > bound:  # scaled onto the bound, its direction kept
                clipped += 1
                torch.testing.assert_close(after, before * (bound * (1 - dp.MARGIN) / before.norm()), rtol=1e-5, atol=1e-7)
            else:  # within the bound: the update as sent
                kept += 1
                assert folded is original
        assert sorted(outcome.privacy["clipped"]) == sorted(c for c, n in outcome.privacy["update_norms"].items() if n > bound)
        assert outcome.weights == pytest.approx({cid: 0.2 for cid in sent})
    assert clipped and kept  # the bound was chosen to cut some updates and not others


def test_client_side_clipping_keeps_the_rank_and_the_bound():
    gen = torch.Generator().manual_seed(1)
    start = random_factors(gen, {m: 4 for m in SHAPES})
    sent = {
        m: (A + 0.3 * torch.randn(A.shape, generator=gen), B + 0.3 * torch.randn(B.shape, generator=gen))
        for m, (A, B) in start.items()
    }
    for space in dp.SPACES:
        full = float(change(sent, start, space).norm())
        clipped = dp.clip_on_client(sent, start, ALPHA, {"norm": full / 3, "space": space})
        assert {m: (A.shape, B.shape) for m, (A, B) in clipped.items()} == {m: (A.shape, B.shape) for m, (A, B) in sent.items()}
        assert float(change(clipped, start, space).norm()) == pytest.approx(full / 3 * (1 - dp.MARGIN), rel=1e-5)
        # Moved back along the line to the start: one t for every entry of every module.
        A, B = sent["l0.q_proj"]
        t = float((clipped["l0.q_proj"][0] - start["l0.q_proj"][0]).flatten()[0] / (A - start["l0.q_proj"][0]).flatten()[0])
        assert 0 < t < 1
        for module, (A, B) in sent.items():
            A0, B0 = start[module]
            torch.testing.assert_close(clipped[module][0], A0 + t * (A - A0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(clipped[module][1], B0 + t * (B - B0), rtol=1e-5, atol=1e-6)
        if space == "factors":  # scaling the change is moving back along the line
            assert t == pytest.approx(1 / 3 * (1 - dp.MARGIN), rel=1e-5)
        assert dp.clip_on_client(sent, start, ALPHA, {"norm": 2 * full, "space": space}) is sent


def test_a_pruned_clients_start_is_what_the_server_hands_its_new_rank():
    server = make_server("hetlora")
    server.run_round(1, RecordingClients())
    handed = server.method.client_factors(server.state, {m: 6 for m in SHAPES}, ALPHA)
    pruned = {m: (A[:4], B[:, :4] * (4 / 6)) for m, (A, B) in handed.items()}  # HetLoRA's prune_factors
    for module, (A, B) in dp.start_at_ranks(handed, pruned).items():
        A_server, B_server = server.method.client_factors(server.state, {m: 4 for m in SHAPES}, ALPHA)[module]
        torch.testing.assert_close(A, A_server)
        torch.testing.assert_close(B, B_server)


def test_clients_asked_to_clip_send_updates_the_server_leaves_as_sent(monkeypatch):
    server = dp_server("flexlora", clipping_norm=0.5, clipping="client")
    seen = record_accumulator(server, monkeypatch)

    class ClippingClients:
        def train(self, tasks):
            for task in tasks:
                assert task.options[dp.CLIP_OPTION] == {"norm": 0.5, "space": "delta"}
                update = trained(task)
                factors = dp.clip_on_client(update.factors, task.factors, ALPHA, task.options[dp.CLIP_OPTION])
                yield ClientUpdate(update.client_id, update.num_examples, ALPHA, factors)

    outcome = server.run_round(1, ClippingClients())
    assert len(seen) == 5 and outcome.privacy["clipped"] == []
    assert all(0.5 * (1 - 2e-5) < norm <= 0.5 for norm in outcome.privacy["update_norms"].values())


def noised_pairs(make, updates, privacy, round_=1):
    """The states of one accumulator without and with the round's noise."""
    clean, noisy = make(), make()
    for update in updates:
        for accumulator in (clean, noisy):
            accumulator.add(update, privacy.weight(update.num_examples))
    privacy.add_noise(noisy, round_)
    return clean.result(), noisy.result()


def updates_of(ranks, shape, sizes, seed=2):
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    return [
        ClientUpdate(
            f"c{i}", size, ALPHA, {"w": (torch.randn(r, n, generator=gen) * 0.1, torch.randn(m, r, generator=gen) * 0.1)}
        )
        for i, (r, size) in enumerate(zip(ranks, sizes))
    ]


def test_the_noise_std_is_sigma_c_over_the_denominator_in_the_delta_space():
    # R = 150 = min(m, n): FlexLoRA keeps the whole (noisy) spectrum, so ΔW shows all of the noise.
    updates = updates_of([50, 50, 50], (200, 150), [30, 50, 80])
    equal = dp.ClientLevelDP(clipping_norm=0.5, noise_multiplier=2.0, seed=7)
    capped = dp.ClientLevelDP(0.5, 2.0, weighting="capped", max_examples=60, seed=7)

    def make():
        return FlexLoRAAccumulator(FlexLoRA(device=None), None)

    for privacy, denominator in ((equal, 3.0), (capped, (30 + 50 + 60) / 60)):
        clean, noisy = noised_pairs(make, updates, privacy)
        noise = dense_delta(noisy, "w") - dense_delta(clean, "w")
        assert float(noise.std()) == pytest.approx(2.0 * 0.5 / denominator, rel=0.03)
        assert abs(float(noise.mean())) < 0.03 * 2.0 * 0.5 / denominator
    # Seeded by (run seed, round, module): the same noise again, another in another round.
    noisy = [noised_pairs(make, updates, equal, round_)[1]["w.S"] for round_ in (1, 1, 2)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.allclose(noisy[0], noisy[2])


@pytest.mark.parametrize(("method", "ranks", "b_scaled"), [(FedIT(), [40, 40, 40], False), (HetLoRA(), [10, 40, 25], True)])
def test_the_noise_std_is_sigma_c_over_the_denominator_in_the_factors_space(method, ranks, b_scaled):
    updates = updates_of(ranks, (120, 100), [5, 9, 20])
    privacy = dp.ClientLevelDP(clipping_norm=0.5, noise_multiplier=2.0, seed=3)
    clean, noisy = noised_pairs(lambda: Accumulator(method, None), updates, privacy)
    expected = 2.0 * 0.5 / 3  # equal weights: σ·C / K, on every padded row and column
    assert float((noisy["w.A"] - clean["w.A"]).std()) == pytest.approx(expected, rel=0.03)
    s = ALPHA / 40  # the carrier's scale: FedIT's state holds B, so the noise of s·B is divided by s there
    assert float((noisy["w.B"] - clean["w.B"]).std()) == pytest.approx(expected if b_scaled else expected / s, rel=0.03)
    assert float((noisy["w.A"] - clean["w.A"])[30:].std()) == pytest.approx(expected, rel=0.06)  # rows only c1 has


def test_epsilon_is_the_accountants_and_matches_published_figures():
    # Our event, composed by hand: fixed-size sampling, replace-one, noise multiplier σ/2.
    direct = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(300, 10, dp_accounting.GaussianDpEvent(0.6)), 40)
    assert accountant.epsilon(1.2, 10, 300, 40, 1e-5) == direct.get_epsilon(1e-5)
    # Every client every round (q = 1): T Gaussian releases of std σC against a replace-one
    # sensitivity 2C are one Gaussian of μ = 2√T/σ; σ/2 = 4.530877117·√T is (1, 1e-6)-DP
    # exactly (the analytic Gaussian mechanism, Balle & Wang 2018: dp-accounting's own test).
    for rounds in (1, 4):
        sigma = 2 * 4.530877117 * math.sqrt(rounds)
        assert accountant.epsilon(sigma, 20, 20, rounds, 1e-6) == pytest.approx(1.0, abs=1e-5)
    # Abadi et al. (CCS 2016), Poisson sampling q = 0.01, σ = 4, T = 10,000, δ = 1e-5: ε ≈ 1.26 by
    # their moments accountant; RDP's conversion is tighter, never looser.
    assert 0.9 < accountant.epsilon(4.0, 1, 100, 10_000, 1e-5, sampling="poisson") <= 1.26
    # The fixed-size, replace-one account costs more than the Poisson one at the same σ and q.
    assert accountant.epsilon(4.0, 1, 100, 100, 1e-5) > accountant.epsilon(4.0, 1, 100, 100, 1e-5, sampling="poisson")
    assert accountant.epsilon(0.0, 3, 10, 5, 1e-5) == math.inf and accountant.epsilon(1.0, 3, 10, 0, 1e-5) == 0.0
    assert accountant.default_delta(100) == pytest.approx(100**-1.1)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_times(value):
    """A record without what a clock measured (time, clock, *_s, seconds), at any depth."""
    if isinstance(value, dict):
        return {
            k: _without_times(v) for k, v in value.items() if not (k in ("time", "clock") or k.endswith("_s") or k == "seconds")
        }
    return value


def test_sigma_zero_without_clipping_is_bit_identical_to_privacy_off(tmp_path, tiny_overrides):
    base = [o for o in tiny_overrides if not o.startswith("output.name")]
    assert main(["run", *base, "output.name=dp-off"]) == 0
    # capped at more than any n_k: the weights are n_k, as without privacy
    on = ["privacy.enabled=true", "privacy.weighting=capped", "privacy.max_examples=1000"]
    assert main(["run", *base, *on, "output.name=dp-on"]) == 0
    off_dir, on_dir = tmp_path / "runs" / "dp-off", tmp_path / "runs" / "dp-on"
    a, b = (
        load_file(off_dir / "adapter" / "adapter_model.safetensors"),
        load_file(on_dir / "adapter" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for ra, rb in zip(_records(off_dir), _records(on_dir), strict=True):
        privacy = rb.pop("privacy", None)
        assert (privacy is None) == (rb["round"] == 0)
        assert privacy is None or (privacy["epsilon"] is None and privacy["update_norms"] == {})  # no bound: ε infinite
        assert _without_times(ra) == _without_times(rb)
    assert json.loads((on_dir / "summary.json").read_text())["privacy"]["epsilon"] is None
    assert json.loads((off_dir / "summary.json").read_text())["privacy"] is None


DP_RUN = ["privacy.enabled=true", "privacy.clipping_norm=0.05", "privacy.noise_multiplier=0.8", "privacy.clipping=client"]


def _check_dp_run(run_dir, cfg):
    records = _records(run_dir)[1:]
    n, k = json.loads((run_dir / "data.json").read_text())["training_clients"], cfg.federation.clients_per_round
    for record in records:
        privacy = record["privacy"]
        expected = accountant.epsilon(0.8, k, n, record["round"], accountant.default_delta(n))
        assert privacy["epsilon"] == pytest.approx(expected) and privacy["delta"] == pytest.approx(n**-1.1)
        assert round_scalars(record)["privacy/epsilon"] == pytest.approx(expected)  # what the trackers get
        assert max(privacy["update_norms"].values()) <= 0.05  # clipped by the clients themselves
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(records[-1]["privacy"]["epsilon"]) and "final" in summary
    return records


def test_a_private_run_writes_epsilon_and_runs_the_same_on_flower(tmp_path, tiny_overrides):
    base = [o for o in tiny_overrides if not o.startswith("output.name")]
    cfg = load_config(overrides=[*base, *DP_RUN])
    assert main(["run", *base, *DP_RUN, "output.name=local"]) == 0
    local = _check_dp_run(tmp_path / "runs" / "local", cfg)
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Flower's simulation engine needs Ray: pip install 'flexlora[simulation]'")
    assert main(["run", "--engine", "flower", *base, *DP_RUN, "output.name=flower"]) == 0
    flower = _check_dp_run(tmp_path / "runs" / "flower", cfg)
    for a, b in zip(local, flower, strict=True):  # the server's noise and the clients' clipping, on both engines
        assert b["privacy"]["epsilon"] == a["privacy"]["epsilon"]
        assert b["eval"]["eval_loss"] == pytest.approx(a["eval"]["eval_loss"], rel=1e-5)
    ga = load_file(tmp_path / "runs" / "local" / "adapter" / "adapter_model.safetensors")
    gb = load_file(tmp_path / "runs" / "flower" / "adapter" / "adapter_model.safetensors")
    for key in ga:
        torch.testing.assert_close(gb[key], ga[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.enabled=true", "method=flora"], "privacy: method flora cannot run under client-level DP: not implemented"),
        (["privacy.enabled=true", "method=hetlora", "method_args.weighting=sparsity"], "sparsity weights depend on each update"),
        (["privacy.enabled=true", "method=hetlora", "method_args.prune_threshold=0.1"], "prune their ranks from their own"),
        (["privacy.enabled=true", "privacy.noise_multiplier=1"], "privacy.noise_multiplier: noise needs privacy.clipping_norm"),
        (["privacy.noise_multiplier=1", "privacy.clipping_norm=1"], "but privacy.enabled is false"),
        (["privacy.enabled=true", "privacy.weighting=capped"], "privacy.max_examples: set it with privacy.weighting=capped"),
        (["privacy.enabled=true", "federation.max_weight_share=0.5"], "federation.max_weight_share: privacy.weighting sets"),
        (["privacy.enabled=true", "privacy.clipping=client"], "privacy.clipping=client needs privacy.clipping_norm"),
    ],
)
def test_a_privacy_setting_that_cannot_hold_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["model=tiny-llama", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_without_the_extra_privacy_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dp_accounting" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'flexlora\[privacy\]'"):
        load_config(overrides=["model=tiny-llama", "privacy.enabled=true"])
