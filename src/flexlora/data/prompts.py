"""Prompt templates and tokenisation of instruction examples."""

from __future__ import annotations

from dataclasses import replace

import torch

from flexlora.data.types import Example

# The Alpaca template, used by the FlexLoRA paper's released code.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


def render_prompt(example: Example, template: str, tokenizer=None) -> str:
    if template == "alpaca":
        fmt = ALPACA_WITH_INPUT if example.input else ALPACA_NO_INPUT
        return fmt.format(instruction=example.instruction, input=example.input)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template")
        content = f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt template '{template}'; choose from: {', '.join(TEMPLATES)}")


def _shorten(text: str, tokenizer, drop: int) -> str:
    """text without its last `drop` tokens (plus an ellipsis marking the cut)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max(len(ids) - drop, 0)
    return tokenizer.decode(ids[:keep], skip_special_tokens=True).rstrip() + " ..." if keep else ""


def fit_prompt(
    example: Example, tokenizer, template: str, cutoff_len: int, answer_len: int | None = None
) -> tuple[str, list[int]]:
    """(prompt text, prompt ids) that leave room for the answer within cutoff_len tokens.

    NI inputs can run to thousands of tokens; cutting prompt+answer at cutoff_len would leave
    such examples with no answer tokens (no training signal, a NaN loss). Instead the prompt
    is shortened, the input's tail first, then the instruction's, until it leaves
    min(answer tokens, cutoff_len // 4) tokens for the answer. Generation at evaluation sees
    the same shortened prompt. `answer_len`: the answer's length in tokens (None: not known,
    reserve cutoff_len // 4)."""
    reserve = cutoff_len // 4 if answer_len is None else min(answer_len, cutoff_len // 4)
    budget = cutoff_len - reserve
    text = render_prompt(example, template, tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return text, ids
    input_len = len(tokenizer(example.input, add_special_tokens=False)["input_ids"]) if example.input else 0
    drop = len(ids) - budget + 4  # + room for the ellipsis
    for _ in range(8):  # re-tokenising a cut text can differ by a token or two: cut a little more
        if drop < input_len:
            short = replace(example, input=_shorten(example.input, tokenizer, drop))
        else:
            cut = _shorten(example.instruction, tokenizer, drop - input_len + 4)
            short = replace(example, input="", instruction=cut or example.instruction[:32])
        text = render_prompt(short, template, tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            break
        drop += len(ids) - budget
    return text, ids


def tokenize_for_training(
    example: Example, tokenizer, template: str, cutoff_len: int, train_on_inputs: bool
) -> dict[str, list[int]]:
    """input_ids and labels (-100 on the prompt unless train_on_inputs), ending in EOS so the
    model learns to stop, at most cutoff_len tokens; a long prompt is shortened (fit_prompt)
    so that the answer keeps at least min(its length, cutoff_len // 4) tokens."""
    answer_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    _, prompt_ids = fit_prompt(example, tokenizer, template, cutoff_len, len(answer_ids))
    input_ids = (prompt_ids + answer_ids)[:cutoff_len]
    labels = list(input_ids) if train_on_inputs else ([-100] * len(prompt_ids) + answer_ids)[:cutoff_len]
    return {"input_ids": input_ids, "labels": labels}


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for teacher-forced training/scoring."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
