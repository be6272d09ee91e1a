"""The Flower codec: protocol objects (flexlora.protocol) <-> Flower records, no pickle.

A protocol object is flattened once (protocol.flatten); its metadata is JSON in a ConfigRecord
("task", with the experiment config beside it, or "update"), and each of its tensor fields
("factors": `<module>.lora_A` / `<module>.lora_B`; "base_offset": one dense (out, in) tensor
per module; "deltas": `<module>.indices` int64 and `<module>.values`) becomes an ArrayRecord
named after the field holding ONE packed Array (packed.py): the field's tensors back to back,
floating-point ones in `flower.transport_dtype`, described by a JSON index (names, dtypes,
shapes, offsets) in the ConfigRecord's "index" entry. A SmolLM2 task is then a few dozen Flower
objects instead of 844, and a node sends its reply in the layout its task came in.

The previous layout, one Array per tensor ("per-array"), is kept as the deployment bench's
baseline only (`flexlora bench deployment`, engine `previous+workers`): it is what a message
carries when its ConfigRecord has no index, and a ServerApp sends it only when
FLEXLORA_BENCH_PREVIOUS_TRANSPORT is set in its environment.

A new payload field of the protocol needs no change here.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, SType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from flexlora.engines.flower.packed import npy_payload, pack, unpack

if TYPE_CHECKING:
    import torch

    from flexlora.config import ExperimentConfig
    from flexlora.protocol import ClientTask, ClientUpdate, Factors

TASK, UPDATE, FACTORS, NODE = "task", "update", "factors", "node"
OFFSET, DELTAS = "base_offset", "deltas"  # the protocol's other tensor fields (see protocol.flatten)
INDEX = "index"  # ConfigRecord entry: the JSON index of every packed field
PACKED = "packed"  # the one Array of a packed field's ArrayRecord
DTYPES = {"float32": np.float32, "float16": np.float16}  # the per-array (previous) layout's dtypes


def packed_array(data: bytes) -> Array:
    """A packed field's .npy bytes as a Flower Array, as they are (no copy, no conversion)."""
    return Array(dtype="uint8", shape=(len(npy_payload(data, "packed array")),), stype=SType.NUMPY, data=data)


def is_packed(content: RecordDict, meta_record: str) -> bool:
    """True when the message's tensors are packed (its ConfigRecord carries their index)."""
    record = content.config_records.get(meta_record)
    return record is not None and INDEX in record


# ---------------------------------------------------------------- the previous, per-array layout


