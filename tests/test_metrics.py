"""The metric registry (flexlora.metrics): one registration makes a metric part of evaluation
(overall, per client, per category, per example), of the paired intervals and of the report."""

import pytest
from test_eval_cache import _clients, _model

from flexlora import metrics
from flexlora.analysis.stats import paired_difference
from flexlora.evaluation import evaluate
from flexlora.metrics import METRICS, Metric, register_metric


@pytest.fixture
def answer_length(monkeypatch):
    """A metric registered for the test only: characters per generated answer, a ratio over
    the examples (Σ characters / Σ examples counted by a second field)."""
    monkeypatch.setattr(metrics, "METRICS", dict(METRICS))  # registrations end with the test
    import flexlora.analysis.stats
    import flexlora.evaluation

    monkeypatch.setattr(flexlora.evaluation, "METRICS", metrics.METRICS)
    monkeypatch.setattr(flexlora.analysis.stats, "METRICS", metrics.METRICS)
    return register_metric(
        Metric(
            "answer_chars",
            "answer characters",
            "answer characters",
            "_answer_chars",
            1,
            (("chars", lambda s: len(s.generated)), ("answers", lambda s: 1)),
            ratio=True,
        )
    )


def test_a_registered_metric_is_evaluated_everywhere_and_resampled(answer_length):
    model, tok = _model(0.3, 1.0)
    clients = _clients()
    result = evaluate(
        model,
        tok,
        clients,
        factors=None,
        ranks=None,
        alpha=16,
        target_modules=["q_proj"],
        template="alpaca",
        cutoff_len=512,
        max_new_tokens=6,
        batch_size=4,
        max_examples_per_client=2,
    )
    assert len(result["per_example"]) <= len(result["samples"])  # every example's text is in the samples
    lengths = [len(s["generated"]) for s in result["samples"]]
    assert [e["chars"] for e in result["per_example"]] == lengths and all(e["answers"] == 1 for e in result["per_example"])
    assert result["answer_chars"] == pytest.approx(sum(lengths) / len(lengths))
    by_client = {}
    for e, n in zip(result["per_example"], lengths):
        by_client.setdefault(e["client"], []).append(n)
    for cid, ns in by_client.items():
        assert result["per_client"][cid]["answer_chars"] == pytest.approx(sum(ns) / len(ns))
    assert all("answer_chars" in c for c in result["per_category"].values())
    # The built-in metrics are still there, unchanged in name.
    assert {"rougeL_generated", "rougeL_teacher_forced", "eval_loss"} <= set(result)

    longer = [{**e, "chars": e["chars"] + 3} for e in result["per_example"]]
    d = paired_difference([longer], [result["per_example"]], "answer_chars")
    assert d.mean == pytest.approx(3.0) and d.low == pytest.approx(3.0) and d.high == pytest.approx(3.0)


def test_a_metric_cannot_take_a_field_another_metric_computes(answer_length):
    with pytest.raises(ValueError, match="per-example field 'loss' is already eval_loss's"):
        register_metric(Metric("loss_again", "l", "l", "_l", 3, (("loss", lambda s: s.loss),)))
    with pytest.raises(ValueError, match="metric 'answer_chars' is already registered"):
        register_metric(Metric("answer_chars", "x", "x", "_x", 1, (("x", lambda s: 0.0),)))
