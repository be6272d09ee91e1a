"""Evaluation of a (global) adapter on clients' test sets.

The metrics are those registered in flexlora.metrics: two Rouge-L scores, always reported under
distinct names (Rouge-L F1 of greedy generations against the references, what users of an LLM
expect and the headline metric; Rouge-L F1 of the teacher-forced argmax tokens, what the
FlexLoRA paper's released code computes, for comparison), and the eval loss, the teacher-forced
answer loss per token. Client scores are weighted by test-set size.

Modules: generation.py (greedy generation and teacher forcing on batches: the two-prefill
path), cached.py (the cached path: one prefill per example, shared prompt prefixes once),
adapters.py (the evaluated adapter merged into the weights; cut to a rank).
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from flexlora.data.prompts import fit_prompt
from flexlora.data.types import ClientData
from flexlora.evaluation.adapters import adapter, keep_rank  # noqa: F401  (part of this package's API)
from flexlora.evaluation.cached import _new_cache, _plain_greedy, _score_cached
from flexlora.evaluation.generation import STOPS, clean_generation, generate, teacher_forced  # noqa: F401
from flexlora.metrics import METRIC, METRICS, Scored  # noqa: F401  (METRIC: part of this package's API)
from flexlora.protocol import Factors
from flexlora.rouge import rouge_l  # noqa: F401  (Unicode-aware tokenizer; part of this package's API)


def score_examples(
    model,
    tokenizer,
    work,
    template,
    cutoff_len,
    max_new_tokens,
    batch_size,
    kv_cache=True,
    desc="eval",
    decode_batch_size: int | None = None,
):
    """Per (client, example) of `work`, in order: (summed answer loss, answer tokens,
    teacher-forced argmax text, generated text). kv_cache: the cached path (`_score_cached`;
    decode_batch_size rows decoded together, None: 4 x batch_size)
    unless the model's generation config asks for more than plain greedy decoding or its
    cache has sliding-window layers."""
    if kv_cache and _plain_greedy(model) and not any(_new_cache(model).is_sliding):
        decode_batch_size = decode_batch_size or 4 * batch_size
        return _score_cached(model, tokenizer, work, template, cutoff_len, max_new_tokens, batch_size, decode_batch_size, desc)
    scored = []
    for start in tqdm(range(0, len(work), batch_size), desc=desc, leave=False, unit="batch"):
        chunk = work[start : start + batch_size]
        examples = [ex for _, ex in chunk]
        # The same prompts as in training: shortened to leave room for an answer.
        prompts = [fit_prompt(ex, tokenizer, template, cutoff_len, max_new_tokens)[0] for ex in examples]
        generated = generate(model, tokenizer, prompts, max_new_tokens)
        tf = teacher_forced(model, tokenizer, examples, template, cutoff_len)
        scored.extend((loss, tokens, answer, gen) for (loss, tokens, answer), gen in zip(tf, generated))
    return scored


def _finish(stats: dict) -> dict:
    """{n, every registered metric} from a set of examples' sums of per-example fields."""
    return {"n": stats["n"], **{m.name: m.aggregate(stats, stats["n"]) for m in METRICS.values()}}


def evaluate(
    model,
    tokenizer,
    clients: list[ClientData],
    *,
    factors: dict[str, Factors] | None,
    ranks: dict[str, int] | None,
    alpha: float,
    target_modules: list[str],
    template: str,
    cutoff_len: int,
    max_new_tokens: int,
    batch_size: int,
    max_examples_per_client: int | None = None,
    desc: str = "eval",
    kv_cache: bool = True,
    decode_batch_size: int | None = None,
) -> dict:
    """Weighted Rouge-L (generated and teacher-forced) and eval loss over the clients' test
    sets, overall, per client and per category (the client's task category, e.g. NI's
    'Word Analogy' for 'Word Analogy 266.json'). With factors=None the model is evaluated as
    given (the base model, or a model that already carries an adapter).

    kv_cache=True: each client's shared prompt prefix is prefilled once and one forward per
    example serves both scores (`_score_cached`); False: the two-prefill path (`generate` +
    `teacher_forced` on batches across clients). Both give the same results up to float
    rounding. `per_example` lists every scored example (client order, then test-set order)."""
    from flexlora.data.split import task_category

    started = time.perf_counter()
    work = [(c, ex) for c in clients for ex in c.test[:max_examples_per_client]]
    if not work:
        raise ValueError("evaluation needs at least one test example")
    empty = {"n": 0, **{field: 0.0 for m in METRICS.values() for field, _ in m.fields}}
    per_client: dict[str, dict] = {c.client_id: dict(empty) for c in clients}
    per_category: dict[str, dict] = {}
    categories = {c.client_id: c.category for c in clients}
    samples, per_example = [], []
    with adapter(model, factors, ranks, alpha, target_modules) as m:
        m.eval()
        scored = score_examples(
            m, tokenizer, work, template, cutoff_len, max_new_tokens, batch_size, kv_cache, desc, decode_batch_size
        )
    index: dict[str, int] = {}
    for (client, ex), (loss, tokens, tf, gen) in zip(work, scored):
        fields = {k: v for m in METRICS.values() for k, v in m.example_fields(Scored(gen, tf, ex.output, loss, tokens)).items()}
        category = task_category(client.category)
        for stats in (per_client[client.client_id], per_category.setdefault(category, dict(empty))):
            stats["n"] += 1
            for field, value in fields.items():
                stats[field] += value
        i = index[client.client_id] = index.get(client.client_id, -1) + 1
        per_example.append({"client": client.client_id, "index": i, **fields})
        if len(samples) < 6:
            samples.append({"client": client.client_id, "input": ex.input[:200], "reference": ex.output, "generated": gen})
    total = {k: sum(s[k] for s in per_client.values()) for k in empty}
    # Weighting clients by test-set size makes the weighted mean the mean over all examples;
    # the eval loss is per answer token.
    overall = _finish(total)
    return {
        **{name: overall[name] for name in METRICS},
        "num_examples": total["n"],
        "per_client": {cid: {"category": categories[cid], **_finish(s)} for cid, s in per_client.items() if s["n"]},
        "per_category": {cat: _finish(s) for cat, s in sorted(per_category.items())},
        "samples": samples,
        "per_example": per_example,
        "eval_time_s": time.perf_counter() - started,
    }
