"""Experiment configuration: loaded from YAML plus `key=value` overrides into the typed dataclasses
of flexlora.schema (re-exported here).

Every value is checked before any work starts; a bad one is a ConfigError whose message
names the key and the problem in one line. A method's arguments (method_args) are checked by
building the method (its constructor's one-line errors).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from flexlora.errors import ConfigError  # noqa: F401  (re-exported)
from flexlora.schema import (  # noqa: F401  (re-exported)
    DataConfig,
    ResourcesConfig,
    LoraSettings,
    FederationConfig,
    TrainConfig,
    EvalConfig,
    OutputConfig,
    FlowerConfig,
    ExperimentConfig,
)


def _coerce(value, annotation, key: str):
    """Check/convert one value against its type annotation (a small subset of typing)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '2e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; known keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, object]:
    """`train.lr=1e-4` -> ('train.lr', 1e-4); the value is parsed as YAML (so lists work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = _build(ExperimentConfig, tree)
    validate(config)
    return config


def config_from_dict(tree: dict, check: bool = True) -> ExperimentConfig:
    """An ExperimentConfig from a plain mapping (e.g. `to_dict()` sent to a Flower client).
    `check=False` skips the value checks that look at this machine (paths), for a config that
    was already checked where it was written."""
    config = _build(ExperimentConfig, tree)
    if check:
        validate(config)
    return config


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(c: ExperimentConfig) -> None:
    """Value checks that types alone cannot express."""
    from flexlora.methods import METHODS, compose_method
    from flexlora.data.prompts import TEMPLATES
    from flexlora.resources import PROFILES, paper_rank_types

    _require(c.method in METHODS, f"method: unknown aggregation method '{c.method}'; choose from: {', '.join(METHODS)}")
    try:  # constructing a method is cheap and checks its arguments (one-line errors)
        compose_method(c.method, **c.method_args)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"method_args: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(c.resources.profile, str):
        _require(
            c.resources.profile in PROFILES,
            f"resources.profile: unknown profile '{c.resources.profile}'; choose from: {', '.join(PROFILES)}",
        )
    else:
        types_ = paper_rank_types()
        bad = [t for t in c.resources.profile if t not in types_]
        _require(not bad, f"resources.profile: unknown rank type '{bad[0] if bad else ''}'; choose from: {', '.join(types_)}")
    for key in ("t1", "t2", "t3_attention", "t3_mlp", "t4"):
        _require(getattr(c.resources, key) >= 1, f"resources.{key}: a LoRA rank must be >= 1, got {getattr(c.resources, key)}")
    _require(c.lora.alpha > 0, f"lora.alpha: must be > 0, got {c.lora.alpha}")
    _require(0 <= c.lora.dropout < 1, f"lora.dropout: must be in [0, 1), got {c.lora.dropout}")
    _require(c.federation.rounds >= 1, f"federation.rounds: must be >= 1, got {c.federation.rounds}")
    _require(c.federation.clients_per_round >= 1, f"federation.clients_per_round: must be >= 1, got {c.federation.clients_per_round}")
    if c.federation.fraction is not None:
        _require(0 < c.federation.fraction <= 1, f"federation.fraction: must be in (0, 1], got {c.federation.fraction}")
    _require(c.federation.min_updates >= 1, f"federation.min_updates: must be >= 1, got {c.federation.min_updates}")
    if c.federation.fraction is None:
        _require(
            c.federation.min_updates <= c.federation.clients_per_round,
            f"federation.min_updates: {c.federation.min_updates} is more than federation.clients_per_round "
            f"({c.federation.clients_per_round}); no round could ever aggregate",
        )
    if c.federation.max_norm_ratio is not None:
        _require(c.federation.max_norm_ratio > 1, f"federation.max_norm_ratio: must be > 1 (or null to disable), got {c.federation.max_norm_ratio}")
    if c.federation.client_timeout_s is not None:
        _require(c.federation.client_timeout_s > 0, f"federation.client_timeout_s: must be > 0 (or null), got {c.federation.client_timeout_s}")
    if c.federation.max_weight_share is not None:
        _require(
            0 < c.federation.max_weight_share <= 1,
            f"federation.max_weight_share: must be in (0, 1] (or null), got {c.federation.max_weight_share}",
        )
    _require(c.output.keep_checkpoints >= 1, f"output.keep_checkpoints: must be >= 1, got {c.output.keep_checkpoints}")
    _require(0 <= c.federation.dropout_rate <= 1, f"federation.dropout_rate: must be in [0, 1], got {c.federation.dropout_rate}")
    _require(c.train.optimizer in ("adamw", "sgd"), f"train.optimizer: must be adamw or sgd, got '{c.train.optimizer}'")
    _require(c.train.lr > 0, f"train.lr: must be > 0, got {c.train.lr}")
    if c.train.steps is not None:
        _require(c.train.steps >= 1, f"train.steps: must be >= 1, got {c.train.steps}")
    _require(c.train.epochs > 0, f"train.epochs: must be > 0, got {c.train.epochs}")
    _require(c.train.batch_size >= 1, f"train.batch_size: must be >= 1, got {c.train.batch_size}")
    if c.train.micro_batch_size is not None:
        _require(
            1 <= c.train.micro_batch_size <= c.train.batch_size and c.train.batch_size % c.train.micro_batch_size == 0,
            f"train.micro_batch_size: must divide train.batch_size ({c.train.batch_size}), got {c.train.micro_batch_size}",
        )
    _require(c.data.template in TEMPLATES, f"data.template: unknown template '{c.data.template}'; choose from: {', '.join(TEMPLATES)}")
    _require(c.data.cutoff_len >= 16, f"data.cutoff_len: must be >= 16, got {c.data.cutoff_len}")
    _require(c.data.num_clients >= 1, f"data.num_clients: must be >= 1, got {c.data.num_clients}")
    validate_data(c.data)
    _require(c.eval.max_new_tokens >= 1, f"eval.max_new_tokens: must be >= 1, got {c.eval.max_new_tokens}")
    _require(c.eval.every >= 1, f"eval.every: must be >= 1, got {c.eval.every}")
    if c.eval.decode_batch_size is not None:
        _require(c.eval.decode_batch_size >= 1, f"eval.decode_batch_size: must be >= 1, got {c.eval.decode_batch_size}")
    if c.eval.export_rank is not None:
        _require(c.eval.export_rank >= 1, f"eval.export_rank: must be >= 1, got {c.eval.export_rank}")
    _require(c.engine in ("local", "flower"), f"engine: must be local or flower, got '{c.engine}'")
    f = c.flower
    _require(
        f.transport_dtype in ("float32", "float16"),
        f"flower.transport_dtype: must be float32 or float16, got '{f.transport_dtype}'",
    )
    _require(f.workers >= 1, f"flower.workers: must be >= 1, got {f.workers}")
    if f.cpus_per_worker is not None:
        _require(f.cpus_per_worker >= 1, f"flower.cpus_per_worker: must be >= 1, got {f.cpus_per_worker}")
    if f.gpus_per_worker is not None:
        _require(f.gpus_per_worker >= 0, f"flower.gpus_per_worker: must be >= 0, got {f.gpus_per_worker}")
    _require(f.ray_object_store_mb >= 64, f"flower.ray_object_store_mb: must be >= 64, got {f.ray_object_store_mb}")
    if f.min_nodes is not None:
        _require(f.min_nodes >= 1, f"flower.min_nodes: must be >= 1, got {f.min_nodes}")
    _require(f.node_wait_s > 0, f"flower.node_wait_s: must be > 0, got {f.node_wait_s}")
    _require(f.round_timeout_s > 0, f"flower.round_timeout_s: must be > 0, got {f.round_timeout_s}")
    _require(f.max_in_flight >= 1, f"flower.max_in_flight: must be >= 1, got {f.max_in_flight}")
    looks_like_path = c.model.startswith((".", "/", "~"))
    _require(
        not looks_like_path or Path(c.model).expanduser().exists(),
        f"model: model path does not exist: {c.model}",
    )
    _require(
        c.model_dtype in ("float32", "bfloat16", "float16"),
        f"model_dtype: must be float32, bfloat16 or float16, got '{c.model_dtype}'",
    )
    if c.quantization is not None:
        _require(c.quantization == "nf4", f"quantization: must be nf4 or null, got '{c.quantization}'")
        _require(
            c.method not in ("flora", "slora"),
            f"quantization: nf4 cannot be used with method={c.method}, which changes the base weights (4-bit weights cannot be changed)",
        )
    _require(
        c.model_dtype == "float32" or c.method not in ("flora", "slora"),
        f"model_dtype: method={c.method} changes the base weights, which must then be float32 (a 16-bit base would round its updates away), got '{c.model_dtype}'",
    )
    _require(
        c.device in ("auto", "cpu") or c.device.startswith("cuda"),
        f"device: must be auto, cpu or cuda[:N], got '{c.device}'",
    )


def validate_data(d: DataConfig) -> None:
    from flexlora.data.sources import SOURCES

    _require(d.source in SOURCES, f"data.source: unknown data source '{d.source}'; choose from: {', '.join(SOURCES)}")
    if d.source != "synthetic":
        _require(d.path is not None, f"data.path: data.source={d.source} needs data.path (a folder or file)")
        _require(Path(d.path).expanduser().exists(), f"data.path: not found: {d.path}")
    if d.test_path is not None:
        _require(Path(d.test_path).expanduser().exists(), f"data.test_path: not found: {d.test_path}")
    if d.heldout_fraction is not None:
        _require(0 < d.heldout_fraction < 1, f"data.heldout_fraction: must be in (0, 1), got {d.heldout_fraction}")
    _require(d.dirichlet_alpha > 0, f"data.dirichlet_alpha: must be > 0, got {d.dirichlet_alpha}")
    _require(d.min_client_size >= 1, f"data.min_client_size: must be >= 1, got {d.min_client_size}")
    _require(d.test_per_category >= 0, f"data.test_per_category: must be >= 0, got {d.test_per_category}")
    _require(d.weight_by in ("auto", "local", "source"), f"data.weight_by: must be auto, local or source, got '{d.weight_by}'")
    _require(d.bad_records in ("skip", "error"), f"data.bad_records: must be skip or error, got '{d.bad_records}'")
    if d.max_train_per_client is not None:
        _require(d.max_train_per_client >= 1, f"data.max_train_per_client: must be >= 1, got {d.max_train_per_client}")
