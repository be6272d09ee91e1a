"""FlexLoRA (Bai et al., NeurIPS 2024): heterogeneous-rank LoRA aggregated through ΔW.

Per target module the server forms ΔW = Σ_k p_k s_k B_k A_k (p_k = n_k / Σ n_j,
s_k = α_k / r_k), keeps its truncated SVD as the global state, and hands a client of rank r
the best rank-r approximation of ΔW as LoRA factors. Nothing is merged into the base weights.

State keys per module: f"{module}.U" (m, K), f"{module}.S" (K,), f"{module}.Vh" (K, n), and
f"{module}.E" (1,) float64: ‖ΔW‖²_F, ΔW's whole energy (for the truncation report). K is
min(Σ r_k, m, n, R), with R the rank bound the server promises (``Method.bound_ranks``: the
largest rank any client can be handed or the adapter exported at; no bound: ΔW kept exactly),
and at most ``max_global_rank``. Nothing reads the spectrum beyond R: clients and the export
take its top-r triplets, r <= R, and the energy share needs only ‖ΔW‖²_F, kept as E. So the
state (and checkpoint) is the top-R SVD, and the dense route needs only a top-R
decomposition. Before round 1, K = 0: every client starts from the same adapter (the module's
shared seeded A rows, B = 0).
"""

from __future__ import annotations

import torch

from .base import Accumulator, ClientUpdate, Factors, GlobalState, Method, accumulate, inherits_rule, streaming_accumulator
from .helpers import (
    DENSE_GROUP_RANK,
    compute_dtype,
    fresh_rows,
    mean_modules,
    module_names,
    module_seed,
    stack_pieces,
    state_modules,
    truncation_summary,
)
from .svd import MODES, dense_svd, factored_svd_energy, randomized_svd
from .threads import SINGLE_THREAD_MAX_FLOPS, dense_flops, factored_flops, map_modules, small_work_threads

SPLITS = ("all_in_B", "sqrt")


