"""The packed Flower transport (issue 32): one flat array per tensor field with a JSON index, both
ways. Round trips exact in float32 and within one rounding in float16 / bfloat16; the objects a
message costs; identical tasks sharing their stored copy; a malformed packed message refused with
one line, its client dropped and the round going on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from test_flower_grid import EchoGrid, _echo_setup

from flexlora import protocol
from flexlora.client import ClientTask
from flexlora.config import load_config
from flexlora.engines import flower
from flexlora.engines.flower.packed import check_index, pack, unpack


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    factors = {
        f"layer.{i}.{p}": (torch.randn(r, 12, generator=g), torch.randn(7, r, generator=g))
        for i, (p, r) in enumerate([("q", 2), ("up", 5)])
    }
    offset = {"layer.0.q": torch.randn(7, 12, generator=g)}
    deltas = {"layer.1.up": protocol.SparseDelta(torch.tensor([3, 40, 77]), torch.randn(3, generator=g), (7, 12))}
    return factors, offset, deltas


def _task(client="c-1"):
    factors, offset, _ = _tensors()
    return ClientTask(client, 2, "T2", {m: a.shape[0] for m, (a, _) in factors.items()}, factors, 5, {}, offset)


def test_packed_round_trip_is_exact_in_float32_both_ways(tiny_overrides):
    cfg = load_config(overrides=tiny_overrides)
    factors, offset, deltas = _tensors()
    content = flower.encode_task(_task(), cfg)
    assert set(content.array_records) == {flower.FACTORS, flower.OFFSET}
    assert all(list(r.keys()) == [flower.PACKED] for r in content.array_records.values())  # one array per field
    task, _ = flower.decode_task(content)
    for m, (A, B) in factors.items():
        assert torch.equal(task.factors[m][0], A) and torch.equal(task.factors[m][1], B)
    assert torch.equal(task.base_offset["layer.0.q"], offset["layer.0.q"])
    update = protocol.ClientUpdate("c-1", 9, 16.0, factors, {"train_loss_last": 0.5}, deltas)
    back = flower.decode_update(flower.encode_update(update, "float32"))
    assert back.deltas["layer.1.up"].indices.dtype == torch.int64
    assert torch.equal(back.deltas["layer.1.up"].indices, deltas["layer.1.up"].indices)
    assert torch.equal(back.deltas["layer.1.up"].values, deltas["layer.1.up"].values)
    assert back.deltas["layer.1.up"].shape == (7, 12) and back.metrics == update.metrics
    assert all(torch.equal(back.factors[m][1], B) for m, (_, B) in factors.items())


@pytest.mark.parametrize("dtype, unit_roundoff", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_16_bit_packing_is_one_rounding_and_half_the_bytes(dtype, unit_roundoff):
    factors, _, _ = _tensors()
    tensors = protocol.factors_to_tensors(factors)
    index32, data32 = pack(tensors, "float32")
    index16, data16 = pack(tensors, dtype)
    assert index16["nbytes"] * 2 == index32["nbytes"] == 4 * sum(t.numel() for t in tensors.values())
    back = unpack(data16, index16, "packed 'factors'")
    wire = getattr(torch, dtype)
    for name, t in tensors.items():
        assert back[name].dtype == torch.float32  # decoded for the math
        assert torch.equal(back[name], t.to(wire).float())  # exactly the dtype's round to nearest
        assert float(((back[name] - t).abs() / t.abs()).max()) <= unit_roundoff
    with pytest.raises(ValueError, match="is not finite as float16"):
        pack({"m.lora_A": torch.full((1, 2), 1e6)}, "float16")
    index, data = pack({"m.lora_A": torch.full((1, 2), 1e6)}, "bfloat16")  # float32's range
    assert unpack(data, index, "x")["m.lora_A"][0, 0] == pytest.approx(1e6, rel=2**-8)


def test_a_message_is_a_few_objects_and_identical_tasks_share_one_stored_copy(tiny_overrides, run_identity):
    """Counted from the structure (codec.message_objects) as Flower counts them; a 12 MiB field is
    one Array of 3 chunks instead of 2 Arrays (+ chunks) per module; two clients given the same
    factors share the packed Array, its chunks and its record (Flower stores and uploads them once)."""
    cfg = load_config(overrides=tiny_overrides)
    big = {f"layer.{i}.mlp": (torch.randn(128, 1024), torch.randn(1024, 128)) for i in range(12)}  # 24 x 0.5 MiB
    task = lambda cid: ClientTask(cid, 2, "T4", {m: 128 for m in big}, big, 1)  # noqa: E731
    messages = {}
    for packed in (True, False):
        messages[packed] = [
            Message(flower.encode_task(task(c), cfg, packed=packed), dst_node_id=n, message_type="train")
            for c, n in (("a", 1), ("b", 2))
        ]
        for m in messages[packed]:
            objects, size = flower.message_objects(m)
            assert objects == len(get_all_nested_objects(m))  # Flower's own count
            assert abs(size - flower.message_bytes(m)) < 0.01 * size
    packed, previous = (flower.message_objects(messages[p][0])[0] for p in (True, False))
    assert packed == 2 + 1 + 1 + 1 + 3  # Message, RecordDict, ConfigRecord, ArrayRecord, Array, 3 chunks of 5 MiB
    assert previous == 2 + 1 + 1 + 24 * 2  # one Array and one chunk per factor
    one, two = (get_all_nested_objects(m) for m in messages[True])
    shared = set(one) & set(two)
    assert len(shared) == 1 + 1 + 3  # the ArrayRecord, its Array and its chunks: stored once for both
    assert messages[True][0].content.array_records[flower.FACTORS][flower.PACKED].object_id in shared


def _packed_update(dtype="float32"):
    factors, _, _ = _tensors()
    content = flower.encode_update(protocol.ClientUpdate("c0", 3, 16.0, factors, {}), dtype)
    return content, json.loads(content.config_records[flower.UPDATE][flower.INDEX])


def _with_index(content, index):
    content.config_records[flower.UPDATE][flower.INDEX] = json.dumps(index)
    return content


def _entries(index):
    return index[flower.FACTORS]["tensors"]


def _corrupt_index_size(index):
    index[flower.FACTORS]["nbytes"] += 4


def _corrupt_overlap(index):
    _entries(index)[1][3] -= 4  # starts inside the first tensor


def _corrupt_past_end(index):
    _entries(index)[-1][3] += 8


def _corrupt_gap(index):
    _entries(index)[-1][2] = [1, 1]  # a smaller last tensor: bytes nobody describes


def _corrupt_dtype(index):
    _entries(index)[0][1] = "float64"


def _corrupt_duplicate(index):
    _entries(index)[1][0] = _entries(index)[0][0]


MALFORMED = {
    "index size not the array's": (_corrupt_index_size, r"packed 'factors': the index describes \d+ bytes, the array holds \d+"),
    "overlapping offsets": (_corrupt_overlap, r"packed 'factors': '.*' \(bytes \d+\.\.\d+\) overlaps '.*' \(bytes \d+\.\.\d+\)"),
    "offsets past the end": (
        _corrupt_past_end,
        r"packed 'factors': '.*' \(bytes \d+\.\.\d+\) runs past the end of the array \(\d+ bytes\)",
    ),
    "bytes no tensor covers": (_corrupt_gap, r"packed 'factors': the index covers \d+ of the array's \d+ bytes"),
    "unknown dtype": (_corrupt_dtype, r"packed 'factors': '.*' has dtype 'float64'"),
    "a name twice": (_corrupt_duplicate, r"packed 'factors': '.*' appears twice in the index"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_packed_message_is_one_line(case):
    corrupt, message = MALFORMED[case]
    content, index = _packed_update()
    corrupt(index)
    with pytest.raises(ValueError, match=message) as error:
        flower.decode_update(_with_index(content, index))
    assert "\n" not in str(error.value)


def test_a_packed_field_that_is_not_one_byte_vector_is_one_line():
    content, _ = _packed_update()
    content.array_records[flower.FACTORS][flower.PACKED] = Array(np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"packed 'factors': expected a 1-D uint8 vector, got float32"):
        flower.decode_update(content)
    content, _ = _packed_update()
    content.array_records[flower.FACTORS]["extra"] = content.array_records[flower.FACTORS][flower.PACKED]
    with pytest.raises(ValueError, match="packed 'factors': expected one array 'packed'"):
        flower.decode_update(content)
    content, index = _packed_update()
    del index[flower.FACTORS]
    with pytest.raises(ValueError, match="packed 'factors': the index does not describe it"):
        flower.decode_update(_with_index(content, index))
    with pytest.raises(ValueError, match="the index is not"):
        check_index({"nbytes": 3}, 3, "packed 'factors'")


class CorruptingGrid(EchoGrid):
    """Node 101's replies carry a packed array whose index overlaps itself."""

    def _answer(self, m):
        reply = super()._answer(m)
        if m.metadata.dst_node_id == 101:
            record = reply.content.config_records[flower.UPDATE]
            index = json.loads(record[flower.INDEX])
            index[flower.FACTORS]["tensors"][1][3] -= 4
            record[flower.INDEX] = json.dumps(index)
        return reply


