"""How much of the DP noise survives FlexLoRA's truncation (docs/privacy.md, "What privacy costs,
measured"): the per-kind energy shares the round's privacy record carries, checked against the
same quantities computed by hand from full SVDs, against the r(m + n − r)/(mn) fraction of an
isotropic noise that a rank-r truncation keeps around a strong low-rank signal, and absent at σ = 0."""

from __future__ import annotations

import pytest
import torch
from small_federation import RecordingClients

from flexlora.methods.base import ClientUpdate
from flexlora.methods.flexlora import FlexLoRA, FlexLoRAAccumulator
from flexlora.privacy import dp

pytest.importorskip("dp_accounting", reason="the privacy accountant: pip install 'flexlora[privacy]'")
from test_privacy_dp import dp_server  # noqa: E402 (needs dp_accounting too)

ALPHA = 16.0
# One attention and one MLP module, so that the record pools per kind.
SHAPES = {"l0.self_attn.q_proj": (120, 90), "l0.mlp.down_proj": (80, 150)}
RANK = 2  # each of the two clients: K = 4 kept per module


def low_rank_updates(signal: float) -> list[ClientUpdate]:
    """Two clients whose ΔW are rank 2 with singular values about `signal`."""
    gen = torch.Generator().manual_seed(5)
    updates = []
    for i in range(2):
        factors = {}
        for module, (m, n) in SHAPES.items():
            A = torch.linalg.qr(torch.randn(n, RANK, generator=gen, dtype=torch.float64))[0].T.float()
            B = torch.linalg.qr(torch.randn(m, RANK, generator=gen, dtype=torch.float64))[0].float()
            factors[module] = (A, B * (signal * RANK / ALPHA))
        updates.append(ClientUpdate(f"c{i}", 10, ALPHA, factors))
    return updates


def truncate(x: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def noisy_accumulator(privacy: dp.ClientLevelDP, updates: list[ClientUpdate]) -> FlexLoRAAccumulator:
    accumulator = FlexLoRAAccumulator(FlexLoRA(device=None), None)
    for update in updates:
        accumulator.add(update, privacy.weight(update.num_examples))
    privacy.add_noise(accumulator, 1)
    accumulator.result()
    return accumulator


def test_the_shares_are_the_energies_of_the_noise_before_and_after_truncation_by_hand():
    privacy = dp.ClientLevelDP(clipping_norm=1.0, noise_multiplier=0.05, seed=3)
    updates = low_rank_updates(signal=1.0)
    shares = dp.noise_energy_shares(noisy_accumulator(privacy, updates).noise_energies())
    sums: dict[str, list[float]] = {}
    for module, (m, n) in SHAPES.items():
        clean = sum((ALPHA / RANK) * (u.factors[module][1].double() @ u.factors[module][0].double()) for u in updates) / 2
        noise = dp.gaussian(3, 1, module, (m, n), privacy.noise_std).float().double() / 2  # the float32 sum's noise
        K = 2 * RANK
        kept = truncate(clean + noise, K)
        energies = [
            noise.square().sum(),
            (clean + noise).square().sum(),
            (kept - truncate(clean, K)).square().sum(),
            kept.square().sum(),
        ]
        for group in ("attention" if "attn" in module else "mlp", "all"):
            sums[group] = [a + float(b) for a, b in zip(sums.get(group, [0.0] * 4), energies)]
    assert set(shares) == {"attention", "mlp", "all"}
    for group, (noise, noisy, kept_noise, kept) in sums.items():
        assert shares[group]["share_before"] == pytest.approx(noise / noisy, rel=1e-4)
        assert shares[group]["share_after"] == pytest.approx(kept_noise / kept, rel=1e-3)
        assert shares[group]["retained"] == pytest.approx(kept_noise / noise, rel=1e-3)


def test_a_low_rank_truncation_keeps_about_r_m_plus_n_over_mn_of_isotropic_noise():
    # Signal singular values about 2 (two clients of 4, averaged) against a noise spectrum edge
    # of about σC/2·(√m + √n) ≈ 0.5:
    # the noise is well below the signal, so T_K keeps its projection on the signal's row and
    # column spaces, K(m + n − K) of its mn dimensions.
    privacy = dp.ClientLevelDP(clipping_norm=1.0, noise_multiplier=0.05, seed=3)
    energies = noisy_accumulator(privacy, low_rank_updates(signal=4.0)).noise_energies()
    shares = dp.noise_energy_shares(energies)
    K = 2 * RANK
    for module, (m, n) in SHAPES.items():
        group = shares["attention" if "attn" in module else "mlp"]
        expected = K * (m + n - K) / (m * n)  # 0.08 (attention), 0.08 (mlp)
        assert group["retained"] == pytest.approx(expected, rel=0.25)
        # The noise's share of what is kept is several times smaller than of the noisy sum.
        assert group["share_after"] < group["share_before"] / 5


def test_without_noise_nothing_is_recorded():
    updates = low_rank_updates(signal=1.0)
    assert noisy_accumulator(dp.ClientLevelDP(clipping_norm=1.0, noise_multiplier=0.0), updates).noise_energies() == {}
    server = dp_server("flexlora", clipping_norm=0.5)  # σ = 0: clipped, no noise
    assert "noise_energy" not in server.run_round(1, RecordingClients()).privacy


def test_a_noisy_round_records_the_shares_per_kind_and_only_for_flexlora():
    server = dp_server("flexlora", clipping_norm=0.5, noise_multiplier=1.0)
    shares = server.run_round(1, RecordingClients()).privacy["noise_energy"]
    assert set(shares) == {"attention", "mlp", "all"}  # small_federation: q_proj and down_proj
    # σ = 1 on 12×10 and 10×16 modules: the noise dominates (a share can pass 1 when the noise
    # happens to point against ΔW); K = 6 of 10 ranks kept, so most but not all of it survives.
    assert all(0.5 < s["retained"] < 1 and s["share_before"] > 0.9 for s in shares.values())
    fedit = dp_server("fedit", clipping_norm=0.5, noise_multiplier=1.0)  # no truncation to measure
    assert "noise_energy" not in fedit.run_round(1, RecordingClients()).privacy
