"""Experiment configuration: loaded from YAML plus `key=value` overrides into the pydantic
models of flexlora.schema (re-exported here).

Types, ranges and choices are checked by the schema; the checks that need several keys, a
registry (methods, data sources, templates, resource profiles) or this machine (paths) are in
`validate` below. Either way a bad value is a ConfigError whose message names the key and the
problem in one line. A method's arguments (method_args) are checked by building the method
(its constructor's one-line errors).
"""

from __future__ import annotations

import typing
from pathlib import Path

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError

from flexlora.errors import ConfigError  # noqa: F401  (re-exported)
from flexlora.schema import (  # noqa: F401  (re-exported)
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    Explain,
    FederationConfig,
    FlowerConfig,
    LoraSettings,
    OutputConfig,
    PrivacyConfig,
    ResourcesConfig,
    TrainConfig,
)

# pydantic's error types in our words: "train.lr: expected a number, got 'fast'".
_EXPECTED = {
    "float_parsing": "a number",
    "float_type": "a number",
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


# ---------------------------------------------------------------- what the schema says about a key


def _section(annotation) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _locate(loc: tuple) -> tuple[str, typing.Any, type[BaseModel] | None]:
    """The dotted key a pydantic error location names (list indices as [i], a union member's
    tag such as 'list[str]' dropped), the key's FieldInfo, and its model if it is a section."""
    section, info, parts = ExperimentConfig, None, []
    for part in loc:
        if isinstance(part, int) and parts:
            parts[-1] += f"[{part}]"
        elif section is not None and isinstance(part, str) and part in section.model_fields:
            info = section.model_fields[part]
            parts.append(part)
            section = _section(info.annotation)
    return ".".join(parts), info, section


def _explain(info) -> Explain:
    found = [m for m in info.metadata if isinstance(m, Explain)] if info is not None else []
    return found[0] if found else Explain()


def nullable(info) -> bool:
    return type(None) in typing.get_args(info.annotation)


def choices(info) -> list[str]:
    """A key's allowed values when the schema lists them (a Literal), 'null' last if allowed."""
    options = [info.annotation, *typing.get_args(info.annotation)]
    for option in options:
        if typing.get_origin(option) is typing.Literal:
            return [str(v) for v in typing.get_args(option)] + (["null"] if nullable(info) else [])
    return []


def constraint(info) -> str:
    """A key's range or choices in words: '>= 1', 'in (0, 1]', 'adamw or sgd'; '' if none."""
    lower = upper = None
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            lower = ("[", ">=", m.ge)
        elif isinstance(m, annotated_types.Gt):
            lower = ("(", ">", m.gt)
        elif isinstance(m, annotated_types.Le):
            upper = ("]", "<=", m.le)
        elif isinstance(m, annotated_types.Lt):
            upper = (")", "<", m.lt)
    if lower and upper:
        return f"in {lower[0]}{lower[2]:g}, {upper[2]:g}{upper[0]}"
    if lower or upper:
        _, op, value = lower or upper
        return f"{op} {value:g}"
    if choices(info):
        return _either(choices(info))
    return _explain(info).allowed or ""


def _either(options: list[str]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def _one_line(error: dict) -> str:
    """One pydantic error as our one-line message naming the key."""
    kind, loc, value = error["type"], error["loc"], error.get("input")
    if kind == "extra_forbidden":
        prefix, _, section = _locate(loc[:-1])
        known = sorted((section or ExperimentConfig).model_fields)
        return f"unknown config key '{prefix + '.' if prefix else ''}{loc[-1]}'; known keys: {', '.join(known)}"
    key, info, _ = _locate(loc)
    key = key or "config"
    if kind in _EXPECTED:
        return f"{key}: expected {_EXPECTED[kind]}, got {value!r}"
    if kind in _BOUNDS and info is not None:
        noun = _explain(info).noun
        null = " (or null)" if nullable(info) else ""
        return f"{key}: {noun + ' ' if noun else ''}must be {constraint(info)}{null}, got {value!r}"
    if kind in ("literal_error", "string_pattern_mismatch") and info is not None:
        return f"{key}: must be {constraint(info)}, got {value!r}"
    return f"{key}: {error['msg']}"


def _from_tree(tree) -> ExperimentConfig:
    if not isinstance(tree, dict):
        raise ConfigError(f"config: expected a mapping, got {tree!r}")
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_one_line(e.errors()[0])) from None


# ---------------------------------------------------------------- loading


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
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: expected a mapping of keys, got {type(tree).__name__}")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = _from_tree(tree)
    validate(config)
    return config


def config_from_dict(tree: dict, check: bool = True) -> ExperimentConfig:
    """An ExperimentConfig from a plain mapping (e.g. `to_dict()` sent to a Flower client).
    `check=False` skips the value checks that look at this machine (paths), for a config that
    was already checked where it was written."""
    config = _from_tree(tree)
    if check:
        validate(config)
    return config


def to_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- checks beyond one key's type


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(c: ExperimentConfig) -> None:
    """The checks a key's type, range or choices cannot express: registries, several keys
    together, paths on this machine."""
    from flexlora.data.prompts import TEMPLATES
    from flexlora.extras import require
    from flexlora.methods import METHODS, compose_method
    from flexlora.models import bundled_model_missing
    from flexlora.resources import paper_rank_types, parse_profile

    _require(c.method in METHODS, f"method: unknown aggregation method '{c.method}'; choose from: {', '.join(METHODS)}")
    try:  # constructing a method is cheap and checks its arguments (one-line errors)
        composition = compose_method(c.method, **c.method_args)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"method_args: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if c.flower.secure_aggregation:
        from flexlora.privacy.secagg import check_config

        try:
            check_config(c, composition.method, composition.server_step)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    r = c.resources
    try:  # every form of the profile (name, list, mapping, clients file) is checked by flexlora.resources
        parse_profile(r.profile, paper_rank_types(r.t1, r.t2, r.t3_attention, r.t3_mlp, r.t4))
    except ValueError as e:
        raise ConfigError(f"resources.profile: {str(e).splitlines()[0]}") from None
    if c.federation.fraction is None:
        _require(
            c.federation.min_updates <= c.federation.clients_per_round,
            f"federation.min_updates: {c.federation.min_updates} is more than federation.clients_per_round "
            f"({c.federation.clients_per_round}); no round could ever aggregate",
        )
    if c.train.micro_batch_size is not None:
        _require(
            1 <= c.train.micro_batch_size <= c.train.batch_size and c.train.batch_size % c.train.micro_batch_size == 0,
            f"train.micro_batch_size: must divide train.batch_size ({c.train.batch_size}), got {c.train.micro_batch_size}",
        )
    _require(
        c.data.template in TEMPLATES, f"data.template: unknown template '{c.data.template}'; choose from: {', '.join(TEMPLATES)}"
    )
    validate_data(c.data)
    validate_privacy(c)
    looks_like_path = c.model.startswith((".", "/", "~"))
    _require(
        not looks_like_path or Path(c.model).expanduser().exists(),
        f"model: model path does not exist: {c.model}",
    )
    missing_model = bundled_model_missing(c.model)  # the default model's package, not a dependency
    _require(missing_model is None, missing_model or "")
    for tracker in c.output.trackers:  # an extra each (flexlora[tensorboard], ...): fail before any work
        require(tracker, f"output.trackers={tracker}")
    changes_base = METHODS[c.method].changes_base_weights
    if c.quantization is not None:
        require("bitsandbytes", "quantization=nf4")  # an extra (flexlora[nf4]): fail before any work
        _require(
            not changes_base,
            f"quantization: nf4 cannot be used with method={c.method}, which changes the base weights (4-bit weights cannot be changed)",
        )
    _require(
        c.model_dtype == "float32" or not changes_base,
        f"model_dtype: method={c.method} changes the base weights, which must then be float32 (a 16-bit base would round its updates away), got '{c.model_dtype}'",
    )


def validate_privacy(c: ExperimentConfig) -> None:
    """The privacy section against the rest (docs/privacy.md): one-line ConfigErrors."""
    from flexlora.extras import require
    from flexlora.methods import compose_method

    p = c.privacy
    if not p.enabled:
        _require(
            p.clipping_norm is None and p.noise_multiplier == 0,
            "privacy: clipping_norm or noise_multiplier is set but privacy.enabled is false (nothing would be private)",
        )
        return
    require("dp_accounting", "privacy.enabled")  # the accountant, an extra (flexlora[privacy])
    method = compose_method(c.method, **c.method_args).method
    _require(
        method.privacy_space is not None,
        f"privacy: method {c.method} cannot run under client-level DP: {method.privacy_refusal}",
    )
    _require(
        p.noise_multiplier == 0 or p.clipping_norm is not None,
        "privacy.noise_multiplier: noise needs privacy.clipping_norm (its standard deviation is noise_multiplier x clipping_norm)",
    )
    _require(p.clipping == "server" or p.clipping_norm is not None, "privacy.clipping=client needs privacy.clipping_norm")
    _require(
        (p.weighting == "capped") == (p.max_examples is not None),
        "privacy.max_examples: set it with privacy.weighting=capped (the cap on n_k), and only then",
    )
    _require(
        c.federation.max_weight_share is None,
        "federation.max_weight_share: privacy.weighting sets the weights under client-level DP; set it to null",
    )


def validate_data(d: DataConfig) -> None:
    from flexlora.data.sources import check_source

    source = check_source(d)  # a registered source, data.path given if it reads one, its own rules
    if source.needs_path:
        _require(Path(d.path).expanduser().exists(), f"data.path: not found: {d.path}")
    if d.test_path is not None:
        _require(Path(d.test_path).expanduser().exists(), f"data.test_path: not found: {d.test_path}")


# ---------------------------------------------------------------- the reference (docs/configuration.md)


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return "string"
    if origin in (typing.Union, __import__("types").UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, dict):
        inner = ", ".join(_type_name(a) for a in args)
        return f"{'list' if origin is list else 'mapping'}" + (f"[{inner}]" if inner and inner != "str, any" else "")
    names = {
        int: "integer",
        float: "number",
        bool: "boolean",
        str: "string",
        list: "list",
        dict: "mapping",
        type(None): "null",
        typing.Any: "any",
    }
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(info) -> str:
    value = info.get_default(call_default_factory=True)
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("<", "\\<")


def reference_markdown() -> str:
    """docs/configuration.md: every key with its type, default, constraint and meaning, from
    the schema (regenerate: `flexlora config --reference > docs/configuration.md`)."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from src/flexlora/schema.py by `flexlora config --reference > docs/configuration.md`;",
        "     do not edit by hand (tests/test_config.py fails when this file is out of date). -->",
        "",
        "A run's configuration is a YAML file (`--config FILE`, e.g. configs/default.yaml) plus",
        "`key=value` overrides on the command line (`federation.rounds=5 train.lr=1e-4`; a value is",
        "read as YAML, so `resources.profile=[T1, T4]` is a list). Overrides and flags may come in",
        "any order. `flexlora config [--config FILE] [key=value ...]` prints the resolved",
        "configuration, `flexlora config --schema` its JSON schema. A bad value stops the command",
        "before any work with one line naming the key (exit code 2).",
        "",
        "Constraints below are checked by the schema; the checks that need several keys, a",
        "registry or the file system (a method's `method_args`, `data.path`, `min_updates <=",
        "clients_per_round`, ...) run right after it (`flexlora.config.validate`).",
        "",
    ]
    top = [(name, info) for name, info in ExperimentConfig.model_fields.items() if _section(info.annotation) is None]
    sections = [(name, info) for name, info in ExperimentConfig.model_fields.items() if _section(info.annotation) is not None]
    groups = [("Top level", "", top, "")] + [
        (f"`{name}`", f"{name}.", list(_section(info.annotation).model_fields.items()), info.description or "")
        for name, info in sections
    ]
    for title, prefix, fields, about in groups:
        lines += [f"## {title}", ""]
        if about:
            lines += [_cell(about), ""]
        lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for name, info in fields:
            lines.append(
                f"| `{prefix}{name}` | {_cell(_type_name(info.annotation))} | `{_cell(_default(info))}` | "
                f"{_cell(constraint(info))} | {_cell(info.description or '')} |"
            )
        lines.append("")
    return "\n".join(lines)


def reference_keys() -> list[str]:
    """Every dotted key of the schema (what the reference must list)."""
    keys = []
    for name, info in ExperimentConfig.model_fields.items():
        section = _section(info.annotation)
        keys += [f"{name}.{sub}" for sub in section.model_fields] if section else [name]
    return keys
