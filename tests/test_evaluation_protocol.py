"""Evaluation details: merged adapters leave the base model bit-identical, answer-only logits
give the same loss as full logits, and per-category results add up."""

import torch

from flexlora import lora
from flexlora.data.types import ClientData, Example
from flexlora.evaluation import adapter, evaluate, teacher_forced
from flexlora.models import TINY, default_target_modules, load_model


def test_merged_eval_restores_base_weights_and_matches_unmerged_scores():
    model, tok = load_model(TINY, "cpu")
    targets = default_target_modules(model)
    shapes = lora.module_shapes(model, targets)
    gen = torch.Generator().manual_seed(0)
    factors = {
        n: (torch.randn(4, k, generator=gen) * 0.05, torch.randn(m, 4, generator=gen) * 0.05) for n, (m, k) in shapes.items()
    }
    ranks = {n: 4 for n in shapes}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = [Example("Say hi.", "", "hi there"), Example("Count.", "1 2", "3 4 5")]

    with adapter(model, factors, ranks, 16.0, targets) as merged:
        merged_scores = teacher_forced(merged, tok, examples, "alpaca", 256)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # restored exactly
    peft_model = lora.attach(model, ranks, 16.0, 0.0, targets, factors)
    peft_model.eval()
    try:
        unmerged_scores = teacher_forced(peft_model, tok, examples, "alpaca", 256)
    finally:
        lora.detach(peft_model)
    for (l1, t1, a1), (l2, t2, a2) in zip(merged_scores, unmerged_scores):
        assert t1 == t2 and abs(l1 - l2) < 1e-3 * max(1.0, abs(l2)) and a1 == a2


def test_answer_only_logits_give_the_full_logits_loss():
    model, tok = load_model(TINY, "cpu")
    examples = [Example("Short.", "", "a b"), Example("A much longer instruction here.", "with input", "the answer is long")]
    fast = teacher_forced(model, tok, examples, "alpaca", 256)

    class NoKeep(torch.nn.Module):  # hides logits_to_keep: the full-logits fallback path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    full = teacher_forced(NoKeep(model), tok, examples, "alpaca", 256)
    for (l1, t1, a1), (l2, t2, a2) in zip(fast, full):
        assert t1 == t2 > 0 and abs(l1 - l2) < 1e-4 * abs(l2) and a1 == a2


def test_per_category_breakdown_weights_by_examples():
    model, tok = load_model(TINY, "cpu")
    clients = [
        ClientData("1", "Word Analogy 266.json", [], test=[Example("a", "", "x")] * 2),
        ClientData("2", "Word Analogy 267.json", [], test=[Example("b", "", "y")]),
        ClientData("3", "Mathematics 84.json", [], test=[Example("c", "", "z")]),
    ]
    m = evaluate(
        model,
        tok,
        clients,
        factors=None,
        ranks=None,
        alpha=16.0,
        target_modules=[],
        template="alpaca",
        cutoff_len=256,
        max_new_tokens=2,
        batch_size=8,
    )
    assert m["per_category"].keys() == {"Word Analogy", "Mathematics"}
    assert m["per_category"]["Word Analogy"]["n"] == 3 and m["num_examples"] == 4
    pc = m["per_client"]
    assert (
        abs(
            m["per_category"]["Word Analogy"]["rougeL_generated"]
            - (2 * pc["1"]["rougeL_generated"] + pc["2"]["rougeL_generated"]) / 3
        )
        < 1e-9
    )
    cat_loss = m["per_category"]["Mathematics"]["eval_loss"]
    assert abs(cat_loss - pc["3"]["eval_loss"]) < 1e-9
