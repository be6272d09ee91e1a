"""The aggregation engine on PEFT adapters: ``Aggregator``.

For anyone whose clients train LoRA with PEFT, in any framework: a client update is the
adapter state dict exactly as PEFT writes it (``get_peft_model_state_dict(model)``, or the
tensors of ``adapter_model.safetensors``), with the client's number of examples and its LoRA
alpha (or its ``adapter_config.json``). The rank of each module is read from the shapes. Out
comes, for each client, a state dict at that client's own ranks, ready for
``set_peft_model_state_dict``, from the same method code that ``flexlora run`` uses: one
engine. No model is loaded here, and nothing of flexlora's config, data or run folder is needed.

    agg = Aggregator("flexlora", lora_alpha=16)
    for state_dict, n in replies:             # one round, updates taken one at a time
        agg.add(state_dict, num_examples=n)
    agg.aggregate()                           # the new global state
    agg.client_adapter(rank=8)                # what a rank-8 client loads next round
    agg.global_adapter()                      # the global model's adapter (and its ranks)
    agg.base_offset()                         # the base-weight change, for methods with one

Streaming: updates are folded into the method's accumulator as they are added (the server's
rounds do the same), so memory does not grow with the round's clients where the method's rule
is a sum (FlexLoRA, FedIT, HetLoRA, FedEx-LoRA, ...).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flexlora.methods import METHODS, GlobalState, compose_method
from flexlora.methods.helpers import FLOAT_DTYPES, nonfinite
from flexlora.methods.server_opt import starting_point
from flexlora.protocol import ClientUpdate, Factors
from flexlora.reporting import atomic_path

if TYPE_CHECKING:
    from peft import LoraConfig

# A LoRA factor as PEFT's get_peft_model_state_dict names it: "<module>.lora_A.weight".
FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def split_adapter(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, Factors], dict[str, tuple[str, str]]]:
    """({module: (A, B)}, {module: (A's key, B's key)}) of a PEFT adapter state dict; a one-line
    ValueError naming the key for anything that is not a 2-D floating LoRA factor, or a module
    whose A or B is missing or whose shapes do not pair (A (r, n), B (m, r))."""
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("a client update must be a non-empty PEFT adapter state dict (key -> tensor)")
    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        match = FACTOR_KEY.match(key) if isinstance(key, str) else None
        if match is None:
            raise ValueError(
                f"key {key!r} is not a LoRA factor (expected '<module>.lora_A.weight' or '<module>.lora_B.weight', "
                "as get_peft_model_state_dict writes them)"
            )
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in FLOAT_DTYPES or tensor.ndim != 2:
            what = (
                f"a {type(tensor).__name__}"
                if not isinstance(tensor, torch.Tensor)
                else f"{tensor.dtype}, shape {tuple(tensor.shape)}"
            )
            raise ValueError(f"key {key!r} is not a 2-D floating-point LoRA factor ({what})")
        problem = nonfinite(tensor)
        if problem:
            raise ValueError(f"key {key!r} {problem}")
        halves.setdefault(match["module"], {})[match["factor"]] = (key, tensor)
    factors, keys = {}, {}
    for module, pair in sorted(halves.items()):
        for factor in "AB":
            if factor not in pair:
                raise ValueError(
                    f"key {f'{module}.lora_{factor}.weight'!r} is missing (its lora_{'B' if factor == 'A' else 'A'} is there)"
                )
        (a_key, A), (b_key, B) = pair["A"], pair["B"]
        if A.shape[0] != B.shape[1] or A.shape[0] == 0:
            raise ValueError(
                f"keys {a_key!r} {tuple(A.shape)} and {b_key!r} {tuple(B.shape)} are not a LoRA pair A (r, n), B (m, r)"
            )
        factors[module], keys[module] = (A, B), (a_key, b_key)
    return factors, keys


def ranks_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """{module: rank} of a PEFT adapter state dict, read from the shapes of its lora_A factors."""
    factors, _ = split_adapter(state_dict)
    return {module: A.shape[0] for module, (A, _) in factors.items()}


def alpha_of(adapter_config: LoraConfig | Mapping | str | Path) -> float:
    """lora_alpha of a PEFT adapter config (PEFT's LoraConfig, its dict, its adapter_config.json,
    or the adapter's folder). Configs whose scale is not α/r on every module are refused: rsLoRA's
    α/√r and a per-module alpha_pattern would need a scale per module."""
    if hasattr(adapter_config, "to_dict"):  # a peft LoraConfig (model.peft_config["default"])
        adapter_config = adapter_config.to_dict()
    if not isinstance(adapter_config, Mapping):
        path = Path(adapter_config)
        path = path / "adapter_config.json" if path.is_dir() else path
        try:
            adapter_config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable adapter_config.json ({e})") from None
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter_config: peft_type {adapter_config.get('peft_type')!r} is not LORA")
    if adapter_config.get("use_rslora"):
        raise ValueError("adapter_config: use_rslora=true (scale α/√r) is not supported; the methods assume α/r")
    alpha = adapter_config.get("lora_alpha")
    pattern = adapter_config.get("alpha_pattern") or {}
    if any(value != alpha for value in pattern.values()):
        raise ValueError("adapter_config: alpha_pattern gives modules their own lora_alpha; one alpha per client is supported")
    return alpha


class Aggregator:
    """A registered method's server side on PEFT adapter state dicts.

    ``Aggregator(method, lora_alpha=..., max_rank=..., template=..., **method_args)``:
    - ``method``: a registered method's name (``flexlora.METHODS``), ``method_args`` its
      arguments as in ``method_args`` of a run config (``seed`` of the shared initial adapter,
      ``server_opt``, FlexLoRA's ``split`` ...).
    - ``lora_alpha``: the federation's LoRA alpha; every client must train with it (None: the
      first client's). The adapters handed back are scaled for it.
    - ``max_rank``: the largest rank any client will ask for (FlexLoRA then keeps only that much
      of the spectrum; None: ΔW is kept exactly).
    - ``template``: any adapter state dict of the federation (a fresh model's, say): it declares
      the modules, so that round-1 clients can be handed the shared initial adapter
      (``client_adapter`` before any ``aggregate``). Without it the modules come from the first
      update.
    """

    def __init__(
        self,
        method: str = "flexlora",
        *,
        lora_alpha: float | None = None,
        max_rank: int | None = None,
        template: Mapping[str, torch.Tensor] | None = None,
        **method_args,
    ):
        for hook in getattr(METHODS.get(method), "client_hooks", ()):
            if hook.trains_weights:
                raise ValueError(f"method {method!r} has clients train the base weights, which a PEFT adapter cannot carry")
            if hook.sends != "factors":
                raise ValueError(f"method {method!r} has clients send the change of their chosen components, not an adapter")
        composition = compose_method(method, **method_args)
        self.method, self._server_step = composition.method, composition.server_step
        if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
            raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
        self.lora_alpha = self._check_alpha(lora_alpha) if lora_alpha is not None else None
        self.max_rank = max_rank
        self.round = 0  # rounds aggregated so far
        self.state: GlobalState | None = None
        self.keys: dict[str, tuple[str, str]] = {}  # module -> (A's key, B's key), as clients name them
        self.shapes: dict[str, tuple[int, int]] = {}
        self._accumulator = self._start = None
        self._pending: list[str] = []  # client ids of the open round
        self._round_ranks: dict[str, int] = {}  # module -> the open round's first rank (homogeneous methods)
        if template is not None:
            factors, keys = split_adapter(template)
            self._declare(keys, {module: (B.shape[0], A.shape[1]) for module, (A, B) in factors.items()})

    # -- a round ------------------------------------------------------------------------------

    def add(
        self,
        state_dict: Mapping[str, torch.Tensor],
        num_examples: int,
        *,
        lora_alpha: float | None = None,
        adapter_config: LoraConfig | Mapping | str | Path | None = None,
        client_id: str | None = None,
    ) -> None:
        """Fold one client's adapter into the open round, weighted by ``num_examples``. Its alpha
        comes from ``lora_alpha`` or ``adapter_config`` (PEFT's LoraConfig, its dict, its
        adapter_config.json or the adapter's folder; else the federation's is assumed).
        Bad input raises a one-line ValueError naming the key, and leaves the round as it was."""
        client_id = client_id if client_id is not None else f"client-{len(self._pending)}"
        try:
            update = self._update(state_dict, num_examples, lora_alpha, adapter_config, client_id)
        except ValueError as e:
            raise ValueError(f"client {client_id!r}: {e}") from None
        if self._accumulator is None:
            state = self._current_state()
            self._accumulator = self.method.accumulator(state)
            self._start = self.method.accumulator(state) if self._server_step is not None and state is not None else None
        self._accumulator.add(update, update.num_examples)
        if self._start is not None:
            self._start.add(starting_point(self.method, update, self.state), update.num_examples)
        self._pending.append(client_id)

    def aggregate(self) -> GlobalState:
        """Close the round: the method's new global state from the updates added since the last
        call (with its server optimizer, if ``server_opt`` was given). Returns the state."""
        if self._accumulator is None:
            raise ValueError("aggregate() needs at least one add() in this round")
        state = self._accumulator.result()
        if self._server_step is not None:
            state = self._server_step(self.method, self._start.result() if self._start is not None else None, state)
        self.state, self.round = state, self.round + 1
        self._accumulator = self._start = None
        self._pending, self._round_ranks = [], {}
        return state

    # -- what goes back -----------------------------------------------------------------------

    def client_adapter(self, rank: int | Mapping[str, int]) -> dict[str, torch.Tensor]:
        """The adapter state dict a client of this rank (one int, or {module: rank}) starts the
        next round from, keyed as the clients' own; load it with ``set_peft_model_state_dict``
        into a model whose LoRA has these ranks. Before round 1 (with a ``template``): the shared
        initial adapter."""
        if not self.shapes:
            raise ValueError("no module is known yet: pass template= or add() a client update first")
        ranks = self._ranks(rank)
        factors = self.method.client_factors(self._current_state(), ranks, self._alpha())
        if factors is None:
            raise ValueError(f"method {self.method.name!r} hands clients no factors (they start from a fresh PEFT init)")
        return self._to_peft(factors)

    def global_adapter(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """(state dict, {module: rank}) of the global model's adapter at its full rank; empty
        before round 1, or when the method keeps everything in ``base_offset``."""
        if self.state is None:
            return {}, {}
        factors, ranks = self.method.global_factors(self.state, self._alpha())
        return self._to_peft(factors), dict(ranks)

    def base_offset(self) -> dict[str, torch.Tensor] | None:
        """{module: (out, in) tensor} to add to each module's base weight (FedEx-LoRA's residual,
        FLoRA's merged updates), or None for methods that leave the base weights alone. Module
        names are the prefixes of the clients' keys (``<module>.lora_A.weight``)."""
        if self.state is None:
            return None
        return self.method.base_offset(self.state)

    def client_options(self, round_: int | None = None) -> dict:
        """The method's plain-JSON settings for its clients' local step (e.g. HetLoRA's rank
        regularizer); {} for methods that ask nothing of the client."""
        return dict(self.method.client_options(self._current_state(), self.round + 1 if round_ is None else round_, ""))

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write what the next round needs (the global state, the server optimizer's moments, the
        modules' keys, alpha, the round) to one safetensors file, atomically: a crash while
        saving leaves the previous file whole. An open round is not saved."""
        tensors = {f"state/{k}": v for k, v in (self.state or {}).items()}
        if self._server_step is not None:
            tensors.update({f"moments/{k}": v for k, v in self._server_step.moments.items()})
        extra = self.method.extra_state()
        if extra is not None:
            tensors.update({f"extra/{k}": v for k, v in extra[0].items()})
        meta = {
            "method": self.method.name,
            "round": self.round,
            "lora_alpha": self.lora_alpha,
            "keys": self.keys,
            "shapes": self.shapes,
            "extra": extra[1] if extra is not None else None,
        }
        with atomic_path(path, suffix=".tmp") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"flexlora": json.dumps(meta)})

    def load(self, path: str | Path) -> None:
        """Restore what ``save`` wrote, into an Aggregator made with the same method and arguments."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["flexlora"])
                missing = {"method", "keys", "shapes", "round", "lora_alpha", "extra"} - set(meta)
                if missing:
                    raise KeyError(f"metadata lacks {sorted(missing)}")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, KeyError, ValueError, TypeError, SafetensorError) as e:
            raise ValueError(f"{path}: not an Aggregator file ({e})") from None
        if meta["method"] != self.method.name:
            raise ValueError(f"{path}: saved by method {meta['method']!r}, this Aggregator runs {self.method.name!r}")

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self._declare({m: tuple(k) for m, k in meta["keys"].items()}, {m: tuple(s) for m, s in meta["shapes"].items()})
        self.state = part("state/") or None
        self.round, self.lora_alpha = meta["round"], meta["lora_alpha"]
        if self._server_step is not None:
            self._server_step.moments = part("moments/")
        if meta["extra"] is not None:
            self.method.load_extra_state(part("extra/"), meta["extra"])

    # -- internals ----------------------------------------------------------------------------

    def _update(self, state_dict, num_examples, lora_alpha, adapter_config, client_id) -> ClientUpdate:
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
            raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
        if lora_alpha is None and adapter_config is not None:
            lora_alpha = alpha_of(adapter_config)
        alpha = self._check_alpha(lora_alpha if lora_alpha is not None else self._alpha())
        if self.lora_alpha is not None and alpha != self.lora_alpha:
            raise ValueError(f"lora_alpha {alpha:g} differs from the federation's {self.lora_alpha:g}")
        factors, keys = split_adapter(state_dict)
        known = self.keys or keys  # the first update declares the modules (once it is valid)
        shapes = self.shapes or {module: (B.shape[0], A.shape[1]) for module, (A, B) in factors.items()}
        for module in sorted(set(known) - set(factors)):
            raise ValueError(f"key {known[module][0]!r} is missing (the federation's adapters have it)")
        for module in sorted(set(factors) - set(known)):
            raise ValueError(f"key {keys[module][0]!r} is not in the federation's adapters")
        for module, (A, B) in factors.items():
            a_key, b_key = keys[module]
            if (B.shape[0], A.shape[1]) != shapes[module]:
                raise ValueError(
                    f"keys {a_key!r}, {b_key!r}: weight shape {(B.shape[0], A.shape[1])}, the federation's is {shapes[module]}"
                )
            self._check_rank(module, A.shape[0], a_key, shapes[module], in_round=True)
        if not self.shapes:
            self._declare(keys, shapes)
        for module, (A, _) in factors.items():
            self._round_ranks.setdefault(module, A.shape[0])
        self.lora_alpha = alpha
        return ClientUpdate(client_id=client_id, num_examples=num_examples, lora_alpha=alpha, factors=factors)

    def _check_rank(self, module: str, rank: int, key: str, shape: tuple[int, int], in_round: bool = False) -> None:
        """A rank the method can take: 1..min(m, n), at most max_rank, and for a homogeneous
        method (FedIT) the global state's rank, or in a round the rank of its first client."""
        m, n = shape
        limit = min(m, n, self.max_rank or min(m, n))
        if not 1 <= rank <= limit:
            raise ValueError(f"key {key!r}: rank {rank} is outside 1..{limit}")
        if self.method.homogeneous:
            held = self.state.get(f"{module}.A") if self.state is not None else None
            fixed = held.shape[0] if held is not None and held.shape[0] > 0 else None
            if fixed is None and in_round:
                fixed = self._round_ranks.get(module)
            if fixed is not None and rank != fixed:
                raise ValueError(f"key {key!r}: rank {rank}, but {self.method.name} needs every client at rank {fixed}")

    def _declare(self, keys: dict[str, tuple[str, str]], shapes: dict[str, tuple[int, int]]) -> None:
        """The federation's modules: their keys as clients name them and their weights' shapes."""
        self.keys, self.shapes = keys, shapes
        if self.max_rank is not None and self._server_step is None:  # a server optimizer steps the whole ΔW
            self.method.bound_ranks({module: min(self.max_rank, m, n) for module, (m, n) in shapes.items()})

    def _current_state(self) -> GlobalState | None:
        if self.state is None and self.shapes:
            self.state = self.method.init_state(self.shapes)
        return self.state

    def _ranks(self, rank: int | Mapping[str, int]) -> dict[str, int]:
        ranks = dict(rank) if isinstance(rank, Mapping) else dict.fromkeys(self.shapes, rank)
        unknown = sorted(set(ranks) - set(self.shapes))
        if unknown:
            raise ValueError(f"module {unknown[0]!r} is not in the federation's adapters")
        missing = sorted(set(self.shapes) - set(ranks))
        if missing:
            raise ValueError(f"no rank given for module {missing[0]!r}")
        for module, r in ranks.items():
            if isinstance(r, bool) or not isinstance(r, int):
                raise ValueError(f"module {module!r}: rank must be an integer, got {r!r}")
            self._check_rank(module, r, self.keys[module][0], self.shapes[module])
        return ranks

    def _alpha(self) -> float:
        if self.lora_alpha is None:
            raise ValueError("lora_alpha is unknown: pass it to Aggregator(...) or with the first add()")
        return self.lora_alpha

    @staticmethod
    def _check_alpha(alpha) -> float:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {alpha!r}")
        return float(alpha)

    def _to_peft(self, factors: dict[str, Factors]) -> dict[str, torch.Tensor]:
        out = {}
        for module, (A, B) in factors.items():
            a_key, b_key = self.keys[module]
            out[a_key], out[b_key] = A.contiguous(), B.contiguous()
        return out
