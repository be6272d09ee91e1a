"""What travels between the server and a client, independent of any transport: a ClientTask
out, a ClientUpdate (or a ClientFailure) back. Plain dataclasses of tensors and JSON values;
no model, no PEFT, no Flower.

``flatten`` / ``unflatten`` turn any of them, and the server's ``ServerSnapshot``, into (flat
tensors, JSON metadata) and back. Every transport and store uses this one format: checkpoints
(safetensors + JSON) and the Flower codec (ArrayRecord + ConfigRecord), so that a new payload
needs no new codec.

Conventions (PEFT's): for a target module with weight W of shape (m, n) (out, in), a client of
rank r holds A (r, n) and B (m, r), and its update is  s * B @ A  with s = lora_alpha / r.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (A, B): A (r, n), B (m, r)


class SparseDelta(NamedTuple):
    """A sparse change of one weight matrix (m, n) = `shape`: the entries at the flat
    (row-major) `indices` change by `values`. Sent by SLoRA's sparse phase instead of factors."""

    indices: torch.Tensor  # (nnz,) int64
    values: torch.Tensor  # (nnz,)
    shape: tuple[int, int]

    def to_dense(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=dtype or self.values.dtype, device=device)
        out[self.indices.to(out.device)] = self.values.to(dtype=out.dtype, device=out.device)
        return out.view(self.shape)


@dataclass
class ClientTask:
    """What the server asks one client to do this round."""

    client_id: str
    round: int
    rank_type: str
    module_ranks: dict[str, int]
    factors: dict[str, Factors] | None = field(metadata={"tensors": "factors"})  # None: fresh PEFT init
    seed: int
    # Client-side behaviour, plain JSON values: the method's (each key is a client hook of a
    # method module, see flexlora.methods.base.ClientHook) and the reliability ones,
    # "timeout_s" (deadline of local training) and "inject_failure" (the client fails on purpose).
    options: dict = field(default_factory=dict)
    # The global model's change of the base weights (FLoRA, SLoRA's sparse stage): module name
    # -> (out, in) tensor, applied for the duration of the task. The same object for every
    # client of a round.
    base_offset: dict[str, torch.Tensor] | None = field(default=None, metadata={"tensors": "dense"})


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after local training."""

    client_id: str
    num_examples: int  # n_k: the aggregation weight is n_k / sum_j n_j over the round
    lora_alpha: float
    # target-module name -> (A, B); empty when the update carries deltas instead
    factors: dict[str, Factors] = field(metadata={"tensors": "factors"})
    metrics: dict = field(default_factory=dict)
    # Changes of the base weights themselves (e.g. SLoRA's sparse phase): module name -> delta.
    deltas: dict[str, SparseDelta] = field(default_factory=dict, metadata={"tensors": "sparse"})
    # The aggregation weight p_k the server assigned this round (num_examples bounded by
    # federation.max_weight_share, see capped_weights); None: n_k / sum_j n_j. Set by the server,
    # never sent by a client ("local": not flattened).
    weight: float | None = field(default=None, metadata={"local": True})

    def rank(self, module: str) -> int:
        return self.factors[module][0].shape[0]

    def scale(self, module: str) -> float:
        return self.lora_alpha / self.rank(module)


@dataclass
class ClientFailure:
    """A client that sent nothing this round, and why (exception, timeout, dropout)."""

    client_id: str
    reason: str


@dataclass
class ServerSnapshot:
    """Everything a resumed server needs that the config and seed cannot rebuild (what a
    checkpoint stores, see FederatedServer.snapshot)."""

    round: int
    method: str
    client_types: dict[str, str]
    client_ranks: dict[str, dict[str, int]]
    declared_sizes: dict[str, int]
    state: dict[str, torch.Tensor] | None = field(metadata={"tensors": "dense"})  # the global state
    # State a method keeps outside the global state (Method.extra_state): tensors and JSON.
    method_tensors: dict[str, torch.Tensor] | None = field(default=None, metadata={"tensors": "dense"})
    method_meta: dict | None = None
    server_opt: dict[str, torch.Tensor] | None = field(default=None, metadata={"tensors": "dense"})  # its moments


# ---------------------------------------------------------------- one flat format for every transport and store

TYPES = {cls.__name__: cls for cls in (ClientTask, ClientUpdate, ClientFailure, ServerSnapshot)}
FACTOR_SUFFIXES = ("lora_A", "lora_B")


def flatten(obj: ClientTask | ClientUpdate | ClientFailure | ServerSnapshot) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON-ready metadata) of a protocol object. A tensor field `f` (see each field's
    ``metadata["tensors"]``) becomes tensors named ``f/<key>``: LoRA factors ``f/<module>.lora_A``
    and ``.lora_B``, dense tensors ``f/<name>``, sparse deltas ``f/<module>.indices`` (int64) and
    ``.values`` (their shapes in the metadata). Every other field goes into the metadata as is;
    fields marked ``local`` (set by the receiver) are left out."""
    meta: dict = {"type": type(obj).__name__, "tensor_fields": []}
    tensors: dict[str, torch.Tensor] = {}
    for f in fields(obj):
        if f.metadata.get("local"):
            continue
        value, kind = getattr(obj, f.name), f.metadata.get("tensors")
        if kind is None:
            meta[f.name] = value
            continue
        if value is None:
            continue
        meta["tensor_fields"].append(f.name)
        if kind == "factors":
            for module, (A, B) in value.items():
                tensors[f"{f.name}/{module}.lora_A"], tensors[f"{f.name}/{module}.lora_B"] = A, B
        elif kind == "sparse":
            meta.setdefault("sparse_shapes", {})[f.name] = {m: list(d.shape) for m, d in value.items()}
            for module, d in value.items():
                tensors[f"{f.name}/{module}.indices"], tensors[f"{f.name}/{module}.values"] = d.indices, d.values
        else:  # dense
            tensors.update({f"{f.name}/{name}": t for name, t in value.items()})
    return tensors, meta


