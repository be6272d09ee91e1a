"""What a newcomer registers, and what the registrations are for: a method that changes the base
weights says so itself (``Method.changes_base_weights``), and the configuration's rules read it;
a data source is one ``register_source`` (its loader and its own checks)."""

from __future__ import annotations

import pytest

from flexlora.config import ConfigError, load_config
from flexlora.methods import METHODS
from flexlora.methods.base import Method

BASE = ["model=tiny-llama", "device=cpu"]


# ---------------------------------------------------------------- methods that change the base weights


def _has_base_offset(cls: type) -> bool:
    return cls.base_offset is not Method.base_offset


def test_a_method_changes_the_base_weights_exactly_when_it_has_a_base_offset():
    # A base offset is a dense change of the base weights (clients train on base + offset,
    # evaluation and export include it): FLoRA and FLoRIST merge every round's update, SLoRA's
    # first stage trains the weights, FedEx-LoRA folds its residual in.
    declared = {name for name, cls in METHODS.items() if cls.changes_base_weights}
    assert declared == {name for name, cls in METHODS.items() if _has_base_offset(cls)}
    assert {"flora", "florist", "slora", "fedex"} <= declared


@pytest.mark.parametrize("method", sorted(name for name, cls in METHODS.items() if _has_base_offset(cls)))
def test_a_method_that_changes_the_base_needs_a_float32_unquantized_base(method):
    # Fails on the code before changes_base_weights for fedex and florist: config.py named
    # ("flora", "slora") only, so `method=fedex quantization=nf4` passed the checks and the run
    # stopped after round 1's training ("base offset of shape (256, 688) for a weight of shape
    # (88064, 1)": a 4-bit weight cannot take the offset), and `model_dtype=bfloat16` was let
    # through to add the offset to 16-bit weights, the rounding the rule exists to prevent
    # (tests/test_memory.py checks flora and slora the same way).
    with pytest.raises(ConfigError, match=f"quantization: nf4 cannot be used with method={method}") as err:
        load_config(overrides=[*BASE, f"method={method}", "quantization=nf4", "model_dtype=bfloat16"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=f"model_dtype: method={method} changes the base weights"):
        load_config(overrides=[*BASE, f"method={method}", "model_dtype=bfloat16"])


@pytest.mark.parametrize("method", ["flexlora", "fedit", "hetlora"])
def test_an_adapter_method_takes_a_16_bit_or_4_bit_base(method):
    cfg = load_config(overrides=[*BASE, f"method={method}", "quantization=nf4", "model_dtype=bfloat16"])
    assert (cfg.quantization, cfg.model_dtype) == ("nf4", "bfloat16")


# ---------------------------------------------------------------- data sources


@pytest.fixture
def sources(monkeypatch):
    """The data-source registry, restored after the test (a source a test registers is gone)."""
    from flexlora.data import sources as module

    monkeypatch.setattr(module, "SOURCES", dict(module.SOURCES))
    return module


def _shards_source(sources, seen: dict):
    """A source registered the way a newcomer would: one text file, one client per line, the
    i-th client with i + 1 copies of its example; at most 3 clients (its own rule)."""
    from pathlib import Path

    from flexlora.data.records import Issues
    from flexlora.data.types import ClientData, Example

    def at_most_three(cfg):
        if cfg.num_clients > 3:
            raise ConfigError(f"data.num_clients: a shards file holds at most 3 clients, got {cfg.num_clients}")

    @sources.register_source("shards", check=at_most_three)
    def load(cfg, seed, for_training):
        seen.update(seed=seed, for_training=for_training)
        names = Path(cfg.path).read_text().split()
        clients = [ClientData(name, "letters", [Example(f"say {name}", "", name)] * (i + 1)) for i, name in enumerate(names)]
        return sources.assemble(cfg, clients, Issues(cfg.bad_records), for_training=for_training)


def test_a_registered_source_is_loadable_through_the_config(sources, tmp_path):
    seen: dict = {}
    _shards_source(sources, seen)
    path = tmp_path / "shards.txt"
    path.write_text("alpha\nbeta\ngamma\n")
    cfg = load_config(
        overrides=[*BASE, "data.source=shards", f"data.path={path}", "data.heldout_ids=[gamma]", "data.num_clients=3"]
    )
    dataset = sources.load_federated_dataset(cfg.data, seed=5)
    assert seen == {"seed": 5, "for_training": True}
    assert dataset.name == "shards"
    assert [(c.client_id, len(c.train)) for c in dataset.clients] == [("alpha", 1), ("beta", 2)]
    # held out by the common rule (data.heldout_ids): evaluated on all its 3 examples, trains on none
    assert [(c.client_id, len(c.train), len(c.test)) for c in dataset.heldout] == [("gamma", 0, 3)]
    assert sources.load_federated_dataset(cfg.data, seed=5, for_training=False).name == "shards"
    assert seen == {"seed": 5, "for_training": False}

    # the source's own rule and the common ones, at config time, one line each
    for overrides, message in [
        (["data.num_clients=4"], "data.num_clients: a shards file holds at most 3 clients, got 4"),
        (["data.path=null"], "data.path: data.source=shards needs data.path (a folder or file)"),
        ([f"data.path={tmp_path / 'missing.txt'}"], "data.path: not found"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(overrides=[*BASE, "data.source=shards", f"data.path={path}", "data.num_clients=3", *overrides])
        assert message in str(err.value) and "\n" not in str(err.value)


def test_an_unknown_source_is_one_line_listing_the_registered_ones(sources):
    _shards_source(sources, {})
    expected = "data.source: unknown data source 'parquet'; choose from: synthetic, natural-instructions, dolly, json, hf, shards"
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[*BASE, "data.source=parquet"])
    assert str(err.value) == expected
    cfg = load_config(overrides=BASE)
    cfg.data.source = "parquet"  # a config that skipped the checks (e.g. check=False) still gets the line
    with pytest.raises(ConfigError) as err:
        sources.load_federated_dataset(cfg.data, seed=0)
    assert str(err.value) == expected


def test_a_source_name_is_registered_once(sources):
    with pytest.raises(ValueError, match="data source 'json' is already registered"):
        sources.register_source("json")(lambda cfg, seed, for_training: None)


def test_weighting_by_source_size_needs_natural_instructions_and_says_so_at_config_time(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"instruction": "a", "output": "b", "client": "c0"}\n')
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[*BASE, "data.source=json", f"data.path={path}", "data.weight_by=source"])
    assert str(err.value) == "data.weight_by: 'source' needs a natural-instructions clients.json, not data.source=json"
