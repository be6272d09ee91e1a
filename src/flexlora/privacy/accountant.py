"""The (ε, δ) a run's client-level DP spends, from Google's dp-accounting (the extra
``privacy``), never by hand.

What the accountant is told, and why (docs/privacy.md says it for users):
- Sampling. The server samples a fixed number k of the N training clients each round, uniformly
  without replacement and independently across rounds (FederatedServer.sample), not Poisson.
  The matching event is ``SampledWithoutReplacementDpEvent(N, k, GaussianDpEvent(·))``, which
  dp-accounting accounts with RDP (Wang, Balle & Kasiviswanathan, AISTATS 2019, Thm. 27) under
  the replace-one relation: neighbouring federations have the same N clients, one of whose data
  differ. Its PLD accountant has no such event; Poisson accounting (PoissonSampledDpEvent,
  add-or-remove) would describe a sampler we do not run.
- Sensitivity. Under replace-one, one client's clipped change can go from x to x', ‖x − x'‖ ≤ 2C
  (times w_max), while the noise has standard deviation σ·C·w_max: the noise multiplier
  dp-accounting expects (noise std over the L2 sensitivity) is σ/2.
- Composition. Every round is one such event, whatever happened in it, so ε after T rounds is a
  function of (σ, k, N, T, δ) alone: nothing to checkpoint, the same after a resume.
"""

from __future__ import annotations

import functools
import math

from flexlora.extras import require

SAMPLINGS = ("fixed-size", "poisson")


def default_delta(num_clients: int) -> float:
    """δ = 1 / N^1.1 for N training clients: below 1/N, as (ε, δ)-DP asks of a meaningful δ."""
    return 1.0 / num_clients**1.1


@functools.lru_cache(maxsize=256)
def epsilon(
    noise_multiplier: float,
    sample_size: int,
    population: int,
    rounds: int,
    delta: float,
    sampling: str = "fixed-size",
) -> float:
    """ε at δ after `rounds` rounds, each sampling `sample_size` of `population` clients and
    adding Gaussian noise σ·C to a sum of updates clipped to C (inf at σ = 0; 0 after no round).

    sampling "fixed-size" (what the server does): without replacement, replace-one, noise
    multiplier σ/2 (module doc). "poisson": each client independently with probability
    sample_size / population, add-or-remove-one, noise multiplier σ: the DP-SGD convention,
    for comparison with published figures only (our server does not sample so)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"privacy: sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if not 0 < sample_size <= population:
        raise ValueError(f"privacy: need 0 < clients per round ({sample_size}) <= training clients ({population})")
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    require("dp_accounting", "privacy accounting")
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    relation = dp_accounting.NeighboringRelation
    if sampling == "fixed-size":
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            population, sample_size, dp_accounting.GaussianDpEvent(noise_multiplier / 2)
        )
        accountant = RdpAccountant(neighboring_relation=relation.REPLACE_ONE)
    else:
        event = dp_accounting.PoissonSampledDpEvent(sample_size / population, dp_accounting.GaussianDpEvent(noise_multiplier))
        accountant = RdpAccountant(neighboring_relation=relation.ADD_OR_REMOVE_ONE)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def privacy_record(dp, population: int, sample_size: int, rounds: int, delta: float | None) -> dict:
    """What metrics.jsonl (and so the trackers) and summary.json say of a run's privacy after
    `rounds` rounds: ε at δ and what it was computed from."""
    delta = default_delta(population) if delta is None else delta
    sigma = dp.noise_multiplier if dp.clipping_norm is not None else 0.0  # no clipping: no bound, ε = inf
    eps = epsilon(sigma, min(sample_size, population), population, rounds, delta)
    return {
        "epsilon": eps if math.isfinite(eps) else None,  # None: infinite (no noise or no clipping)
        "delta": delta,
        "rounds": rounds,
        "noise_multiplier": dp.noise_multiplier,
        "clipping_norm": dp.clipping_norm,
        "clipping": dp.clipping,
        "weighting": dp.weighting,
        "sample_rate": min(sample_size, population) / population,
        "accountant": "dp-accounting RDP, SampledWithoutReplacementDpEvent, replace-one, noise multiplier σ/2",
    }
