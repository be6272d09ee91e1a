"""LoRA state <-> a PEFT model.

The project's LoRA state is, per target module (named as in the base model, e.g.
`model.layers.0.self_attn.q_proj`), a pair (A, B) in PEFT's convention: A (r, d_in),
B (d_out, r), update = (alpha / r) * B @ A. A client's per-module ranks go to PEFT as a
`rank_pattern`, so every client really trains at its own rank.
"""

from __future__ import annotations

import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from flexlora.errors import ConfigError
from flexlora.extras import quiet_peft
from flexlora.methods.base import TrainingView
from flexlora.protocol import Factors

with quiet_peft():  # else importing PEFT imports bitsandbytes (see flexlora.extras)
    from peft import LoraConfig, PeftModel, get_peft_model

ADAPTER = "default"


def module_shapes(model, target_modules: list[str]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every module LoRA would wrap, keyed by its name in the base model."""
    shapes = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in target_modules:
            continue
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
        elif type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (d_in, d_out)
            shapes[name] = (module.weight.shape[1], module.weight.shape[0])
    found = {name.rsplit(".", 1)[-1] for name in shapes}
    missing = [m for m in target_modules if m not in found]
    if missing:  # a typo would otherwise train fewer modules than asked, silently
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules: {missing} not among the model's linear layers ({', '.join(linear)})")
    return shapes


def lora_config(module_ranks: dict[str, int], alpha: float, dropout: float, target_modules: list[str]) -> LoraConfig:
    """A LoraConfig whose rank_pattern pins every module's rank (PEFT scales each by alpha/r)."""
    default_rank = Counter(module_ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): r for name, r in module_ranks.items() if r != default_rank}
    return LoraConfig(
        r=default_rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in module_ranks}),
        rank_pattern=pattern,
        task_type="CAUSAL_LM",
    )


def attach(
    model,
    module_ranks: dict[str, int],
    alpha: float,
    dropout: float,
    target_modules: list[str],
    factors: dict[str, Factors] | None = None,
    seed: int = 0,
) -> PeftModel:
    """Wrap the base model with a fresh adapter at these ranks; start from `factors` if given,
    else from PEFT's init (A random from `seed`, B zero). The LoRA factors are float32 whatever
    the base weights' dtype (bfloat16/float16/4-bit): PEFT's `autocast_adapter_dtype`."""
    config = lora_config(module_ranks, alpha, dropout, target_modules)
    with torch.random.fork_rng(devices=[]), quiet_peft():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    if factors is not None:
        try:
            set_factors(peft_model, factors)
        except BaseException:
            detach(peft_model)  # the base model is shared: never leave it wrapped
            raise
    return peft_model


def detach(peft_model: PeftModel):
    """Remove the adapter (without merging) and return the untouched base model."""
    return peft_model.unload()


def _lora_layers(peft_model: PeftModel):
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {}):
            yield name[len(prefix) :] if name.startswith(prefix) else name, module


def get_factors(peft_model: PeftModel) -> dict[str, Factors]:
    """Detached float32 CPU copies of (A, B) per module (float32 whatever the base's dtype)."""
    return {
        name: (
            layer.lora_A[ADAPTER].weight.detach().to("cpu", torch.float32, copy=True),
            layer.lora_B[ADAPTER].weight.detach().to("cpu", torch.float32, copy=True),
        )
        for name, layer in _lora_layers(peft_model)
    }


def lora_weights(peft_model: PeftModel) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """The live (A, B) parameters per module (for losses on them, e.g. a regularizer)."""
    return {name: (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight) for name, layer in _lora_layers(peft_model)}


def adapter_view(peft_model: PeftModel, module_ranks: dict[str, int]) -> TrainingView:
    """What client hooks get of an adapter: its live (A, B) parameters by module name."""
    return TrainingView(module_ranks=dict(module_ranks), weights=lora_weights(peft_model))


def get_ranks(peft_model: PeftModel) -> dict[str, int]:
    return {name: layer.r[ADAPTER] for name, layer in _lora_layers(peft_model)}


