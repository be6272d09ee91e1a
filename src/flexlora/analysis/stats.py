"""Paired bootstrap intervals for a difference between two methods on the same test examples.

Two methods evaluated on the same held-out examples, under the same seeds (same sampled clients,
same rank draws), are compared example by example: per seed, the difference of their mean
scores; over seeds, the mean of those differences. Two 95% intervals come with it:

- examples only: resamples the test examples (the same resample for every seed, since the
  examples are shared). It measures how much the difference depends on which test examples
  happened to be drawn, for these seeds' training runs; training randomness is left out.
- seeds and examples (two-level): each resample also draws the seeds with replacement, so the
  interval covers both sources of noise. Seeds and examples are crossed (every seed is scored on
  the same examples), so one example resample serves every drawn seed, and method and baseline
  of a seed always share it (paired). This crossed ("pigeonhole") bootstrap errs on the wide
  side (Owen 2007, Ann. Appl. Stat. 1(1)); with one seed it equals the examples-only interval.

- seeds and categories (task-level): given the held-out task category of every example, each
  resample draws the seeds with replacement and then the categories with replacement, each
  drawn category bringing all its examples (a cluster bootstrap; one category resample serves
  every drawn seed, as above). The claim under test is about unseen tasks: this interval also
  asks whether another draw of held-out task categories would keep the difference. The mean
  over a resample weights every example alike (as the reported score does), so a category
  drawn twice counts twice.

A difference is "significant" when every interval the design supports excludes 0: the
two-level one and, when the examples come from at least two categories, the task-level one too
(the deciding interval is their union). Neither is always the wider: a cluster bootstrap over
many small categories can be narrower than the two-level interval, and a claim must survive
both resamplings. `decided_by` names the intervals. With few seeds these intervals are coarse (3 seeds have 10 distinct
resamples); the spread over seeds is reported beside them.

How many seeds a difference needs (`seeds_to_exclude_zero`, `seeds_for_power`): a t-based
calculation on the per-seed differences, taking the observed mean d and the observed standard
deviation s over seeds as if they were the truth. With n seeds the t interval of the mean,
d ± t(0.975, n−1)·s/√n, excludes 0 once √n·|d|/s > t(0.975, n−1): the smallest such n is the
number of seeds at which an effect of the observed size would exclude 0 (a repeat at that n
does so about half the time). For 80% power, √n·|d|/s ≥ t(0.975, n−1) + t(0.80, n−1) (the
usual approximation of the noncentral t by a shifted central t). Both count seeds only: the
test examples and held-out categories stay as they are, so they say nothing about how much of
a task-level interval more seeds would remove.

Metrics are those of flexlora.metrics: a mean over examples (Rouge-L) is resampled as a mean; a
ratio (the eval loss, per answer token) as a ratio (Σ loss / Σ tokens over the resampled examples).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

from flexlora.metrics import METRICS

# A task-level interval needs categories to resample: with one, the design supports none.
MIN_CATEGORIES = 2
SEEDS_AND_EXAMPLES = "seeds and examples"
SEEDS_AND_CATEGORIES = "seeds and categories"


@dataclass(frozen=True)
class PairedDifference:
    metric: str
    mean: float  # method − baseline, mean over seeds, on all the shared examples
    low: float  # 95% interval resampling seeds and examples (two-level); `significant` needs it to exclude 0
    high: float
    example_low: float  # 95% interval resampling the test examples only (seeds held fixed)
    example_high: float
    seed_sd: float  # standard deviation over seeds of the per-seed difference (0 with one seed)
    seeds: int
    examples: int
    per_seed: tuple[float, ...] = ()  # the difference in each seed, in the runs' order
    category_low: float = math.nan  # 95% interval resampling seeds, then held-out categories (task-level)
    category_high: float = math.nan
    categories: int = 0  # held-out categories of the shared examples (0: not known)

    @property
    def has_categories(self) -> bool:
        """Whether the design supports the task-level interval (at least MIN_CATEGORIES)."""
        return self.categories >= MIN_CATEGORIES

    @property
    def decided_by(self) -> str:
        """The intervals `significant` follows: every one the design supports."""
        return f"{SEEDS_AND_EXAMPLES} and {SEEDS_AND_CATEGORIES}" if self.has_categories else SEEDS_AND_EXAMPLES

    @property
    def deciding_interval(self) -> tuple[float, float]:
        """The union of the intervals `decided_by` names: it excludes 0 only when each does."""
        if self.has_categories:
            return min(self.low, self.category_low), max(self.high, self.category_high)
        return self.low, self.high

    @property
    def significant(self) -> bool:
        low, high = self.deciding_interval
        return not (low <= 0.0 <= high)

    @property
    def significant_seeds_examples(self) -> bool:
        return not (self.low <= 0.0 <= self.high)

    @property
    def significant_examples_only(self) -> bool:
        return not (self.example_low <= 0.0 <= self.example_high)

    @property
    def seeds_to_exclude_zero(self) -> int | None:
        """Seeds at which the observed mean, with the observed spread over seeds, would exclude 0
        (None: unknown with one seed, or never for a zero mean); see `seeds_needed`."""
        return seeds_needed(self.mean, self.seed_sd, self.seeds)

    @property
    def seeds_for_power(self) -> int | None:
        """Seeds for 80% power at the observed mean and spread; see `seeds_needed`."""
        return seeds_needed(self.mean, self.seed_sd, self.seeds, power=POWER)

    def format(self, digits: int = 4, examples_only: bool = True) -> str:
        """mean [two-level interval] sd ..., then the examples-only interval in parentheses, then
        the task-level interval where the design supports one; n.s. follows `decided_by`."""
        text = f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        if self.seeds > 1:
            text += f" sd {self.seed_sd:.{digits}f}"
            if examples_only:
                text += f" (examples only [{self.example_low:+.{digits}f}, {self.example_high:+.{digits}f}])"
        if self.has_categories:
            text += f" ({SEEDS_AND_CATEGORIES} [{self.category_low:+.{digits}f}, {self.category_high:+.{digits}f}])"
        return text + ("" if self.significant else " n.s.")


POWER = 0.8
MAX_SEEDS = 100_000  # a larger answer is reported as "more than this"


def t_quantile(p: float, df: int) -> float:
    """The p quantile (p > 0.5) of Student's t with `df` degrees of freedom: bisection on the
    exact finite series of P(|T| ≤ t) for integer df (Abramowitz & Stegun 26.7.3-4) up to 60,
    the Cornish-Fisher expansion in 1/df beyond (error below 1e-6 there)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    z = statistics.NormalDist().inv_cdf(p)
    if df > 60:
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
        return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4

    def central(t: float) -> float:  # P(|T| <= t)
        theta = math.atan(t / math.sqrt(df))
        c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
        if df % 2:  # odd: (2/π)(θ + sinθ cosθ (1 + 2/3 cos²θ + ...))
            for k in range(1, (df - 1) // 2):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
        for k in range(1, df // 2):  # even: sinθ (1 + 1/2 cos²θ + ...)
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total

    target, low, high = 2 * p - 1, 0.0, max(1.0, 2 * z)
    while central(high) < target:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if central(mid) < target else (low, mid)
    return (low + high) / 2


def seeds_needed(mean: float, sd: float, seeds: int, power: float | None = None) -> int | None:
    """The smallest n ≥ 2 with √n·|mean|/sd > t(0.975, n−1) (+ t(power, n−1) when `power` is
    given): the seeds at which a difference of this mean and this spread over seeds would have
    a 95% t interval excluding 0 (with that power). None with fewer than 2 seeds (no spread
    known) or a zero mean; MAX_SEEDS + 1 when more than MAX_SEEDS would be needed."""
    if seeds < 2 or mean == 0 or not math.isfinite(mean):
        return None
    if sd == 0:
        return 2

    def enough(n: int) -> bool:
        needed = t_quantile(0.975, n - 1) + (t_quantile(power, n - 1) if power else 0.0)
        return math.sqrt(n) * abs(mean) / sd > needed

    # t quantiles exceed the normal's, so the normal answer is a lower bound to start from.
    z = statistics.NormalDist().inv_cdf(0.975) + (statistics.NormalDist().inv_cdf(power) if power else 0.0)
    n = max(2, math.floor((z * sd / abs(mean)) ** 2))
    if n > MAX_SEEDS:
        return MAX_SEEDS + 1
    while not enough(n):
        n += 1
    return n


def _key(example: dict) -> tuple[str, int]:
    return str(example["client"]), int(example["index"])


def _arrays(runs: list[list[dict]], keys: list[tuple[str, int]], field: str) -> np.ndarray:
    out = np.empty((len(runs), len(keys)))
    for s, examples in enumerate(runs):
        by_key = {_key(e): e for e in examples}
        out[s] = [by_key[k][field] for k in keys]
    return out


def paired_difference(
    method_runs: list[list[dict]],
    baseline_runs: list[list[dict]],
    metric: str,
    *,
    categories: dict[str, str] | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """method_runs[s], baseline_runs[s]: the per-example records of seed s (dicts with client,
    index, the Rouge scores, loss and tokens; see evaluation.evaluate's "per_example").
    Only examples present in every run are compared. `categories`: client id -> its held-out
    task category, for the task-level interval (every shared example's client must have one)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    spec = METRICS[metric]
    if not method_runs or len(method_runs) != len(baseline_runs):
        raise ValueError("need one baseline run per method run (paired by seed)")
    shared = set.intersection(*({_key(e) for e in run} for run in (*method_runs, *baseline_runs)))
    keys = sorted(shared)
    if not keys:
        raise ValueError("the runs share no test example")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(keys), size=(resamples, len(keys)))
    # Drawn after the example picks, so the examples-only interval is what it was before.
    seed_picks = rng.integers(0, len(method_runs), size=(resamples, len(method_runs)))
    if spec.ratio:  # Σ numerator / Σ denominator over the resampled examples (the loss per token)
        (numerator, _), (denominator, _) = spec.fields
        lm, tm = _arrays(method_runs, keys, numerator), _arrays(method_runs, keys, denominator)
        lb, tb = _arrays(baseline_runs, keys, numerator), _arrays(baseline_runs, keys, denominator)
        per_seed = lm.sum(1) / np.maximum(tm.sum(1), 1) - lb.sum(1) / np.maximum(tb.sum(1), 1)
        # (seeds, resamples): each seed's difference on each example resample
        boot_by_seed = lm[:, picks].sum(-1) / np.maximum(tm[:, picks].sum(-1), 1) - lb[:, picks].sum(-1) / np.maximum(
            tb[:, picks].sum(-1), 1
        )
    else:
        field = spec.fields[0][0]
        diff = _arrays(method_runs, keys, field) - _arrays(baseline_runs, keys, field)
        per_seed = diff.mean(1)
        boot_by_seed = diff[:, picks].mean(-1)
    examples_only = boot_by_seed.mean(0)
    two_level = np.take_along_axis(boot_by_seed, seed_picks.T, axis=0).mean(0)
    low, high = np.percentile(two_level, [2.5, 97.5])
    example_low, example_high = np.percentile(examples_only, [2.5, 97.5])
    category_low = category_high = math.nan
    n_categories = 0
    if categories is not None:
        missing = sorted({client for client, _ in keys if client not in categories})
        if missing:
            raise ValueError(f"no held-out category for client {missing[0]!r} (of {len(missing)} without one)")
        names = sorted({categories[client] for client, _ in keys})
        n_categories = len(names)
    if n_categories >= MIN_CATEGORIES:
        of = np.array([names.index(categories[client]) for client, _ in keys])

        def by_category(values: np.ndarray) -> np.ndarray:
            """(seeds, examples) -> (seeds, categories resampled): the sum over each resample's
            categories of their examples' values."""
            sums = np.stack([np.bincount(of, weights=row, minlength=n_categories) for row in values])
            return sums[:, category_picks].sum(-1)

        # Drawn after the other picks, so those intervals are what they were before.
        category_picks = rng.integers(0, n_categories, size=(resamples, n_categories))
        if spec.ratio:
            category_by_seed = by_category(lm) / np.maximum(by_category(tm), 1) - by_category(lb) / np.maximum(by_category(tb), 1)
        else:  # a resample's mean over its examples, each drawn category's examples all counted
            category_by_seed = by_category(diff) / by_category(np.ones_like(diff))
        task_level = np.take_along_axis(category_by_seed, seed_picks.T, axis=0).mean(0)
        category_low, category_high = (float(x) for x in np.percentile(task_level, [2.5, 97.5]))
    spread = statistics.stdev(per_seed.tolist()) if len(per_seed) > 1 else 0.0
    return PairedDifference(
        metric,
        float(per_seed.mean()),
        float(low),
        float(high),
        float(example_low),
        float(example_high),
        spread,
        len(per_seed),
        len(keys),
        tuple(float(x) for x in per_seed),
        category_low,
        category_high,
        n_categories,
    )