def split_factors(
    U: torch.Tensor,
    S: torch.Tensor,
    Vh: torch.Tensor,
    rank: int,
    lora_alpha: float,
    split: str = "all_in_B",
    *,
    pad_seed: int = 0,
) -> Factors:
    """LoRA factors (A (rank, n), B (m, rank)) with (lora_alpha/rank)·B@A = the best
    rank-min(rank, K) approximation of U diag(S) Vh.

    split "all_in_B" (the paper): B = U_r S_r / s_r, A = Vh_r.
    split "sqrt": B = U_r √S_r / √s_r, A = √S_r Vh_r / √s_r (balanced factor norms).
    If rank > K the extra rank has nothing to carry yet: B gets zero columns, so the product
    is unchanged, and A gets rows drawn like PEFT's fresh init (kaiming-uniform, bound
    1/√n), so that the extra rank still receives gradients and can learn. Those rows come from
    a generator seeded with ``pad_seed``, so the result is deterministic.
    Returned tensors never alias the inputs (a client may train them in place).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    k = min(rank, S.shape[0])
    s_r = lora_alpha / rank
    if split == "all_in_B":
        B = U[:, :k] * (S[:k] / s_r)
        A = Vh[:k].clone()
    else:
        root = S[:k].clamp_min(0).sqrt() / s_r**0.5
        B = U[:, :k] * root
        A = Vh[:k] * root[:, None]
    if rank > k:
        m, n = U.shape[0], Vh.shape[1]
        A = torch.cat([A, fresh_rows(rank - k, n, pad_seed, A.dtype, A.device)], dim=0)
        B = torch.cat([B, B.new_zeros(m, rank - k)], dim=1)
    return A.contiguous(), B.contiguous()


def dense_delta(state: GlobalState, module: str) -> torch.Tensor:
    """The global ΔW of one module as a dense (m, n) matrix."""
    U, S, Vh = (state[f"{module}.{part}"] for part in ("U", "S", "Vh"))
    return (U * S) @ Vh


class FlexLoRAAccumulator(Accumulator):
    """FlexLoRA's aggregation one update at a time, in bounded memory: per module the sum
    Σ w_k s_k B_k A_k, kept as the clients' stacked factors while their total rank R is below
    min(m, n) (the factored route: exact, and smaller than ΔW), and from then on as one dense
    ΔW (what the dense route forms anyway) into which the factors are added in groups (one
    matrix product per group; a group's factors are never larger than ΔW). So it holds at most
    about two ΔW per module, whatever the number of clients; ``FlexLoRA.aggregate`` is this
    accumulator over a list, so a streamed round and one aggregate call are the same numbers."""

    def __init__(self, method: FlexLoRA, previous: GlobalState | None):
        self.method = method
        self.total = 0.0
        self.rank: dict[str, int] = {}  # R per module
        self.shape: dict[str, tuple[int, int]] = {}
        self.home: dict[str, torch.device] = {}  # where the state goes back to
        self.pending: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}  # (B, A, w s) not in `dense` yet
        self.dense: dict[str, torch.Tensor] = {}
        # Under DP noise only: per module the rank-K truncation of the noiseless sum (as
        # (U·S, Vh)) and the energies of noise_energies (see there).
        self.clean_truncation: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.energies: dict[str, dict[str, float]] = {}

    def add(self, update: ClientUpdate, weight: float) -> None:
        if weight <= 0:  # adds nothing to ΔW, but would add rank
            return
        self.total += weight
        for module, (A, B) in update.factors.items():
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise ValueError(
                    f"client {update.client_id}, module {module}: need A (r, n) and B (m, r), "
                    f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
                )
            m, n = B.shape[0], A.shape[1]
            if self.shape.setdefault(module, (m, n)) != (m, n):
                raise ValueError(
                    f"client {update.client_id}, module {module}: weight shape {(m, n)}, others have {self.shape[module]}"
                )
            self.home.setdefault(module, A.device)
            device = self.method.device or self.home[module]
            dtype = compute_dtype(A, B)
            # Kept as sent, with its coefficient w_k s_k: the scaling is done where the stack is
            # used (stack_pieces: at a flush, or inside the factored kernel's thread limit).
            self.pending.setdefault(module, []).append(
                (B.to(dtype=dtype, device=device), A.to(dtype=dtype, device=device), weight * update.scale(module))
            )
            self.rank[module] = self.rank.get(module, 0) + A.shape[0]
            mode = self.method.svd_mode
            if module not in self.dense and (
                mode in ("dense", "randomized") or (mode == "auto" and self.rank[module] >= min(m, n))
            ):
                self.dense[module] = torch.zeros(m, n, dtype=dtype, device=device)
            if module in self.dense and sum(B.shape[1] for B, _, _ in self.pending[module]) >= min(
                DENSE_GROUP_RANK, max(1, m * n // (m + n))
            ):
                self._flush(module)

    def _flush(self, module: str) -> None:
        """Add the pending factors of a module to its dense ΔW, in one product."""
        if not self.pending.get(module):
            return
        # On all of the process's threads: one large product has one barrier, so a second thread
        # halves it on an idle machine and costs ~10% on a busy one (1536×2048×576: 22 ms on one
        # thread, 11 ms on two idle, 24 ms on two beside another two-thread process).
        B, A = stack_pieces(self.pending.pop(module))
        dtype = torch.promote_types(self.dense[module].dtype, B.dtype)
        dense = self.dense[module] = self.dense[module].to(dtype)
        dense.addmm_(B.to(dtype), A.to(dtype))

    def add_noise(self, draw) -> None:
        """Client-level DP (flexlora.privacy): dense noise draw(module, (m, n)) into each module's
        Σ w_k s_k B_k A_k, before the division by Σ w_k and the truncated SVD, which then work on
        the dense sum (noise is full-rank: the factored route no longer applies)."""
        for module, (m, n) in self.shape.items():
            if module not in self.dense:
                B, A = self.pending[module][0][:2]
                self.dense[module] = torch.zeros(m, n, dtype=compute_dtype(A, B), device=A.device)
            self._flush(module)
            dense = self.dense[module]
            # T_K of the noiseless sum, K the rank the state keeps: an extra SVD, for the
            # noise-energy diagnostic (noise_energies) only.
            U, S, Vh = dense_svd(dense, self._kept_rank(module))
            self.clean_truncation[module] = (U * S, Vh)
            noise = draw(module, (m, n)).to(dtype=dense.dtype, device=dense.device)
            dense.add_(noise)
            self.energies[module] = {"noise": _energy(noise), "noisy": _energy(dense)}

    def noise_energies(self) -> dict[str, dict[str, float]]:
        """Per module, after ``result`` and only where noise was added: the energies (squared
        Frobenius norms, float64) of the noise N ("noise") and of the noisy sum ΔW + N ("noisy")
        before truncation, and after it, of T_K(ΔW + N) ("kept") and of T_K(ΔW + N) − T_K(ΔW)
        ("kept_noise"): what of the noise survives the rank-K truncation the state keeps (K as
        in _finish). All on the same scale (the sum divided by Σ w_k), so ratios compare."""
        return {module: dict(values) for module, values in self.energies.items() if "kept" in values}

    def _kept_rank(self, module: str) -> int:
        """K: the rank of the module's state (see the module docstring)."""
        m, n = self.shape[module]
        R = self.rank[module]
        return min(R, m, n, self.method.max_global_rank or R, self.method.rank_bound.get(module, R))

    def result(self) -> GlobalState:
        if self.total <= 0:
            raise ValueError("aggregation needs at least one client with num_examples > 0")
        modules = sorted(self.shape)
        devices = {self.method.device or self.home[module] for module in modules}
        new: GlobalState = {}
        for part in map_modules(self._finish, modules, devices.pop() if len(devices) == 1 else None):
            new.update(part)
        return new

    def _finish(self, module: str) -> GlobalState:
        """The module's state: the top-K SVD of its Σ w_k s_k B_k A_k / Σ w_k, and its energy."""
        method = self.method
        m, n = self.shape[module]
        R = self.rank[module]
        K = self._kept_rank(module)
        if module not in self.dense:  # R < min(m, n): the factored route
            # Small modules on one CPU thread, stacking and rotation included (see
            # threads.SINGLE_THREAD_MAX_FLOPS); the energy ‖B̃Ã‖² comes from the kernel's R×R
            # Gram matrices.
            with small_work_threads(factored_flops(m, n, R), self.pending[module][0][0].device, SINGLE_THREAD_MAX_FLOPS):
                B, A = stack_pieces(self.pending.pop(module), divide_by=self.total)
                (U, S, Vh), energy = factored_svd_energy(B, A, K)
                del B, A
        else:
            self._flush(module)
            dense = self.dense.pop(module).div_(self.total)
            with small_work_threads(dense_flops(m, n, R, DENSE_GROUP_RANK), dense.device):
                energy = torch.linalg.vector_norm(dense, dtype=torch.float64).square()
                if method.svd_mode == "randomized":
                    U, S, Vh = randomized_svd(dense, K, oversample=method.oversample, niter=method.niter, seed=method.seed)
                else:
                    U, S, Vh = dense_svd(dense, K)
            del dense
            if module in self.clean_truncation:
                self._truncated_noise(module, U, S, Vh)
        home = self.home[module]
        U, S, Vh = (t.to(home).contiguous() for t in (U, S, Vh))
        return {
            f"{module}.U": U,
            f"{module}.S": S,
            f"{module}.Vh": Vh,
            f"{module}.E": energy.reshape(1).to(device=home, dtype=torch.float64),
        }

    def _truncated_noise(self, module: str, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> None:
        """noise_energies' after-truncation part: T_K(ΔW + N) is the state (U, S, Vh), already
        divided by Σ w_k; T_K(ΔW) is divided here to match, as are the before-truncation ones."""
        XC, YC = self.clean_truncation.pop(module)
        scale = 1.0 / self.total
        values = self.energies[module]
        values["noise"] *= scale * scale
        values["noisy"] *= scale * scale
        values["kept"] = float(S.double().square().sum())
        values["kept_noise"] = _truncated_noise_energy((U * S, Vh), (XC.to(U.device) * scale, YC.to(U.device)))


def _energy(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64).square())


def _truncated_noise_energy(noisy: tuple, clean: tuple) -> float:
    """‖X1·Y1 − X2·Y2‖² of two rank-K products, formed densely in float64 (no cancellation)."""
    (X1, Y1), (X2, Y2) = noisy, clean
    return _energy(X1.double() @ Y1.double() - X2.double() @ Y2.double())


class FlexLoRA(Method):
    """FlexLoRA aggregation: exact ΔW via a truncated SVD of the stacked client factors."""

    name = "flexlora"
    privacy_space = "delta"  # clipped and noised as ΔW, before the truncated SVD

    def __init__(
        self,
        svd_mode: str = "auto",
        max_global_rank: int | None = None,
        split: str = "all_in_B",
        *,
        device: str | torch.device | None = "auto",
        seed: int = 0,
        oversample: int = 64,
        niter: int = 2,
    ):
        """device: where the SVDs run ("auto": a CUDA GPU if there is one, else where the
        client tensors are; None: where the client tensors are); the state goes back to the
        clients' device. seed: for padding rows (see split_factors) and the
        randomized SVD. oversample, niter: randomized SVD only."""
        if svd_mode not in MODES:
            raise ValueError(f"unknown svd_mode {svd_mode!r}; choose from: {', '.join(MODES)}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
        if max_global_rank is not None and max_global_rank < 1:
            raise ValueError(f"max_global_rank must be >= 1 or None, got {max_global_rank}")
        self.svd_mode = svd_mode
        self.max_global_rank = max_global_rank
        self.split = split
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else None
        try:
            self.device = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError):
            raise ValueError(f"flexlora: device must be auto, cpu, cuda[:N] or null, got {device!r}") from None
        self.seed = seed
        self.oversample = oversample
        self.niter = niter
        self.rank_bound: dict[str, int] = {}  # see bound_ranks

    def bound_ranks(self, ranks: dict[str, int]) -> None:
        """Keep no more than the top ranks[module] triplets of each module's ΔW."""
        self.rank_bound = {module: int(r) for module, r in ranks.items()}

    def init_state(self, shapes: dict[str, tuple[int, int]]) -> GlobalState:
        """ΔW = 0 at rank 0, so that round 1's clients share one starting adapter (split_factors pads)."""
        state: GlobalState = {}
        for module, (m, n) in shapes.items():
            state[f"{module}.U"], state[f"{module}.S"], state[f"{module}.Vh"] = (
                torch.zeros(m, 0),
                torch.zeros(0),
                torch.zeros(0, n),
            )
            state[f"{module}.E"] = torch.zeros(1, dtype=torch.float64)
        return state

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState | None = None) -> GlobalState:
        """New global ΔW per module, weights ClientUpdate.weight (else n_k), normalised. The
        previous state is not needed: each client's factors already include the global slice it
        started from."""
        module_names(updates)  # every client sent the same modules
        return accumulate(FlexLoRAAccumulator(self, state), updates)

    def accumulator(self, state: GlobalState | None) -> Accumulator:
        return streaming_accumulator(self, FlexLoRA, FlexLoRAAccumulator, state)

    def truncation(self, state: GlobalState, module_ranks: dict[str, set[int]]) -> dict:
        """What handing each client rank its rank-r slice of ΔW loses (see truncation_summary)."""
        return truncation_summary(state, module_ranks)

    def client_factors(
        self, state: GlobalState | None, module_ranks: dict[str, int], lora_alpha: float
    ) -> dict[str, Factors] | None:
        """Per module, factors of the client's rank whose scaled product is the best
        rank-min(r, K) approximation of the global ΔW (rank 0: the shared initial adapter)."""
        if state is None:
            return None
        return {module: self._split(state, module, rank, lora_alpha) for module, rank in module_ranks.items()}

    def global_factors(self, state: GlobalState, lora_alpha: float) -> tuple[dict[str, Factors], dict[str, int]]:
        """The whole global ΔW per module as rank-K factors, and K per module."""
        ranks = {module: state[f"{module}.S"].shape[0] for module in state_modules(state)}
        ranks = {module: K for module, K in ranks.items() if K > 0}  # K = 0: no update yet
        return {module: self._split(state, module, K, lora_alpha) for module, K in ranks.items()}, ranks

    def global_singular_values(self, state: GlobalState) -> dict[str, torch.Tensor]:
        """S per module: the global adapter is U diag(S) Vh (global_factors only splits it)."""
        return {module: state[f"{module}.S"] for module in state_modules(state) if state[f"{module}.S"].shape[0] > 0}

    # The parameters a server optimizer steps (see server_opt.py): the dense ΔW per module.

    def server_params(self, state: GlobalState) -> dict[str, torch.Tensor]:
        return {module: dense_delta(state, module) for module in state_modules(state)}

    def from_server_params(self, params: dict[str, torch.Tensor], like: GlobalState) -> GlobalState:
        """The top-K SVD of each ΔW, K = the rank of that module in `like`."""
        out: GlobalState = {}
        for module, dense in params.items():
            out.update(self._dense_state(module, dense, like[f"{module}.S"].shape[0], like[f"{module}.U"].device))
        return out

    # Secure aggregation: clients upload s_k B_k A_k, the server sees only ΔW = Σ p_k s_k B_k A_k.

    def secure_summands(self) -> tuple[str, ...]:
        inherits_rule(self, FlexLoRA)
        return ("dense",)

    def from_secure_mean(
        self, mean: dict[str, torch.Tensor], state: GlobalState | None, lora_alpha: float, ranks: dict[str, list[int]]
    ) -> GlobalState:
        """The top-K SVD of each module's ΔW, K as in ``aggregate``: at most the clients' total
        rank Σ r_k, min(m, n), max_global_rank and the rank bound."""
        out: GlobalState = {}
        for module in mean_modules(mean, "dense"):
            dense = mean[f"{module}.dense"]
            m, n = dense.shape
            R = sum(ranks.get(module, ())) or min(m, n)
            K = min(R, m, n, self.max_global_rank or R, self.rank_bound.get(module, R))
            out.update(self._dense_state(module, dense, K, dense.device))
        return out

    def _dense_state(self, module: str, dense: torch.Tensor, K: int, home: torch.device) -> GlobalState:
        """A module's state (top-K SVD and energy) from its dense ΔW; the SVD runs on self.device."""
        device = self.device if self.device is not None else dense.device
        if self.svd_mode == "randomized":
            U, S, Vh = randomized_svd(dense.to(device), K, oversample=self.oversample, niter=self.niter, seed=self.seed)
        else:
            U, S, Vh = dense_svd(dense.to(device), K)
        U, S, Vh = (t.to(home).contiguous() for t in (U, S, Vh))
        energy = torch.linalg.vector_norm(dense, dtype=torch.float64).square().reshape(1).to(home)
        return {f"{module}.U": U, f"{module}.S": S, f"{module}.Vh": Vh, f"{module}.E": energy}

    def _split(self, state: GlobalState, module: str, rank: int, lora_alpha: float) -> Factors:
        try:
            U, S, Vh = (state[f"{module}.{part}"] for part in ("U", "S", "Vh"))
        except KeyError:
            raise KeyError(f"module {module!r} is not in the FlexLoRA state") from None
        pad_seed = module_seed(self.seed, module)
        return split_factors(U, S, Vh, rank, lora_alpha, self.split, pad_seed=pad_seed)
