"""One flat array per tensor field: named tensors packed into a single byte vector, described by
a small JSON index (issue 32).

Flower stores every Array as one object plus one object per 5 MiB chunk, and each object is its
own request at every hop: a SmolLM2 task of 420 LoRA factors was 844 objects. Packed, a field is
one Array of uint8 (numpy's .npy format, so `Array.numpy()` still works and nothing is pickled)
holding the tensors back to back; its index lists, per tensor, `[name, dtype, shape, offset]`
(offset in bytes into the payload) and the payload's size. Floating-point tensors travel in the
transport dtype (float32, float16 or bfloat16), integer ones (sparse indices) as int64.

A packed field whose index does not describe its array exactly is refused with one line naming
the field and the tensor: sizes that disagree, a tensor that runs past the end, two that
overlap, bytes no tensor covers, a bad name, dtype or shape.

Pure numpy here (torch only to pack and unpack tensors), so that the ClientApp on the node-worker
path can forward a packed payload without importing torch.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

WIRE_DTYPES = ("float32", "float16", "bfloat16")  # flower.transport_dtype
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}
_NPY_LIMIT = 1 << 16  # an .npy header is at most this long (format 2.0 allows 4 GiB, never used here)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}[name]


def npy_header(nbytes: int) -> bytes:
    """The .npy header of a uint8 vector of `nbytes` bytes (what np.save writes before the data)."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": (nbytes,)})
    return out.getvalue()


def npy_payload(data: bytes | memoryview, where: str) -> memoryview:
    """The payload of an .npy-format uint8 vector, without copying it; one-line ValueError when
    `data` is anything else."""
    view = memoryview(data)
    head = io.BytesIO(bytes(view[:_NPY_LIMIT]))
    try:
        version = np.lib.format.read_magic(head)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(head)
    except ValueError as e:
        raise ValueError(f"{where}: not an .npy byte vector ({str(e).splitlines()[0]})") from None
    if dtype != np.uint8 or len(shape) != 1 or fortran:
        raise ValueError(f"{where}: expected a 1-D uint8 vector, got {dtype} of shape {shape}")
    payload = view[head.tell() :]
    if len(payload) != shape[0]:
        raise ValueError(f"{where}: its header says {shape[0]} bytes, it holds {len(payload)}")
    return payload


def pack(tensors: dict[str, torch.Tensor], dtype: str = "float32") -> tuple[dict, bytes]:
    """(index, .npy bytes) of named tensors packed back to back: floating-point ones cast to
    `dtype` (and checked finite in it), integer ones as int64. The index is
    {"nbytes": payload size, "tensors": [[name, dtype, shape, offset], ...]}."""
    import torch

    if dtype not in WIRE_DTYPES:
        raise ValueError(f"transport dtype must be one of {', '.join(WIRE_DTYPES)}, got {dtype!r}")
    parts, entries, offset = [], [], 0
    for name, t in tensors.items():
        t = t.detach()
        if t.is_floating_point():
            kind, t = dtype, t.to(device="cpu", dtype=_torch_dtype(dtype))
            if t.numel() and not all(map(math.isfinite, torch.aminmax(t))):  # one pass; NaN propagates
                raise ValueError(f"{name} is not finite as {dtype} (overflow?); use flower.transport_dtype=float32")
        else:
            kind, t = "int64", t.to(device="cpu", dtype=torch.int64)
        entries.append([name, kind, list(tensors[name].shape), offset])
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()  # the bytes as they are (bfloat16 has no numpy dtype)
        parts.append(memoryview(raw))
        offset += raw.size
    # One copy, straight into the message's bytes (join takes the tensors' buffers as they are).
    return {"nbytes": offset, "tensors": entries}, b"".join([npy_header(offset), *parts])


def check_index(index, size: int, where: str) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """The index's tensors as (name, dtype, shape, offset, nbytes), sorted by offset, if they
    cover the `size`-byte payload exactly, each once; else a one-line ValueError."""
    if not isinstance(index, dict) or not isinstance(index.get("tensors"), list):
        raise ValueError(f"{where}: the index is not {{'nbytes': N, 'tensors': [...]}}")
    if index.get("nbytes") != size:
        raise ValueError(f"{where}: the index describes {index.get('nbytes')!r} bytes, the array holds {size}")
    entries, names = [], set()
    for entry in index["tensors"]:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise ValueError(f"{where}: an index entry is not [name, dtype, shape, offset]: {str(entry)[:80]}")
        name, kind, shape, offset = entry
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: a tensor name is not a non-empty string: {name!r}")
        if name in names:
            raise ValueError(f"{where}: {name!r} appears twice in the index")
        names.add(name)
        if kind not in ITEMSIZE:
            raise ValueError(f"{where}: {name!r} has dtype {kind!r}; allowed: {', '.join(ITEMSIZE)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"{where}: {name!r} has shape {shape!r}, not a list of sizes")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"{where}: {name!r} has offset {offset!r}, not a byte offset")
        nbytes = math.prod(shape) * ITEMSIZE[kind]
        if offset + nbytes > size:
            raise ValueError(
                f"{where}: {name!r} (bytes {offset}..{offset + nbytes}) runs past the end of the array ({size} bytes)"
            )
        entries.append((name, kind, tuple(shape), offset, nbytes))
    entries.sort(key=lambda e: e[3])
    for before, after in zip(entries, entries[1:]):
        if after[3] < before[3] + before[4]:
            raise ValueError(
                f"{where}: {after[0]!r} (bytes {after[3]}..{after[3] + after[4]}) overlaps "
                f"{before[0]!r} (bytes {before[3]}..{before[3] + before[4]})"
            )
    covered = sum(e[4] for e in entries)
    if covered != size:
        raise ValueError(f"{where}: the index covers {covered} of the array's {size} bytes")
    return entries


def unpack(data: bytes | memoryview, index, where: str) -> dict[str, torch.Tensor]:
    """The inverse of pack: float32 and int64 tensors in index order (one-line ValueError on a
    malformed array or index)."""
    import torch

    payload = npy_payload(data, where)
    entries = {e[0]: e for e in check_index(index, len(payload), where)}
    out = {}
    for name, *_ in index["tensors"]:
        _, kind, shape, offset, nbytes = entries[name]
        if nbytes == 0:  # an empty tensor (e.g. no sparse entries): nothing to view
            t = torch.empty(shape, dtype=_torch_dtype(kind))
        else:
            raw = np.frombuffer(payload, dtype=np.uint8, count=nbytes, offset=offset).copy()  # owned, aligned
            t = torch.from_numpy(raw).view(_torch_dtype(kind)).reshape(shape)
        out[name] = t if kind in ("float32", "int64") else t.to(torch.float32)
    return out
