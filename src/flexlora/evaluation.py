"""Evaluation of a (global) adapter on clients' test sets.

Two Rouge-L scores, always reported under distinct names:
- `rougeL_generated`: Rouge-L F1 of greedy generations against the references (what users of
  an LLM expect; the default metric);
- `rougeL_teacher_forced`: Rouge-L F1 of the teacher-forced argmax tokens (what the FlexLoRA
  paper's released code computes), for comparison.
Client scores are weighted by test-set size. Eval loss is the teacher-forced answer loss.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from flexlora import lora
from flexlora.aggregation.base import Factors
from flexlora.data.prompts import collate, fit_prompt, tokenize_for_training
from flexlora.data.types import ClientData, Example
from flexlora.rouge import rouge_l  # noqa: F401  (Unicode-aware tokenizer; part of this module's API)

METRIC = "rougeL_generated"


def clean_generation(text: str) -> str:
    """Cut a generation where the model starts a new section or a new prompt."""
    for stop in ("\n\n", "###", "<|im_end|>"):
        text = text.split(stop, 1)[0]
    return text.strip()


@contextmanager
def adapter(model, factors: dict[str, Factors] | None, ranks: dict[str, int] | None, alpha, target_modules):
    """The model with the given adapter (no dropout) merged into its weights, or the bare model
    if None. A global adapter can have a high rank (FlexLoRA's ΔW: up to min(m, n)), which
    would make every forward pass several times dearer than the base model; merged, evaluation
    costs the same for every method. The touched base weights are copied first and restored
    exactly afterwards (no merge/unmerge rounding drift across rounds)."""
    if factors is None:
        yield model
        return
    peft_model = lora.attach(model, ranks, alpha, 0.0, target_modules, factors)
    saved = {}
    for name, layer in lora._lora_layers(peft_model):
        weight = layer.get_base_layer().weight
        saved[name] = (weight, weight.detach().clone())
    try:
        peft_model.merge_adapter()
        yield peft_model
    finally:
        lora.detach(peft_model)
        with torch.no_grad():
            for weight, original in saved.values():
                weight.copy_(original)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [clean_generation(t) for t in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]


@torch.no_grad()
def teacher_forced(model, tokenizer, examples: list[Example], template: str, cutoff_len: int):
    """Per example: (summed answer loss, answer tokens, argmax answer) under teacher forcing."""
    device = next(model.parameters()).device
    features = [tokenize_for_training(ex, tokenizer, template, cutoff_len, train_on_inputs=False) for ex in examples]
    batch = {k: v.to(device) for k, v in collate(features, tokenizer.pad_token_id).items()}
    # Only answer positions are scored: ask the model for the logits of the last `keep`
    # positions (right padding puts every answer there), not all of them. With a 49k-token
    # vocabulary, full float32 logits of a batch of long NI prompts run to gigabytes.
    width = batch["input_ids"].shape[1]
    first_answer = min(next((i for i, l in enumerate(f["labels"]) if l != -100), len(f["labels"])) for f in features)
    keep = width - max(first_answer - 1, 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except TypeError:  # an architecture without logits_to_keep
        logits = model(**inputs).logits
    offset = width - logits.shape[1]  # position of logits[:, 0]
    logits = logits[:, :-1]
    labels = batch["labels"][:, offset + 1 :]
    mask = labels != -100
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels.clamp(min=0), reduction="none")
    argmax = logits.argmax(-1)
    losses = (loss * mask).sum(1).tolist()
    tokens = mask.sum(1).tolist()
    answers = [
        clean_generation(tokenizer.decode(argmax[i][mask[i]], skip_special_tokens=True)) for i in range(len(examples))
    ]
    return list(zip(losses, tokens, answers))


def _finish(stats: dict) -> dict:
    return {
        "n": stats["n"],
        "rougeL_generated": stats["gen"] / stats["n"],
        "rougeL_teacher_forced": stats["tf"] / stats["n"],
        "eval_loss": stats["loss"] / max(stats["tokens"], 1),
    }


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
) -> dict:
    """Weighted Rouge-L (generated and teacher-forced) and eval loss over the clients' test
    sets, overall, per client and per category (the client's task category, e.g. NI's
    'Word Analogy' for 'Word Analogy 266.json'). With factors=None the model is evaluated as
    given (the base model, or a model that already carries an adapter)."""
    from flexlora.data.split import task_category

    started = time.perf_counter()
    work = [(c, ex) for c in clients for ex in c.test[:max_examples_per_client]]
    if not work:
        raise ValueError("evaluation needs at least one test example")
    empty = {"n": 0, "gen": 0.0, "tf": 0.0, "loss": 0.0, "tokens": 0}
    per_client: dict[str, dict] = {c.client_id: dict(empty) for c in clients}
    per_category: dict[str, dict] = {}
    categories = {c.client_id: c.category for c in clients}
    samples = []
    with adapter(model, factors, ranks, alpha, target_modules) as m:
        m.eval()
        for start in tqdm(range(0, len(work), batch_size), desc=desc, leave=False, unit="batch"):
            chunk = work[start : start + batch_size]
            examples = [ex for _, ex in chunk]
            # The same prompts as in training: shortened to leave room for an answer.
            prompts = [fit_prompt(ex, tokenizer, template, cutoff_len, max_new_tokens)[0] for ex in examples]
            generated = generate(m, tokenizer, prompts, max_new_tokens)
            scored = teacher_forced(m, tokenizer, examples, template, cutoff_len)
            for (client, ex), gen, (loss, tokens, tf) in zip(chunk, generated, scored):
                gen_score, tf_score = rouge_l(gen, ex.output), rouge_l(tf, ex.output)
                category = task_category(client.category)
                for stats in (per_client[client.client_id], per_category.setdefault(category, dict(empty))):
                    stats["n"] += 1
                    stats["gen"] += gen_score
                    stats["tf"] += tf_score
                    stats["loss"] += loss
                    stats["tokens"] += tokens
                if len(samples) < 6:
                    samples.append({"client": client.client_id, "input": ex.input[:200], "reference": ex.output, "generated": gen})
    total = {k: sum(s[k] for s in per_client.values()) for k in empty}
    # Weighting clients by test-set size makes the weighted mean the mean over all examples;
    # the eval loss is per answer token.
    overall = _finish(total)
    return {
        "rougeL_generated": overall["rougeL_generated"],
        "rougeL_teacher_forced": overall["rougeL_teacher_forced"],
        "eval_loss": overall["eval_loss"],
        "num_examples": total["n"],
        "per_client": {
            cid: {"category": categories[cid], **_finish(s)}
            for cid, s in per_client.items()
            if s["n"]
        },
        "per_category": {cat: _finish(s) for cat, s in sorted(per_category.items())},
        "samples": samples,
        "eval_time_s": time.perf_counter() - started,
    }
