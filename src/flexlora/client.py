"""One client's local training step: wrap the shared model with an adapter at the client's own
ranks, start from what the server sent, train, send back the factors, unwrap."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from flexlora import lora
from flexlora.aggregation.base import ClientUpdate, Factors
from flexlora.config import ExperimentConfig
from flexlora.data.prompts import collate, tokenize_for_training
from flexlora.data.types import ClientData
from flexlora.faults import fault_point


class ClientTimeout(RuntimeError):
    """Local training ran past the task's deadline (options["timeout_s"])."""


class InjectedFailure(RuntimeError):
    """A failure the server asked for (options["inject_failure"]), to test dropout handling."""


@dataclass
class ClientTask:
    """What the server asks one client to do this round (transport-independent)."""

    client_id: str
    round: int
    rank_type: str
    module_ranks: dict[str, int]
    factors: dict[str, Factors] | None  # None: fresh PEFT init
    seed: int
    # Client-side extras, plain JSON values: method-specific ones (e.g. a regularizer's
    # settings) and the reliability ones, "timeout_s" (deadline of local training) and
    # "inject_failure" (fault injection: the client fails on purpose).
    options: dict = field(default_factory=dict)


def make_optimizer(params, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "sgd":  # the paper's "FedAvg" local optimizer
        return torch.optim.SGD(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def batches(num_examples: int, batch_size: int, num_steps: int, rng: random.Random):
    """Index batches for num_steps steps, reshuffling at each pass over the data."""
    order: list[int] = []
    for _ in range(num_steps):
        while len(order) < batch_size:
            epoch = list(range(num_examples))
            rng.shuffle(epoch)
            order += epoch
        yield order[:batch_size]
        order = order[batch_size:]


def train_client(
    model,
    tokenizer,
    data: ClientData,
    task: ClientTask,
    cfg: ExperimentConfig,
    target_modules: list[str],
    regularizer: Callable[[torch.nn.Module], torch.Tensor] | None = None,
) -> ClientUpdate:
    """Local training of one client; `regularizer(peft_model)` is added to the loss if given."""
    if task.options.get("inject_failure"):
        raise InjectedFailure(f"client {data.client_id}: injected failure (federation.dropout_rate)")
    if not data.train:
        raise ValueError(f"client {data.client_id} has no training examples")
    started = time.perf_counter()
    # A thread cannot be killed, so the deadline is checked between optimizer steps: a client
    # overruns it by at most one step (see docs/reliability.md).
    timeout_s = task.options.get("timeout_s")
    device = next(model.parameters()).device
    features = [
        tokenize_for_training(ex, tokenizer, cfg.data.template, cfg.data.cutoff_len, cfg.data.train_on_inputs)
        for ex in data.train
    ]
    batch_size = min(cfg.train.batch_size, len(features))
    micro = min(cfg.train.micro_batch_size or batch_size, batch_size)
    num_steps = cfg.train.steps or math.ceil(cfg.train.epochs * len(features) / batch_size)

    peft_model = lora.attach(
        model, task.module_ranks, cfg.lora.alpha, cfg.lora.dropout, target_modules, task.factors, seed=task.seed
    )
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, cfg)
        torch.manual_seed(task.seed)  # dropout masks
        peft_model.train()
        losses = []
        for step, batch in enumerate(batches(len(features), batch_size, num_steps, random.Random(task.seed))):
            if timeout_s is not None and time.perf_counter() - started > timeout_s:
                raise ClientTimeout(f"client {data.client_id}: timed out after {timeout_s:g} s at step {step}/{num_steps}")
            fault_point("train_step", task.round)
            optimizer.zero_grad(set_to_none=True)
            # Normalise by the batch's answer tokens so micro-batching doesn't change the loss.
            batch_tokens = sum(sum(l != -100 for l in features[i]["labels"][1:]) for i in batch)
            step_loss = 0.0
            for start in range(0, len(batch), micro):
                inputs = collate([features[i] for i in batch[start : start + micro]], tokenizer.pad_token_id)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                micro_tokens = int((inputs["labels"][:, 1:] != -100).sum())
                loss = peft_model(**inputs).loss * micro_tokens / max(batch_tokens, 1)
                step_loss += loss.item()
                loss.backward()
            if regularizer is not None:
                regularizer(peft_model).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            losses.append(step_loss)
        factors = lora.get_factors(peft_model)
        trainable = lora.trainable_parameters(peft_model)
    finally:
        lora.detach(peft_model).eval()
    return ClientUpdate(
        client_id=data.client_id,
        num_examples=data.num_examples,
        lora_alpha=cfg.lora.alpha,
        factors=factors,
        metrics={
            "rank_type": task.rank_type,
            "max_rank": max(task.module_ranks.values()),
            "trainable_params": trainable,
            "steps": num_steps,
            "train_loss_first": losses[0],
            "train_loss_last": losses[-1],
            "train_time_s": time.perf_counter() - started,
        },
    )
