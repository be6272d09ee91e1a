"""One client's local training step: wrap the shared model with an adapter at the client's own
ranks (or, for SLoRA's sparse stage, train its weights under masks), start from what the server
sent, train, send back the factors (or the sparse change), unwrap and restore the model.

What differs between methods on the client arrives as plain JSON in ``ClientTask.options`` and
is interpreted here with the helpers of ``flexlora.client_options``."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch

from flexlora import lora, models
from flexlora.aggregation.base import ClientUpdate, Factors
from flexlora.client_options import (
    ClientOptions,
    lora_budget_density,
    proximal_loss,
    prune_factors,
    rank_regularizer_loss,
    sparse_delta,
    sparse_mask,
)
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
    # Client-side behaviour, plain JSON values: the method's (see flexlora.client_options) and
    # the reliability ones, "timeout_s" (deadline of local training) and "inject_failure"
    # (fault injection: the client fails on purpose).
    options: dict = field(default_factory=dict)
    # The global model's change of the base weights (FLoRA, SLoRA's sparse stage): module name
    # -> (out, in) tensor, applied for the duration of the task. The same object for every
    # client of a round.
    base_offset: dict[str, torch.Tensor] | None = None


def make_optimizer(params, cfg: ExperimentConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """The local optimizer: AdamW (FedIT) or SGD (the paper's "FedAvg"); lr defaults to train.lr."""
    lr = cfg.train.lr if lr is None else lr
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)


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
    net, features: list[dict], batch: list[int], micro: int, device, pad_id: int,
    autocast: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
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
    opts = ClientOptions.parse(task.options)
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

    trained_in_place = list(task.module_ranks) if opts.sparse else []
    with lora.base_weights(model, task.base_offset, keep=trained_in_place):  # restored exactly on exit
        local = SparseWeights(model, task, opts) if opts.sparse else Adapter(model, task, cfg, target_modules, opts)
        try:
            optimizer = make_optimizer(local.params, cfg, lr=opts.sparse.lr if opts.sparse else None)
            anchors = [p.detach().clone() for p in local.params] if opts.fedprox_mu > 0 else None
            amp = autocast_dtype(cfg, device)
            # float16 gradients underflow without loss scaling; a disabled scaler is a no-op.
            scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
            torch.manual_seed(task.seed)  # dropout masks
            local.net.train()
            checkpointing = models.is_checkpointing(model)
            losses = []
            for step, batch in enumerate(batches(len(features), batch_size, num_steps, random.Random(task.seed))):
                if timeout_s is not None and time.perf_counter() - started > timeout_s:
                    raise ClientTimeout(f"client {data.client_id}: timed out after {timeout_s:g} s at step {step}/{num_steps}")
                fault_point("train_step", task.round)
                optimizer.zero_grad(set_to_none=True)
                losses.append(backward_batch(local.net, features, batch, micro, device, tokenizer.pad_token_id, amp, scaler))
                penalty = local.penalty()
                if anchors is not None:
                    prox = proximal_loss(local.params, anchors, opts.fedprox_mu)
                    penalty = prox if penalty is None else penalty + prox
                if penalty is not None:
                    scaler.scale(penalty).backward()
                scaler.unscale_(optimizer)
                local.mask_gradients()
                torch.nn.utils.clip_grad_norm_(local.params, cfg.train.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                local.after_step()
            factors, deltas, extra_metrics = local.result()
        finally:
            local.close()
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
            "base_dtype": cfg.model_dtype if cfg.quantization is None else f"{cfg.quantization}/{cfg.model_dtype}",
            "gradient_checkpointing": checkpointing,
            **extra_metrics,
        },
    )


class Adapter:
    """The usual local model: a LoRA adapter at the task's ranks on the shared model, started
    from the server's factors; A frozen if asked (FFA-LoRA), HetLoRA's regularizer if asked."""

    def __init__(self, model, task: ClientTask, cfg: ExperimentConfig, target_modules: list[str], opts: ClientOptions):
        self.opts = opts
        self.net = lora.attach(
            model, task.module_ranks, cfg.lora.alpha, cfg.lora.dropout, target_modules, task.factors, seed=task.seed
        )
        self.weights = lora.lora_weights(self.net)
        if opts.freeze_A:
            for A, _ in self.weights.values():
                A.requires_grad_(False)
        self.params = [p for p in self.net.parameters() if p.requires_grad]

    def penalty(self) -> torch.Tensor | None:
        reg = self.opts.rank_regularizer
        return rank_regularizer_loss(self.weights, reg) if reg is not None and reg.lam > 0 else None

    def mask_gradients(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def result(self):
        factors = lora.get_factors(self.net)
        metrics = {"trainable_params": lora.trainable_parameters(self.net)}
        if self.opts.rank_regularizer is not None:
            factors, pruned = prune_factors(factors, self.opts.rank_regularizer)
            if pruned:
                metrics["pruned_ranks"] = pruned
        return factors, {}, metrics

    def close(self) -> None:
        lora.detach(self.net).eval()


class SparseWeights:
    """SLoRA's sparse stage: the target modules' weights themselves are trained, each entry only
    where the shared random mask of the task's density is set; sends back the sparse change.
    (The caller restores the weights afterwards.)"""

    def __init__(self, model, task: ClientTask, opts: ClientOptions):
        spec = opts.sparse
        self.net = model
        self.layers = lora.target_layers(model, task.module_ranks)
        self.masks, self.start = {}, {}
        for name, layer in self.layers.items():
            W = lora.weight_matrix(layer)
            density = lora_budget_density(task.module_ranks[name], tuple(W.shape)) if spec.density == "lora_budget" else spec.density
            self.masks[name] = sparse_mask(tuple(W.shape), density, spec.seed, name, W.device)
            self.start[name] = W.detach().clone()
            layer.weight.requires_grad_(True)
        self.params = [layer.weight for layer in self.layers.values()]

    def penalty(self) -> None:
        return None

    def mask_gradients(self) -> None:
        for name, layer in self.layers.items():
            if layer.weight.grad is not None:
                lora.weight_matrix_of(layer, layer.weight.grad).mul_(self.masks[name])

    @torch.no_grad()
    def after_step(self) -> None:
        # Decoupled weight decay (AdamW) moves every entry; masked-out ones must not train.
        for name, layer in self.layers.items():
            W = lora.weight_matrix(layer)
            W.copy_(torch.where(self.masks[name], W, self.start[name]))

    def result(self):
        deltas = {
            name: sparse_delta(lora.weight_matrix(layer), self.start[name], self.masks[name])
            for name, layer in self.layers.items()
        }
        trained = sum(int(mask.sum()) for mask in self.masks.values())
        return {}, deltas, {"trainable_params": trained}

    def close(self) -> None:
        for layer in self.layers.values():
            layer.weight.requires_grad_(False)
            layer.weight.grad = None
        self.net.eval()