def unflatten(tensors: dict[str, torch.Tensor], meta: dict):
    """The protocol object that ``flatten`` gave (tensors, meta); a malformed input raises a
    one-line ValueError."""
    meta = dict(meta)
    cls = TYPES.get(meta.pop("type", None))
    if cls is None:
        raise ValueError(f"unknown protocol type in {sorted(meta)!r}")
    present = set(meta.pop("tensor_fields", ()))
    shapes = meta.pop("sparse_shapes", {}) or {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, rest = key.partition("/")
        grouped.setdefault(name, {})[rest] = t
    unknown = sorted(set(grouped) - present)
    if unknown:
        raise ValueError(f"unexpected tensors of field {unknown[0]!r}")
    kwargs = dict(meta)
    for f in fields(cls):
        kind = f.metadata.get("tensors")
        if f.metadata.get("local"):  # the receiver's to set, whatever the sender says
            kwargs.pop(f.name, None)
            continue
        if kind is None:
            continue
        if f.name not in present:
            kwargs[f.name] = None
            continue
        group = grouped.get(f.name, {})
        if kind == "factors":
            kwargs[f.name] = tensors_to_factors(group)
        elif kind == "sparse":
            kwargs[f.name] = tensors_to_deltas(group, shapes.get(f.name, {}))
        else:
            kwargs[f.name] = group
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"malformed {cls.__name__}: {e}") from None


def factors_to_tensors(factors: dict[str, Factors]) -> dict[str, torch.Tensor]:
    """LoRA factors as named tensors `<module>.lora_A` / `<module>.lora_B` (PEFT's names)."""
    return {f"{m}.{suffix}": t for m, (A, B) in factors.items() for suffix, t in zip(FACTOR_SUFFIXES, (A, B))}


def tensors_to_factors(tensors: dict[str, torch.Tensor]) -> dict[str, Factors]:
    """The inverse of factors_to_tensors."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, suffix = key.rpartition(".")
        if suffix not in FACTOR_SUFFIXES or not module:
            raise ValueError(f"unexpected array {key!r} in a factors record")
        pairs.setdefault(module, {})[suffix] = t
    missing = [m for m, p in pairs.items() if len(p) != 2]
    if missing:
        raise ValueError(f"module {missing[0]} has only one of lora_A / lora_B")
    return {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}


def tensors_to_deltas(tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> dict[str, SparseDelta]:
    out = {}
    for module, shape in shapes.items():
        try:
            out[module] = SparseDelta(tensors[f"{module}.indices"], tensors[f"{module}.values"], tuple(shape))
        except KeyError as e:
            raise ValueError(f"sparse delta of module {module} lacks {e.args[0]!r}") from None
    return out
