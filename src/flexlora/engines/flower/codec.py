"""The Flower codec: protocol objects (flexlora.protocol) <-> Flower records, no pickle.

A protocol object is flattened once (protocol.flatten) and each of its tensor fields becomes an
ArrayRecord named after the field ("factors": `<module>.lora_A` / `<module>.lora_B`;
"base_offset": one dense (out, in) array per module; "deltas": `<module>.indices` int64 and
`<module>.values`), floating-point arrays in `flower.transport_dtype` (float32 or float16); its
metadata is JSON in a ConfigRecord ("task", with the experiment config beside it, or "update").
A new payload field of the protocol needs no change here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from flexlora.config import ExperimentConfig, config_from_dict

if TYPE_CHECKING:
    import torch

    from flexlora.protocol import ClientTask, ClientUpdate, Factors

TASK, UPDATE, FACTORS, NODE = "task", "update", "factors", "node"
OFFSET, DELTAS = "base_offset", "deltas"  # the protocol's other tensor fields (see protocol.flatten)
DTYPES = {"float32": np.float32, "float16": np.float16}


def tensors_to_record(tensors: dict[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    """Named tensors as an ArrayRecord: floating-point ones cast to the transport dtype (and
    checked finite in it), integer ones as int64."""
    import torch

    record = ArrayRecord()
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if t.is_floating_point():
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


def encode(obj, dtype: str, meta_record: str, **extra: str) -> RecordDict:
    """A protocol object as Flower records: each tensor field of protocol.flatten as an
    ArrayRecord named after the field, the metadata as JSON in ConfigRecord `meta_record`
    (with `extra` JSON strings beside it). No method-specific code: a new payload field of
    the protocol travels as it is."""
    from flexlora import protocol  # torch: only where tensors are

    tensors, meta = protocol.flatten(obj)
    grouped: dict[str, dict] = {name: {} for name in meta["tensor_fields"]}
    for key, t in tensors.items():
        name, _, rest = key.partition("/")
        grouped[name][rest] = t
    content = RecordDict({meta_record: ConfigRecord({meta_record: json.dumps(meta), **extra})})
    for name, group in grouped.items():
        content[name] = tensors_to_record(group, dtype)
    return content


def decode(content: RecordDict, meta_record: str):
    """The inverse of encode (one-line ValueError on a malformed message)."""
    from flexlora import protocol  # torch: only where tensors are

    meta = json.loads(content.config_records[meta_record][meta_record])
    tensors = {}
    for name in meta.get("tensor_fields", ()):
        if name not in content.array_records:
            raise ValueError(f"the message lacks its {name!r} arrays")
        tensors.update({f"{name}/{k}": v for k, v in record_to_tensors(content.array_records[name]).items()})
    return protocol.unflatten(tensors, meta)


def encode_task(task: ClientTask, cfg: ExperimentConfig) -> RecordDict:
    return encode(task, cfg.flower.transport_dtype, TASK, config=json.dumps(cfg.to_dict()))


def decode_task(content: RecordDict) -> tuple[ClientTask, ExperimentConfig]:
    task = decode(content, TASK)
    # Checked on the server already; paths in it are the server's, not this node's.
    cfg = config_from_dict(json.loads(content.config_records[TASK]["config"]), check=False)
    return task, cfg


def encode_update(update: ClientUpdate, dtype: str) -> RecordDict:
    return encode(update, dtype, UPDATE)


def decode_update(content: RecordDict) -> ClientUpdate:
    from flexlora import protocol  # torch: only where tensors are

    update = decode(content, UPDATE)
    if not isinstance(update, protocol.ClientUpdate):
        raise ValueError(f"expected a ClientUpdate, got a {type(update).__name__}")
    return update


def message_bytes(message: Message) -> int:
    """Bytes Flower transfers for a message: its serialized objects (identical array chunks,
    e.g. all-zero B matrices, are sent once). TLS/HTTP framing is not included."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the tensors alone (numel x itemsize): LoRA factors, and a base offset or sparse
    deltas where the method sends them."""
    return sum(
        int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        for key in (FACTORS, OFFSET, DELTAS)
        if key in content.array_records
        for a in content.array_records[key].values()
    )