def tensors_to_record(tensors: dict[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    """Named tensors as an ArrayRecord of one Array each: floating-point ones cast to the
    transport dtype (and checked finite in it), integer ones as int64 (the per-array layout)."""
    import torch

    record = ArrayRecord()
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if t.is_floating_point():
            if dtype not in DTYPES:
                raise ValueError(f"the per-array layout carries float32 or float16, not {dtype}")
            array = t.to(torch.float32).numpy().astype(DTYPES[dtype])
            if not np.isfinite(array).all():
                raise ValueError(f"{name} is not finite as {dtype} (overflow?); use flower.transport_dtype=float32")
        else:
            array = t.numpy().astype(np.int64)
        record[name] = Array(array)
    return record


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The inverse of tensors_to_record: float32 and int64 tensors."""
    import torch

    out = {}
    for name, array in record.items():
        value = array.numpy()
        out[name] = torch.from_numpy(value.astype(np.int64 if np.issubdtype(value.dtype, np.integer) else np.float32))
    return out


def factors_to_record(factors: dict[str, Factors], dtype: str = "float32") -> ArrayRecord:
    """LoRA factors as an ArrayRecord (`<module>.lora_A` / `.lora_B`), cast to the transport dtype."""
    from flexlora import protocol  # torch: only where tensors are

    return tensors_to_record(protocol.factors_to_tensors(factors), dtype)


def record_to_factors(record: ArrayRecord) -> dict[str, Factors]:
    """The inverse of factors_to_record, as float32 tensors."""
    from flexlora import protocol  # torch: only where tensors are

    return protocol.tensors_to_factors(record_to_tensors(record))


# ---------------------------------------------------------------- protocol objects <-> records


def encode(obj, dtype: str, meta_record: str, *, packed: bool = True, **extra: str) -> RecordDict:
    """A protocol object as Flower records: the metadata as JSON in ConfigRecord `meta_record`
    (with `extra` JSON strings beside it), each tensor field of protocol.flatten as an ArrayRecord
    named after the field: one packed Array and its index (default), or one Array per tensor
    (`packed=False`, the previous layout). No method-specific code."""
    from flexlora import protocol  # torch: only where tensors are

    tensors, meta = protocol.flatten(obj)
    grouped: dict[str, dict] = {name: {} for name in meta["tensor_fields"]}
    for key, t in tensors.items():
        name, _, rest = key.partition("/")
        grouped[name][rest] = t
    config = {meta_record: json.dumps(meta), **extra}
    records: dict[str, ArrayRecord] = {}
    if packed:
        index = {}
        for name, group in grouped.items():
            index[name], data = pack(group, dtype)
            if group:  # an empty field (an update without sparse deltas) is its index alone
                records[name] = ArrayRecord({PACKED: packed_array(data)})
        config[INDEX] = json.dumps(index, separators=(",", ":"))
    else:
        records = {name: tensors_to_record(group, dtype) for name, group in grouped.items()}
    content = RecordDict({meta_record: ConfigRecord(config)})
    for name, record in records.items():
        content[name] = record
    return content


def decode(content: RecordDict, meta_record: str):
    """The inverse of encode, either layout (one-line ValueError on a malformed message)."""
    from flexlora import protocol  # torch: only where tensors are

    meta = json.loads(content.config_records[meta_record][meta_record])
    index = json.loads(content.config_records[meta_record][INDEX]) if is_packed(content, meta_record) else None
    if index is not None and not isinstance(index, dict):
        raise ValueError("the message's index is not a JSON object")
    fields = meta.get("tensor_fields", ())
    if index is not None and set(index) - set(fields):
        raise ValueError(f"the index describes a field the message does not carry: {sorted(set(index) - set(fields))[0]!r}")
    tensors = {}
    for name in fields:
        if index is not None and index.get(name) == {"nbytes": 0, "tensors": []} and name not in content.array_records:
            continue  # an empty field
        if name not in content.array_records:
            raise ValueError(f"the message lacks its {name!r} arrays")
        record = content.array_records[name]
        if index is None:
            group = record_to_tensors(record)
        else:
            if list(record.keys()) != [PACKED]:
                raise ValueError(f"packed {name!r}: expected one array {PACKED!r}, got {sorted(record.keys())[:3]}")
            if name not in index:
                raise ValueError(f"packed {name!r}: the index does not describe it")
            group = unpack(record[PACKED].data, index[name], f"packed {name!r}")
        tensors.update({f"{name}/{k}": v for k, v in group.items()})
    return protocol.unflatten(tensors, meta)


def encode_task(task: ClientTask, cfg: ExperimentConfig, packed: bool = True) -> RecordDict:
    return encode(task, cfg.flower.transport_dtype, TASK, packed=packed, config=json.dumps(cfg.to_dict()))


def decode_task(content: RecordDict) -> tuple[ClientTask, ExperimentConfig]:
    from flexlora.config import config_from_dict  # pydantic's schema: not on the worker path's ClientApp

    task = decode(content, TASK)
    # Checked on the server already; paths in it are the server's, not this node's.
    cfg = config_from_dict(json.loads(content.config_records[TASK]["config"]), check=False)
    return task, cfg


def encode_update(update: ClientUpdate, dtype: str, packed: bool = True) -> RecordDict:
    return encode(update, dtype, UPDATE, packed=packed)


def decode_update(content: RecordDict) -> ClientUpdate:
    from flexlora import protocol  # torch: only where tensors are

    update = decode(content, UPDATE)
    if not isinstance(update, protocol.ClientUpdate):
        raise ValueError(f"expected a ClientUpdate, got a {type(update).__name__}")
    return update


# ---------------------------------------------------------------- what a message costs


def message_objects(message: Message) -> tuple[int, int]:
    """(Flower objects, bytes) of a message, counted from its structure without serialising or
    hashing anything: the Message, its RecordDict, each record, each Array and each of its
    5 MiB chunks; the bytes of every array's data (.npy header included) and of every
    ConfigRecord's values. Flower sends identical chunks once; this counts each (an upper bound,
    equal unless a message repeats 5 MiB of identical bytes). Object headers (~100 bytes each)
    are not counted."""
    content = message.content
    objects, size = 2, 0  # the Message and its RecordDict
    for record in content.array_records.values():
        objects += 1
        for array in record.values():
            objects += 1 + math.ceil(len(array.data) / FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
            size += len(array.data)
    for record in (*content.config_records.values(), *content.metric_records.values()):
        objects += 1
        size += sum(len(k) + len(str(v)) for k, v in record.items())
    return objects, size


def message_bytes(message: Message) -> int:
    """Bytes Flower transfers for a message: its serialized objects (identical array chunks,
    e.g. all-zero B matrices, are sent once). TLS/HTTP framing is not included. This serialises
    and hashes every object: tests and measurements only (the runtime uses message_objects)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the tensors alone (numel x itemsize): LoRA factors, and a base offset or sparse
    deltas where the method sends them (a packed field: its payload, the tensors back to back)."""
    return sum(
        int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        for key in (FACTORS, OFFSET, DELTAS)
        if key in content.array_records
        for a in content.array_records[key].values()
    )
