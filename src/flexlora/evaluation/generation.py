"""Greedy generation and teacher forcing on batches of examples (the two-prefill path), and the
cleaning of a generated answer (cut where the model starts a new section or prompt)."""

from __future__ import annotations

import torch

from flexlora.data.prompts import collate, tokenize_for_training
from flexlora.data.types import Example

STOPS = ("\n\n", "###", "<|im_end|>")


def clean_generation(text: str) -> str:
    """Cut a generation where the model starts a new section or a new prompt."""
    for stop in STOPS:
        text = text.split(stop, 1)[0]
    return text.strip()


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
    answers = [clean_generation(tokenizer.decode(argmax[i][mask[i]], skip_special_tokens=True)) for i in range(len(examples))]
    return list(zip(losses, tokens, answers))
