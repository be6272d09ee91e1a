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
