"""The adapter an evaluation runs: read from a saved PEFT folder, merged into the base weights
for the duration (restored exactly afterwards), and cut to a rank (`flexlora eval --keep-rank`)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from flexlora import lora
from flexlora.errors import ConfigError, one_line
from flexlora.extras import quiet_peft
from flexlora.protocol import Factors


def keep_rank(factors: dict[str, Factors], ranks: dict[str, int], rank: int) -> tuple[dict[str, Factors], dict[str, int]]:
    """Every module's adapter with its components beyond `rank` cut: A's first rows and B's first
    columns, copies (the inputs are left as they are). PEFT scales a rank-r adapter by alpha/r, so
    B is multiplied by r'/r (r' = min(r, rank)): the cut adapter's update is exactly
    (alpha/r)·B[:, :r']·A[:r'], the original's first r' components. For an adapter whose
    components are ordered by singular value (FlexLoRA's export: B = U_r S_r / s, A = V_rᵀ) that is
    its best rank-r' approximation; for any other, simply its first r' components."""
    if rank < 1:
        raise ValueError(f"the rank to keep must be >= 1, got {rank}")
    cut_factors, cut_ranks = {}, {}
    for name, (A, B) in factors.items():
        r = ranks[name]
        kept = min(r, rank)
        cut_factors[name] = (A[:kept].clone(), B[:, :kept] * (kept / r))
        cut_ranks[name] = kept
    return cut_factors, cut_ranks


@contextmanager
def adapter(model, factors: dict[str, Factors] | None, ranks: dict[str, int] | None, alpha, target_modules):
    """The model with the given adapter (no dropout) merged into its weights, or the bare model
    if None. A global adapter can have a high rank (FlexLoRA's ΔW: up to min(m, n)), which
    would make every forward pass several times dearer than the base model; merged, evaluation
    costs the same for every method. The touched base weights are copied first and restored
    exactly afterwards (no merge/unmerge rounding drift across rounds).

    Merged only into float32 base weights: a 4-bit (NF4) weight cannot hold a merged update,
    and merging into bfloat16/float16 would round most of a small update away. Such a base runs
    the adapter unmerged (PEFT's forward: base layer + float32 LoRA path), which gives the same
    logits as the PEFT model a user loads from the exported adapter."""
    if factors is None:
        yield model
        return
    peft_model = lora.attach(model, ranks, alpha, 0.0, target_modules, factors)
    layers = dict(lora._lora_layers(peft_model))
    # a 4-bit weight is stored as uint8 (bitsandbytes' Params4bit): not float32 either
    mergeable = all(layer.get_base_layer().weight.dtype == torch.float32 for layer in layers.values())
    saved = {}
    if mergeable:
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight
            saved[name] = (weight, weight.detach().clone())
    try:
        if mergeable:
            peft_model.merge_adapter()
        yield peft_model
    finally:
        lora.detach(peft_model)
        with torch.no_grad():
            for weight, original in saved.values():
                weight.copy_(original)


@dataclass
class SavedAdapter:
    """A saved PEFT adapter as an evaluation applies it (`adapter(model, *saved.applied())`)."""

    factors: dict[str, Factors]
    ranks: dict[str, int]
    alpha: float
    target_modules: list[str]
    saved_ranks: list[int]  # the distinct ranks in the folder, before any cut
    keep: int | None = None  # the rank it was cut to (`--keep-rank`), if any

    def applied(self):
        return self.factors, self.ranks, self.alpha, self.target_modules


def read_adapter(model, folder: str | Path, keep: int | None = None) -> SavedAdapter:
    """A PEFT adapter folder, loaded by PEFT onto `model` and taken off again (the model is left
    bare), cut to rank `keep` if given: applied with `adapter(...)`, exactly as a run applies its
    global adapter, so that an evaluation of the folder reproduces the run's reported metrics."""
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(model, str(folder))
    # A folder PEFT cannot read (a config without peft_type, weights that are not safetensors,
    # shapes of another model) is bad input: one line naming it, not PEFT's traceback.
    except (KeyError, ValueError, TypeError, OSError, RuntimeError, SafetensorError) as e:
        raise ConfigError(f"--adapter: PEFT cannot load {folder} ({one_line(e)})") from None
    try:
        factors, ranks = lora.get_factors(peft_model), lora.get_ranks(peft_model)
        config = peft_model.peft_config[lora.ADAPTER]
    finally:
        lora.detach(peft_model)
    saved_ranks = sorted(set(ranks.values()))
    if keep is not None:
        factors, ranks = keep_rank(factors, ranks, keep)
    return SavedAdapter(factors, ranks, config.lora_alpha, sorted(config.target_modules), saved_ranks, keep)


def check_adapter(keep: int | None, folder: str | Path | None) -> None:
    """`flexlora eval`'s adapter (None: the base model) and `--keep-rank`, before anything loads."""
    if keep is not None and (folder is None or keep < 1):
        raise ConfigError(
            "--keep-rank: cuts a saved adapter; --base has none" if folder is None else f"--keep-rank: must be >= 1, got {keep}"
        )
    if folder is not None and not (Path(folder) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter: {folder} is not a PEFT adapter folder (no adapter_config.json)")


def keep_rank_line(folder: str | Path, saved: SavedAdapter) -> str:
    """What `flexlora eval --keep-rank` prints about the cut."""
    return (
        f"adapter {folder}: components beyond rank {saved.keep} cut "
        f"(saved ranks {saved.saved_ranks}, evaluated ranks {sorted(set(saved.ranks.values()))})"
    )
