"""One client's local training step: wrap the shared model with an adapter at the client's own
ranks (or the local model a method's client hook puts in its place, e.g. one that trains the
base weights under masks),
start from what the server sent, train, send back what the hooks make of the result, unwrap and
restore the model.

What differs between methods on the client arrives as plain JSON in ``ClientTask.options``; each
key is interpreted by the method's ``ClientHook`` (flexlora.methods), which this loop calls at
fixed points: start, penalty, mask_gradients, after_step, finish, send, handing each the same
model-free TrainingView (tensors by module name). No method is known here by name. Under
client-side clipping (privacy.clipping=client) what is sent is clipped last (flexlora.privacy)."""

from __future__ import annotations

import math
import random
import time

import torch

from flexlora import lora, models
from flexlora.config import ExperimentConfig
from flexlora.data.prompts import collate, tokenize_for_training
from flexlora.data.types import ClientData
from flexlora.faults import fault_point
from flexlora.methods import parse_client_options
from flexlora.privacy.dp import CLIP_OPTION, clip_on_client
from flexlora.protocol import ClientTask, ClientUpdate  # noqa: F401  (ClientTask re-exported)


class ClientTimeout(RuntimeError):
    """Local training ran past the task's deadline (options["timeout_s"])."""


class InjectedFailure(RuntimeError):
    """A failure the server asked for (options["inject_failure"]), to test dropout handling."""


def make_optimizer(params, cfg: ExperimentConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """The local optimizer: AdamW or SGD (train.optimizer); lr defaults to train.lr. `params`: the
    tensors, or parameter groups (a group's own "lr" wins)."""
    lr = cfg.train.lr if lr is None else lr
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)


def factor_groups(params: list[torch.Tensor], view, lr: float, lr_b_ratio: float) -> list:
    """What the optimizer trains: the LoRA B factors (of the view's adapter) at lr · lr_b_ratio
    (LoRA+'s ratio), everything else at lr, as parameter groups (empty ones left out); at ratio 1
    the parameters themselves, one group at lr (the optimizer before the ratio existed)."""
    if lr_b_ratio == 1:
        return params
    b_factors = {id(B) for _, B in view.weights.values()}
    rest = [p for p in params if id(p) not in b_factors]
    b = [p for p in params if id(p) in b_factors]
    return [group for group in ({"params": rest, "lr": lr}, {"params": b, "lr": lr * lr_b_ratio}) if group["params"]]


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


def autocast_dtype(cfg: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward pass: the base's 16-bit dtype on CUDA (so the float32
    LoRA matmuls run in it too), None (no autocast) on CPU or with a float32 base."""
    if device.type != "cuda" or cfg.model_dtype == "float32":
        return None
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model_dtype]


def backward_batch(
    net,
    features: list[dict],
    batch: list[int],
    micro: int,
    device,
    pad_id: int,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Forward and backward one optimizer step's batch in micro-batches; returns its loss.
    The loss is normalised by the batch's answer tokens, so micro-batching doesn't change it.
    `autocast`: run the forward under torch.autocast in this dtype; `scaler`: scale the loss
    before backward (float16 on CUDA)."""
    batch_tokens = sum(sum(l != -100 for l in features[i]["labels"][1:]) for i in batch)
    step_loss = 0.0
    for start in range(0, len(batch), micro):
        inputs = collate([features[i] for i in batch[start : start + micro]], pad_id)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        micro_tokens = int((inputs["labels"][:, 1:] != -100).sum())
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = net(**inputs).loss.float() * micro_tokens / max(batch_tokens, 1)
        step_loss += loss.item()
        (scaler.scale(loss) if scaler is not None else loss).backward()
    return step_loss


