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

A difference is "significant" when its two-level interval excludes 0. With few seeds that
interval is coarse (3 seeds have 10 distinct resamples); the spread over seeds is reported
beside it.

Scores are per-example means (Rouge-L); the eval loss is per answer token, so it is resampled
as a ratio (Σ loss / Σ tokens over the resampled examples).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

MEAN_SCORES = ("rougeL_generated", "rougeL_teacher_forced")
LOSS = "eval_loss"


@dataclass(frozen=True)
class PairedDifference:
    metric: str
    mean: float  # method − baseline, mean over seeds, on all the shared examples
    low: float  # 95% interval resampling seeds and examples (two-level); `significant` follows it
    high: float
    example_low: float  # 95% interval resampling the test examples only (seeds held fixed)
    example_high: float
    seed_sd: float  # standard deviation over seeds of the per-seed difference (0 with one seed)
    seeds: int
    examples: int
    per_seed: tuple[float, ...] = ()  # the difference in each seed, in the runs' order

    @property
    def significant(self) -> bool:
        return not (self.low <= 0.0 <= self.high)

    @property
    def significant_examples_only(self) -> bool:
        return not (self.example_low <= 0.0 <= self.example_high)

    def format(self, digits: int = 4, examples_only: bool = True) -> str:
        """mean [two-level interval] sd ..., then the examples-only interval in parentheses."""
        text = f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        if self.seeds > 1:
            text += f" sd {self.seed_sd:.{digits}f}"
            if examples_only:
                text += f" (examples only [{self.example_low:+.{digits}f}, {self.example_high:+.{digits}f}])"
        return text + ("" if self.significant else " n.s.")


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
    resamples: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """method_runs[s], baseline_runs[s]: the per-example records of seed s (dicts with client,
    index, the Rouge scores, loss and tokens; see evaluation.evaluate's "per_example").
    Only examples present in every run are compared."""
    if metric not in (*MEAN_SCORES, LOSS):
        raise ValueError(f"unknown metric {metric!r}")
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
    if metric == LOSS:
        lm, tm = _arrays(method_runs, keys, "loss"), _arrays(method_runs, keys, "tokens")
        lb, tb = _arrays(baseline_runs, keys, "loss"), _arrays(baseline_runs, keys, "tokens")
        per_seed = lm.sum(1) / np.maximum(tm.sum(1), 1) - lb.sum(1) / np.maximum(tb.sum(1), 1)
        # (seeds, resamples): each seed's difference on each example resample
        boot_by_seed = (lm[:, picks].sum(-1) / np.maximum(tm[:, picks].sum(-1), 1)
                        - lb[:, picks].sum(-1) / np.maximum(tb[:, picks].sum(-1), 1))
    else:
        diff = _arrays(method_runs, keys, metric) - _arrays(baseline_runs, keys, metric)
        per_seed = diff.mean(1)
        boot_by_seed = diff[:, picks].mean(-1)
    examples_only = boot_by_seed.mean(0)
    two_level = np.take_along_axis(boot_by_seed, seed_picks.T, axis=0).mean(0)
    low, high = np.percentile(two_level, [2.5, 97.5])
    example_low, example_high = np.percentile(examples_only, [2.5, 97.5])
    spread = statistics.stdev(per_seed.tolist()) if len(per_seed) > 1 else 0.0
    return PairedDifference(
        metric, float(per_seed.mean()), float(low), float(high), float(example_low), float(example_high),
        spread, len(per_seed), len(keys), tuple(float(x) for x in per_seed),
    )
