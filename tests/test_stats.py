"""Paired bootstrap differences (flexlora.stats) against numbers worked out by hand."""

import random

import pytest

from flexlora.stats import paired_difference


def records(scores, losses=None, tokens=None):
    return [
        {"client": f"c{i % 5}", "index": i, "rougeL_generated": s, "rougeL_teacher_forced": s / 2,
         "loss": (losses[i] if losses else 1.0), "tokens": (tokens[i] if tokens else 1)}
        for i, s in enumerate(scores)
    ]


def test_a_constant_gain_is_exact_and_significant():
    rng = random.Random(0)
    base = [[rng.random() for _ in range(200)] for _ in range(3)]
    d = paired_difference([records([x + 0.1 for x in b]) for b in base], [records(b) for b in base], "rougeL_generated")
    assert d.mean == pytest.approx(0.1) and d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    assert d.significant and d.seeds == 3 and d.examples == 200 and d.seed_sd == pytest.approx(0, abs=1e-12)


def test_noise_around_zero_is_not_significant_and_the_interval_covers_the_mean():
    rng = random.Random(1)
    base = [rng.random() for _ in range(300)]
    noisy = [b + rng.gauss(0, 0.2) for b in base]
    d = paired_difference([records(noisy)], [records(base)], "rougeL_generated")
    assert d.low < d.mean < d.high and not d.significant
    assert 0.01 < d.high - d.low < 0.1  # ≈ 2·1.96·0.2/√300 = 0.045
    assert "n.s." in d.format()


def test_eval_loss_is_a_per_token_ratio_and_only_shared_examples_count():
    base = records([0.5] * 4, losses=[2.0, 2.0, 2.0, 2.0], tokens=[1, 1, 1, 1])  # 8 / 4 = 2.0 per token
    better = records([0.5] * 4, losses=[1.0, 1.0, 1.0, 9.0], tokens=[1, 1, 1, 3])  # 12 / 6 = 2.0 per token
    assert paired_difference([better], [base], "eval_loss").mean == pytest.approx(0.0)
    extra = better + [{"client": "x", "index": 99, "rougeL_generated": 1.0, "rougeL_teacher_forced": 1.0, "loss": 0.0, "tokens": 5}]
    d = paired_difference([extra], [base], "rougeL_generated")
    assert d.examples == 4 and d.mean == pytest.approx(0.0)
    with pytest.raises(ValueError, match="paired by seed"):
        paired_difference([better, better], [base], "eval_loss")