def test_a_malformed_reply_drops_its_client_and_the_round_goes_on(tiny_overrides, run_identity):
    strategy, _, tasks = _echo_setup(tiny_overrides, 3)
    grid = CorruptingGrid([100, 101, 102])
    results = {r.client_id: r for r in flower.FlowerRuntime(strategy, grid).train(tasks)}
    assert isinstance(results["c0"], protocol.ClientUpdate) and isinstance(results["c2"], protocol.ClientUpdate)
    failure = results["c1"]
    assert isinstance(failure, protocol.ClientFailure) and "\n" not in failure.reason
    assert failure.reason.startswith("bad reply: ValueError: packed 'factors': ") and "overlaps" in failure.reason


def test_an_empty_field_is_its_index_alone():
    """An update without sparse deltas carries no 'deltas' arrays (three Flower objects fewer),
    and decodes to an empty field."""
    factors, _, _ = _tensors()
    content = flower.encode_update(protocol.ClientUpdate("c0", 3, 16.0, factors, {}), "float32")
    assert set(content.array_records) == {flower.FACTORS}
    assert json.loads(content.config_records[flower.UPDATE][flower.INDEX])[flower.DELTAS] == {"nbytes": 0, "tensors": []}
    assert flower.decode_update(content).deltas == {}
    content, index = _packed_update()
    index[flower.DELTAS] = {"nbytes": 4, "tensors": [["x.values", "float32", [1], 0]]}
    with pytest.raises(ValueError, match="the message lacks its 'deltas' arrays"):
        flower.decode_update(_with_index(content, index))


def test_packed_float16_is_the_per_array_layouts_float16_value_for_value():
    """The same rounding as the previous layout's (numpy's astype): docs/flower.md's measured
    effect of float16 transport on Rouge-L holds for the packed transport unchanged."""
    factors, _, _ = _tensors()
    tensors = protocol.factors_to_tensors(factors)
    index, data = pack(tensors, "float16")
    packed = unpack(data, index, "x")
    previous = flower.record_to_tensors(flower.tensors_to_record(tensors, "float16"))
    assert all(torch.equal(packed[name], previous[name]) for name in tensors)
