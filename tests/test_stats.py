"""Paired bootstrap differences (flexlora.analysis.stats) against numbers worked out by hand."""

import random

import pytest

from flexlora.analysis.stats import PairedDifference, paired_difference


def records(scores, losses=None, tokens=None):
    return [
        {
            "client": f"c{i % 5}",
            "index": i,
            "rougeL_generated": s,
            "rougeL_teacher_forced": s / 2,
            "loss": (losses[i] if losses else 1.0),
            "tokens": (tokens[i] if tokens else 1),
        }
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
    extra = better + [
        {"client": "x", "index": 99, "rougeL_generated": 1.0, "rougeL_teacher_forced": 1.0, "loss": 0.0, "tokens": 5}
    ]
    d = paired_difference([extra], [base], "rougeL_generated")
    assert d.examples == 4 and d.mean == pytest.approx(0.0)
    with pytest.raises(ValueError, match="paired by seed"):
        paired_difference([better, better], [base], "eval_loss")


def seeds_with_gains(gains, n=400, noise=0.02, rng_seed=2):
    """(method runs, baseline runs): per seed, the method beats the baseline by `gains[s]` on
    average, with small per-example noise."""
    rng = random.Random(rng_seed)
    base = [rng.random() * 0.5 for _ in range(n)]
    method = [records([b + g + rng.gauss(0, noise) for b in base]) for g in gains]
    return method, [records(base) for _ in gains]


def test_when_seeds_disagree_the_two_level_interval_contains_0_and_the_examples_only_one_does_not():
    # FlexLoRA − FedIT under heavy-tail-strong in the NI grid had this shape: +0.041, +0.038, −0.048.
    method, base = seeds_with_gains([0.04, 0.04, -0.05])
    d = paired_difference(method, base, "rougeL_generated")
    assert d.mean == pytest.approx(0.01, abs=0.002) and d.per_seed == pytest.approx((0.04, 0.04, -0.05), abs=0.004)
    assert 0 < d.example_low < d.mean < d.example_high < 0.02 and d.significant_examples_only
    # Seeds resampled with replacement: all three the bad seed has chance 1/27 > 2.5%, all three
    # a good one 8/27, so the interval runs from about −0.05 to about +0.04.
    assert d.low == pytest.approx(-0.05, abs=0.004) and d.high == pytest.approx(0.04, abs=0.004)
    assert not d.significant and d.format().endswith(" n.s.") and "(examples only [+0.0" in d.format()
    # The seed spread is in the interval, not only beside it.
    assert d.seed_sd == pytest.approx(0.052, abs=0.003)


def test_with_one_seed_or_identical_seeds_the_two_level_interval_is_the_examples_only_one():
    method, base = seeds_with_gains([0.01], noise=0.2)
    one = paired_difference(method, base, "rougeL_generated")
    assert (one.low, one.high) == (one.example_low, one.example_high) and one.high - one.low > 0.02
    assert "examples only" not in one.format()
    # Three seeds with the very same per-example differences: resampling seeds changes nothing,
    # so the example noise must still be there (a seeds-only bootstrap would give a point).
    same = paired_difference(method * 3, base * 3, "rougeL_generated")
    assert same.low == pytest.approx(same.example_low, abs=1e-12) and same.high == pytest.approx(same.example_high, abs=1e-12)
    assert same.high - same.low > 0.02
    # Loss as a ratio takes the same two levels.
    losses = paired_difference(method * 3, base * 3, "eval_loss")
    assert losses.low == losses.high == losses.example_low == 0.0


def test_seeds_that_agree_stay_significant_under_both_intervals():
    method, base = seeds_with_gains([0.05, 0.06, 0.055])
    d = paired_difference(method, base, "rougeL_generated")
    assert d.significant and d.significant_examples_only
    assert d.low <= d.example_low and d.high >= d.example_high  # the two-level interval is the wider one
    assert d.low == pytest.approx(0.05, abs=0.004) and d.high == pytest.approx(0.06, abs=0.004)


def one_category_carries_the_gain(seeds=3, categories=9, per_category=20, gain=0.3, elsewhere=-0.005):
    """(method runs, baseline runs, client -> category): the method is `gain` above the baseline
    on every example of category 0 and `elsewhere` on the others' (the same in every seed)."""
    rng = random.Random(4)
    n = categories * per_category
    base = [rng.random() * 0.5 for _ in range(n)]
    method = [b + (gain if i < per_category else elsewhere) for i, b in enumerate(base)]

    def recs(values):
        return [
            {
                "client": f"k{i // 2}",
                "index": i % 2,
                "rougeL_generated": v,
                "rougeL_teacher_forced": v,
                "loss": 1.0 - v,
                "tokens": 1,
            }
            for i, v in enumerate(values)
        ]

    of = {f"k{c}": f"category {(2 * c) // per_category}" for c in range(n // 2)}
    return [recs(method)] * seeds, [recs(base)] * seeds, of


def test_a_difference_carried_by_one_category_is_not_significant_once_categories_are_resampled():
    method, base, categories = one_category_carries_the_gain()
    d = paired_difference(method, base, "rougeL_generated", categories=categories)
    assert d.mean == pytest.approx((0.3 - 8 * 0.005) / 9) and d.categories == 9
    # Over examples (and seeds, which agree) the gain looks certain...
    assert 0 < d.example_low <= d.low < d.mean < d.high <= d.example_high and d.significant_seeds_examples
    # ...but a draw of the 9 categories without category 0 (chance (8/9)^9 = 35%) leaves only
    # the −0.005 of the other eight: the task-level interval runs from −0.005.
    assert d.category_low == pytest.approx(-0.005) and d.category_high > d.high
    assert d.decided_by == "seeds and examples and seeds and categories" and not d.significant
    assert "(seeds and categories [-0.0050, +0." in d.format() and d.format().endswith(" n.s.")
    # The eval loss (1 − score here, one token each) takes the same task-level resampling.
    loss = paired_difference(method, base, "eval_loss", categories=categories)
    assert loss.category_high == pytest.approx(0.005) and not loss.significant and loss.significant_seeds_examples


def test_without_two_categories_significance_follows_the_seeds_and_examples_interval():
    method, base, categories = one_category_carries_the_gain()
    one = paired_difference(method, base, "rougeL_generated", categories={c: "all" for c in categories})
    assert one.categories == 1 and not one.has_categories and one.decided_by == "seeds and examples"
    assert one.significant and "categories" not in one.format()
    plain = paired_difference(method, base, "rougeL_generated")
    assert (plain.low, plain.high, plain.significant) == (one.low, one.high, one.significant) and plain.categories == 0
    with pytest.raises(ValueError, match="no held-out category for client 'k0'"):
        paired_difference(method, base, "rougeL_generated", categories={"k1": "x"})


def test_with_one_example_per_category_the_task_level_interval_is_the_example_level_one():
    # Each category a single example: resampling categories is resampling examples (other draws).
    method, base = seeds_with_gains([0.03], n=400, noise=0.1)
    keyed = [[{**e, "client": f"e{e['index']}"} for e in run] for run in (*method, *base)]
    d = paired_difference(keyed[:1], keyed[1:], "rougeL_generated", categories={f"e{i}": f"e{i}" for i in range(400)})
    assert d.categories == 400
    assert d.category_low == pytest.approx(d.example_low, abs=0.003) and d.category_high == pytest.approx(
        d.example_high, abs=0.003
    )


@pytest.mark.parametrize(
    "p, df, expected",
    [
        (0.975, 1, 12.7062),
        (0.975, 2, 4.3027),
        (0.975, 3, 3.1824),
        (0.975, 10, 2.2281),
        (0.975, 60, 2.0003),
        (0.975, 61, 1.9996),
        (0.975, 1000, 1.9623),
        (0.8, 2, 1.0607),
        (0.8, 10, 0.8791),
        (0.8, 120, 0.8446),
    ],
)
def test_t_quantiles_match_the_tables(p, df, expected):
    from flexlora.analysis.stats import t_quantile

    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-4)


def test_seeds_needed_follows_the_t_interval_of_the_per_seed_differences():
    from flexlora.analysis.stats import seeds_needed

    # |d|/s = 1: √6 = 2.449 < t(0.975, 5) = 2.571 but √7 = 2.646 > t(0.975, 6) = 2.447; for 80% power
    # √9 = 3 < 2.306 + 0.889 but √10 = 3.162 ≥ t(0.975, 9) + t(0.8, 9) = 2.262 + 0.883.
    assert seeds_needed(0.03, 0.03, 3) == 7 and seeds_needed(-0.03, 0.03, 3, power=0.8) == 10
    method, base = seeds_with_gains([0.0, 0.03, 0.06], noise=0.0)
    d = paired_difference(method, base, "rougeL_generated")
    assert d.mean == pytest.approx(0.03) and d.seed_sd == pytest.approx(0.03)
    assert (d.seeds_to_exclude_zero, d.seeds_for_power) == (7, 10)
    # |d|/s = 2: √3·2 = 3.46 < t(0.975, 2) = 4.30, √4·2 = 4 > t(0.975, 3) = 3.18.
    assert seeds_needed(0.03, 0.015, 3) == 4
    # No spread known with one seed; none needed beyond two without spread; never for a zero mean.
    assert seeds_needed(0.03, 0.0, 1) is None and seeds_needed(0.03, 0.0, 3) == 2 and seeds_needed(0.0, 0.01, 3) is None
    assert seeds_needed(1e-9, 0.05, 3) == 100_001  # more than MAX_SEEDS


def test_significance_needs_both_intervals_to_exclude_zero():
    # The wide grid met this: the task-level interval was narrower than the two-level one (a
    # cluster bootstrap over 60 categories can be). A claim must survive both resamplings.
    d = PairedDifference(
        metric="rougeL_generated", mean=0.02, low=-0.001, high=0.04, example_low=0.005, example_high=0.035,
        seed_sd=0.01, seeds=3, examples=389, category_low=0.004, category_high=0.036, categories=60,
    )  # fmt: skip
    assert d.significant_seeds_examples is False and not d.significant
    assert d.deciding_interval == (-0.001, 0.04) and d.format().endswith(" n.s.")
    both = PairedDifference(**{**d.__dict__, "low": 0.001})
    assert both.significant and both.deciding_interval == (0.001, 0.04)
    wider_tasks = PairedDifference(**{**d.__dict__, "low": 0.001, "category_low": -0.002})
    assert not wider_tasks.significant and wider_tasks.deciding_interval == (-0.002, 0.04)