def train_client(
    model,
    tokenizer,
    data: ClientData,
    task: ClientTask,
    cfg: ExperimentConfig,
    target_modules: list[str],
) -> ClientUpdate:
    """Local training of one client, as the task (and its options) ask."""
    if task.options.get("inject_failure"):
        raise InjectedFailure(f"client {data.client_id}: injected failure (federation.dropout_rate)")
    if not data.train:
        raise ValueError(f"client {data.client_id} has no training examples")
    hooks = parse_client_options(task.options)
    started, cpu_started = time.perf_counter(), time.process_time()
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

    in_place = next((h for h in hooks if h.trains_weights), None)  # a hook that replaces the adapter
    trained_in_place = list(task.module_ranks) if in_place else []
    with lora.base_weights(model, task.base_offset, keep=trained_in_place):  # restored exactly on exit
        # Hooks see the local model only through a model-free view (methods never import lora.py).
        if in_place:
            view = lora.weights_view(model, task.module_ranks)
            local = view.local = in_place.local_model(view, task, cfg)
            net = model
        else:
            ranks = next((r for r in (h.adapter_ranks(task) for h in hooks) if r is not None), task.module_ranks)
            local = Adapter(model, task, cfg, target_modules, ranks)
            view, net = lora.adapter_view(local.net, task.module_ranks), local.net
        try:
            for hook in hooks:
                hook.start(view)
            local.params = view.params = local.trainable()
            lr = next((hook.lr() for hook in hooks if hook.lr() is not None), cfg.train.lr)
            ratio = next((r for r in (hook.lr_b_ratio() for hook in hooks) if r is not None), cfg.train.lr_b_ratio)
            amp = autocast_dtype(cfg, device)
            # float16 gradients underflow without loss scaling; a disabled scaler is a no-op.
            scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
            checkpointing = models.is_checkpointing(model)
            net.train()

            def train_steps(count: int) -> list[float]:
                """`count` optimizer steps; a trial pass and the training after it see the same
                batches and dropout masks, each with a fresh optimizer."""
                optimizer = make_optimizer(factor_groups(local.params, view, lr, ratio), cfg, lr=lr)
                torch.manual_seed(task.seed)  # dropout masks
                losses = []
                for step, batch in enumerate(batches(len(features), batch_size, count, random.Random(task.seed))):
                    if timeout_s is not None and time.perf_counter() - started > timeout_s:
                        raise ClientTimeout(f"client {data.client_id}: timed out after {timeout_s:g} s at step {step}/{count}")
                    fault_point("train_step", task.round)
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(backward_batch(net, features, batch, micro, device, tokenizer.pad_token_id, amp, scaler))
                    penalty = None
                    for hook in hooks:
                        term = hook.penalty(view)
                        if term is not None:
                            penalty = term if penalty is None else penalty + term
                    if penalty is not None:
                        scaler.scale(penalty).backward()
                    scaler.unscale_(optimizer)
                    for hook in hooks:
                        hook.mask_gradients(view)
                    torch.nn.utils.clip_grad_norm_(local.params, cfg.train.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    for hook in hooks:
                        hook.after_step(view)
                return losses

            epoch_steps = None if cfg.train.steps else math.ceil(len(features) / batch_size)
            trial = max((hook.trial_steps(num_steps, epoch_steps) for hook in hooks), default=0)
            trial_metrics = {}
            if trial:
                trial_started = time.perf_counter()
                train_steps(trial)
                for hook in hooks:
                    hook.after_trial(view)
                trial_metrics = {"trial_steps": trial, "trial_time_s": time.perf_counter() - trial_started}
            losses = train_steps(num_steps)
            factors, deltas, extra_metrics = local.result()
            for hook in hooks:
                factors = hook.finish(factors, extra_metrics)
            for hook in hooks:
                factors, deltas = hook.send(factors, deltas, extra_metrics)
            if CLIP_OPTION in task.options:  # client-level DP: its own change clipped before it leaves
                factors = clip_on_client(factors, task.factors, cfg.lora.alpha, task.options[CLIP_OPTION])
        finally:
            local.close()
            model.eval()
    return ClientUpdate(
        client_id=data.client_id,
        num_examples=data.num_examples,
        lora_alpha=cfg.lora.alpha,
        factors=factors,
        deltas=deltas,
        metrics={
            "rank_type": task.rank_type,
            "max_rank": max(task.module_ranks.values()),
            "steps": num_steps,
            "train_loss_first": losses[0],
            "train_loss_last": losses[-1],
            "train_time_s": time.perf_counter() - started,
            # CPU seconds of every thread of this process meanwhile: what the deployment bench
            # subtracts from a process's CPU to tell the transport's cost from the training's.
            "train_cpu_time_s": time.process_time() - cpu_started,
            "base_dtype": cfg.model_dtype if cfg.quantization is None else f"{cfg.quantization}/{cfg.model_dtype}",
            "gradient_checkpointing": checkpointing,
            **trial_metrics,
            **extra_metrics,
        },
    )


class Adapter:
    """The usual local model: a LoRA adapter at the task's ranks (or those a hook asks for) on
    the shared model, started from the server's factors."""

    def __init__(self, model, task: ClientTask, cfg: ExperimentConfig, target_modules: list[str], ranks=None):
        self.net = lora.attach(
            model, ranks or task.module_ranks, cfg.lora.alpha, cfg.lora.dropout, target_modules, task.factors, seed=task.seed
        )
        self.params: list[torch.Tensor] = []

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def result(self):
        return lora.get_factors(self.net), {}, {"trainable_params": lora.trainable_parameters(self.net)}

    def close(self) -> None:
        lora.detach(self.net).eval()
