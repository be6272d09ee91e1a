"""The evaluation metrics, registered once each: evaluation computes them, runs summarise them,
the comparison report tabulates them and its bootstrap resamples them, all from this registry.

A metric is computed per test example from that example's `Scored` (the generated text, the
teacher-forced argmax text, the reference, the answer's summed loss and its token count), and
aggregated over any set of examples in one of two ways:
- a mean over examples of its one per-example field (Rouge-L: each example counts once, so the
  mean over a client's examples weighted by test-set size is the mean over all examples);
- a ratio of sums, Σ numerator / max(Σ denominator, 1) (the eval loss: per answer token).

To add a metric, register it here (or call `register_metric`) with `Metric(...)`: its name is
then a key of every evaluation record (overall, per client, per category), its per-example
fields appear in `per_example`, summary.json gains zero_shot<suffix> and final<suffix>, and
`flexlora compare` reports its final value and its paired differences with their intervals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


class Scored(NamedTuple):
    """One test example as the model answered it."""

    generated: str  # the greedy generation, cleaned
    teacher_forced: str  # the argmax tokens under teacher forcing, cleaned
    reference: str
    loss: float  # summed cross-entropy over the answer's tokens
    tokens: int  # answer tokens


@dataclass(frozen=True)
class Metric:
    name: str  # the key in evaluation records, summaries and report files
    label: str  # how report and console text names it ("teacher-forced")
    title: str  # the report's "Final <title>" table
    summary_suffix: str  # summary.json keeps zero_shot<suffix> and final<suffix> ("" for the headline metric)
    digits: int  # decimals in the report
    fields: tuple[tuple[str, Callable[[Scored], float]], ...]  # per-example fields and how each is computed
    ratio: bool = False  # False: mean over examples of fields[0]; True: Σ fields[0] / max(Σ fields[1], 1)
    description: str = ""

    def example_fields(self, scored: Scored) -> dict[str, float]:
        return {field: compute(scored) for field, compute in self.fields}

    def aggregate(self, sums: dict[str, float], n: int) -> float:
        """The metric over a set of n examples from the sums of their per-example fields."""
        if self.ratio:
            return sums[self.fields[0][0]] / max(sums[self.fields[1][0]], 1)
        return sums[self.fields[0][0]] / n


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add a metric to METRICS under its name (a field another metric computes is refused)."""
    if metric.name in METRICS and METRICS[metric.name] != metric:
        raise ValueError(f"metric {metric.name!r} is already registered")
    taken = {field: m.name for m in METRICS.values() if m.name != metric.name for field, _ in m.fields}
    for field, _ in metric.fields:
        if field in taken or field in ("client", "index"):
            raise ValueError(
                f"metric {metric.name!r}: per-example field {field!r} is already {taken.get(field, 'a record key')}'s"
            )
    METRICS[metric.name] = metric
    return metric


def _rouge_l(text_of: Callable[[Scored], str]) -> Callable[[Scored], float]:
    def score(s: Scored) -> float:
        from flexlora.rouge import rouge_l  # Unicode-aware tokenizer; imported only where scoring runs

        return rouge_l(text_of(s), s.reference)

    return score


GENERATED = register_metric(
    Metric(
        "rougeL_generated",
        "rougeL_generated",
        "rougeL_generated (held-out clients)",
        "",
        4,
        (("rougeL_generated", _rouge_l(lambda s: s.generated)),),
        description="Rouge-L F1 of greedy generations on held-out (unseen-task) clients, weighted by test-set size",
    )
)
TEACHER_FORCED = register_metric(
    Metric(
        "rougeL_teacher_forced",
        "teacher-forced",
        "rougeL_teacher_forced (released code's metric)",
        "_teacher_forced",
        4,
        (("rougeL_teacher_forced", _rouge_l(lambda s: s.teacher_forced)),),
        description="Rouge-L F1 of the teacher-forced argmax tokens (the FlexLoRA paper's released code)",
    )
)
EVAL_LOSS = register_metric(
    Metric(
        "eval_loss",
        "eval loss",
        "eval loss (per answer token; lower is better)",
        "_eval_loss",
        3,
        (("loss", lambda s: s.loss), ("tokens", lambda s: s.tokens)),
        ratio=True,
        description="teacher-forced cross-entropy per answer token",
    )
)

METRIC = GENERATED.name  # the headline metric: summaries' zero_shot/final/best, the report's first tables