@torch.no_grad()
def set_factors(peft_model: PeftModel, factors: dict[str, Factors]) -> None:
    layers = dict(_lora_layers(peft_model))
    missing = set(layers) - set(factors)
    if missing:
        raise ValueError(f"factors missing for {len(missing)} modules, e.g. {sorted(missing)[0]}")
    for name, (a, b) in factors.items():
        layer = layers[name]
        wa, wb = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        if wa.shape != a.shape or wb.shape != b.shape:
            raise ValueError(
                f"{name}: factors of shape A{tuple(a.shape)} B{tuple(b.shape)} do not fit the "
                f"adapter's A{tuple(wa.shape)} B{tuple(wb.shape)}"
            )
        wa.copy_(a)
        wb.copy_(b)


def trainable_parameters(peft_model: PeftModel) -> int:
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def save_adapter(
    model,
    factors: dict[str, Factors],
    module_ranks: dict[str, int],
    alpha: float,
    target_modules: list[str],
    folder: str | Path,
) -> Path:
    """Write factors as a PEFT adapter folder that `PeftModel.from_pretrained(base, folder)` loads
    (adapter_config.json + adapter_model.safetensors); the base model is left unwrapped."""
    peft_model = attach(model, module_ranks, alpha, 0.0, target_modules, factors)
    try:
        peft_model.save_pretrained(str(folder))
    finally:
        detach(peft_model)
    return Path(folder)


# ---------------------------------------------------------------- the base weights themselves


def weight_matrix(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight as an (out, in) view (GPT-2's Conv1D stores it as (in, out))."""
    return weight_matrix_of(module, module.weight)


def weight_matrix_of(module: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like the module's weight (e.g. its gradient), as an (out, in) view."""
    return tensor.T if type(module).__name__ == "Conv1D" else tensor


def target_layers(model, names) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    missing = sorted(set(names) - set(modules))
    if missing:
        raise ValueError(f"{len(missing)} module(s) not in the model, e.g. {missing[0]}")
    return {name: modules[name] for name in names}


def weights_view(model, module_ranks: dict[str, int]) -> TrainingView:
    """What a hook that trains the base weights gets: the target modules' weights as live
    (out, in) views, the tensors to train, and their gradients as (out, in) views."""
    layers = target_layers(model, module_ranks)

    def matrix_grad(name: str) -> torch.Tensor | None:
        layer = layers[name]
        return None if layer.weight.grad is None else weight_matrix_of(layer, layer.weight.grad)

    return TrainingView(
        module_ranks=dict(module_ranks),
        matrices={name: weight_matrix(layer) for name, layer in layers.items()},
        parameters={name: layer.weight for name, layer in layers.items()},
        matrix_grad=matrix_grad,
    )


@contextmanager
def base_weights(model, offset: dict[str, torch.Tensor] | None = None, keep=()):
    """For the duration of the block, the base weights are W + offset (offset: module name ->
    (out, in) tensor; a global model's change of the base, e.g. FLoRA's merged updates); the
    weights of the offset's modules and of the modules in `keep` (trained in place inside the
    block) are restored bit for bit afterwards, from copies."""
    layers = target_layers(model, set(offset or {}) | set(keep))
    saved = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    try:
        with torch.no_grad():
            for name, delta in (offset or {}).items():
                W = weight_matrix(layers[name])
                if tuple(delta.shape) != tuple(W.shape):
                    raise ValueError(f"{name}: base offset of shape {tuple(delta.shape)} for a weight of shape {tuple(W.shape)}")
                W.add_(delta.to(dtype=W.dtype, device=W.device))
        yield model
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                layers[name].weight.copy_(weight)


def save_merged(
    model,
    tokenizer,
    folder: str | Path,
    offset: dict[str, torch.Tensor] | None,
    factors: dict[str, Factors] | None,
    module_ranks: dict[str, int] | None,
    alpha: float,
) -> Path:
    """Write the full model with the base offset and the adapter (if any) merged into its weights
    (safetensors, loadable with AutoModelForCausalLM.from_pretrained); the in-memory model is
    left as it was. For methods whose global model changes the base weights (FLoRA, SLoRA's
    sparse stage), which a LoRA adapter cannot hold."""
    merged = dict(offset or {})
    for name, (A, B) in (factors or {}).items():
        update = (alpha / module_ranks[name]) * (B.double() @ A.double())
        merged[name] = update if name not in merged else merged[name].double() + update
    with base_weights(model, merged):
        model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return Path(folder)
