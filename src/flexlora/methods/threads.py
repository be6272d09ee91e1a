"""CPU threads for the aggregation's many small linear-algebra steps: when to run a block on one
intra-op thread (``small_work_threads``, ``one_cpu_thread``), per-module work side by side
(``map_modules``), and numpy's bundled OpenBLAS (``openblas``: its ?syevr, used by
svd.top_eigh, and its thread count).

Why: a chain of small LAPACK steps ends each step at a thread barrier, and on a busy machine a
barrier waits for a descheduled thread (measurements below and in docs/baselines.md).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

# Tall-skinny QR and the small core SVD are chains of small LAPACK steps, each ending at a
# thread barrier; on a busy machine a barrier waits for a descheduled thread. Measured here
# (2 shared cores): QR of a 5504×272 matrix 35-50 ms on one thread, 240-700 ms on two. The
# factored kernel runs on one CPU thread while its work is below this many flops. The same
# holds for the dense kernel on small modules (SmolLM2's 576×1536, ΔW of 10 rank-200 clients,
# measured on the 2 shared cores: product + top-200 0.1 s on one thread, 4-12 s on two).
SINGLE_THREAD_MAX_FLOPS = 4e9
DENSE_SINGLE_THREAD_MAX_FLOPS = 1e10  # per step of the dense route (see dense_flops)


def dense_flops(m: int, n: int, R: int, group_rank: int = 2048) -> float:
    """About the largest single step of the dense route: one group's product of stacked
    factors (2mn·min(R, group_rank), see helpers.delta_matrix), plus the Gram matrix of the
    smaller side and its eigen-decomposition."""
    p, q = min(m, n), max(m, n)
    return 2.0 * m * n * min(R, group_rank) + 2.0 * p * p * q + 9.0 * p**3


def factored_flops(m: int, n: int, R: int) -> float:
    """About the work of the factored route (QR of both factors and the R×R core SVD)."""
    return 4.0 * (m + n) * R * R + 20.0 * R**3


def small_work_threads(flops: float, device, limit: float = DENSE_SINGLE_THREAD_MAX_FLOPS):
    """One CPU thread for a block of about `flops` of work up to `limit` (see above); the
    process's threads otherwise, or off the CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _cpu_threads(1 if flops <= limit else torch.get_num_threads(), device)


def one_cpu_thread():
    """torch's intra-op CPU threads capped at one for the block (small work, see above)."""
    return _cpu_threads(1, torch.device("cpu"))


@contextmanager
def _cpu_threads(n: int, device: torch.device):
    """torch's intra-op CPU threads capped at n for the block (process-wide, restored after).
    Inside map_modules's workers the process is already on one thread: it changes nothing."""
    previous = torch.get_num_threads()
    if device.type != "cpu" or n >= previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# Per-module work (a factored or dense SVD of one target module) is a chain of small LAPACK
# steps whose thread barriers are what a busy machine punishes (above). map_modules runs
# modules side by side instead: one worker per CPU thread, each on one intra-op thread, so the
# cores stay busy without barriers. Measured here (2 idle cores, the 210 SmolLM2 modules of a
# default-run round, captured client updates): 13.3 s one module at a time, 6.9 s side by side.


def map_modules(fn, items: list, device) -> list:
    """[fn(item) for item in items], on the CPU spread over torch.get_num_threads() workers
    that each use one intra-op thread (and numpy's OpenBLAS on one thread, see top_eigh); off
    the CPU (device None: items on several devices), or with one thread or one item, a plain
    loop. fn must not depend on the order in which the items run."""
    workers = min(torch.get_num_threads(), len(items))
    if device is None or torch.device(device).type != "cpu" or workers <= 1:
        return [fn(item) for item in items]
    lapack = openblas()
    blas_threads = lapack[1]() if lapack is not None else None
    if lapack is not None:
        lapack[2](1)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # process-wide: every worker's ops run on one thread
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(torch_threads)
        if lapack is not None:
            lapack[2](blas_threads)


# numpy's Linux/macOS wheels bundle OpenBLAS with all of LAPACK (ILP64 LAPACKE, symbols
# prefixed "scipy_"); torch does not expose ?syevr (see svd.PARTIAL_EIGH), so it is called
# through ctypes when present, and map_modules keeps OpenBLAS on one thread per worker.
_openblas_cache: list = []  # [(functions by dtype, get_threads, set_threads)] or [None]


def openblas():
    """numpy's OpenBLAS as (LAPACKE ?syevr by torch dtype, get_threads, set_threads), or None when
    it is not there (loaded once)."""
    if not _openblas_cache:
        _openblas_cache.append(None)
        try:
            import ctypes
            import glob
            import os

            import numpy

            found = glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs", "libscipy_openblas64_*"))
            lib = ctypes.CDLL(sorted(found)[0])
            i64 = ctypes.c_int64
            functions = {}
            for dtype, name, real in (
                (torch.float32, "scipy_LAPACKE_ssyevr64_", ctypes.c_float),
                (torch.float64, "scipy_LAPACKE_dsyevr64_", ctypes.c_double),
            ):
                f = getattr(lib, name)
                f.restype = i64
                f.argtypes = [
                    ctypes.c_int,
                    ctypes.c_char,
                    ctypes.c_char,
                    ctypes.c_char,
                    i64,
                    ctypes.c_void_p,
                    i64,
                    real,
                    real,
                    i64,
                    i64,
                    real,
                    ctypes.POINTER(i64),
                    ctypes.c_void_p,
                    ctypes.c_void_p,
                    i64,
                    ctypes.c_void_p,
                ]
                functions[dtype] = f
            get_threads, set_threads = lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_
            get_threads.restype, set_threads.argtypes = ctypes.c_int, [ctypes.c_int]
            _openblas_cache[0] = (functions, get_threads, set_threads)
        except (ImportError, IndexError, OSError, AttributeError):
            pass
    return _openblas_cache[0]
