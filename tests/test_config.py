"""Config loading: YAML + overrides, and one-line errors naming the problem."""

import pytest

from flexlora.cli import main
from flexlora.config import ConfigError, ExperimentConfig, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: fedit\ntrain:\n  lr: 0.001\nresources:\n  profile: heavy-tail-strong\n")
    cfg = load_config(path, ["train.lr=2e-4", "federation.rounds=7", "resources.profile=[T1, T4]"])
    assert cfg.method == "fedit" and cfg.train.lr == 2e-4 and cfg.federation.rounds == 7
    assert cfg.resources.profile == ["T1", "T4"]
    assert load_config().method == "flexlora"


@pytest.mark.parametrize(
    "override, message",
    [
        ("method=fedavgx", "unknown aggregation method 'fedavgx'"),
        ("resources.profile=lopsided", "unknown profile 'lopsided'"),
        ("resources.profile=[T1, T9]", "unknown rank type 'T9'"),
        ("resources.t1=0", "resources.t1: a LoRA rank must be >= 1"),
        ("federation.fraction=1.5", "federation.fraction: must be in (0, 1]"),
        ("federation.rounds=0", "federation.rounds: must be >= 1"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("train.optimizer=adam", "train.optimizer: must be adamw or sgd"),
        ("training.lr=1", "unknown config key 'training'"),
        ("train.learning_rate=1", "unknown config key 'train.learning_rate'"),
        ("train.micro_batch_size=3", "train.micro_batch_size: must divide"),
        ("data.template=vicuna", "unknown template 'vicuna'"),
        ("device=tpu", "device: must be auto, cpu or cuda"),
        ("lora.dropout=1", "lora.dropout: must be in [0, 1)"),
        ("rounds", "is not of the form key=value"),
    ],
)
def test_bad_values_give_one_line_errors(override, message, capsys):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(overrides=[override])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert main(["run", override]) == 2
    err_out = capsys.readouterr().err
    assert message in err_out and err_out.count("\n") == 1


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_missing_model_path_fails_before_work(tmp_path, capsys):
    assert main(["run", "model=./no/such/model", f"output.dir={tmp_path}", "output.name=x"]) == 2
    assert "model path does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- the schema's outputs


def test_the_reference_lists_every_key_and_is_what_the_generator_writes():
    """docs/configuration.md is generated from the schema; regenerate it with
    `flexlora config --reference > docs/configuration.md` after changing a key."""
    from pathlib import Path

    from flexlora.config import reference_keys, reference_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    missing = [key for key in reference_keys() if f"| `{key}` |" not in doc]
    assert not missing, f"keys missing from docs/configuration.md (regenerate it): {missing}"
    assert doc == reference_markdown(), (
        "docs/configuration.md is out of date: flexlora config --reference > docs/configuration.md"
    )
    # The keys the generator walks are every key of the JSON schema (found here independently).
    schema = ExperimentConfig.model_json_schema()
    keys = []
    for name, prop in schema["properties"].items():
        section = prop.get("$ref", "").rsplit("/", 1)[-1]
        keys += [f"{name}.{sub}" for sub in schema["$defs"][section]["properties"]] if section else [name]
    assert sorted(reference_keys()) == sorted(keys) and len(keys) > 70
    assert "| `federation.fraction` | number \\| null | `null` | in (0, 1] |" in doc
    assert "| `train.optimizer` | string | `adamw` | adamw or sgd |" in doc


def test_config_command_prints_the_resolved_config_and_the_schema(tmp_path, capsys):
    import json

    import yaml

    path = tmp_path / "c.yaml"
    path.write_text("method: fedit\ntrain:\n  lr: 0.001\n")
    assert main(["config", "federation.rounds=7", "--config", str(path), "train.lr=2e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(path, ["federation.rounds=7", "train.lr=2e-4"]).to_dict()
    assert printed["method"] == "fedit" and printed["train"]["lr"] == 2e-4 and printed["federation"]["rounds"] == 7

    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    fraction = schema["$defs"]["FederationConfig"]["properties"]["fraction"]
    assert {"exclusiveMinimum": 0, "maximum": 1, "type": "number"} in fraction["anyOf"]
    assert schema["$defs"]["TrainConfig"]["properties"]["optimizer"]["enum"] == ["adamw", "sgd"]
    assert schema["additionalProperties"] is False  # unknown keys are errors

    assert main(["config", "train.lr=fast"]) == 2
    assert "train.lr: expected a number, got 'fast'" in capsys.readouterr().err


def test_overrides_and_flags_in_any_order(monkeypatch):
    """`flexlora run method=fedit --overwrite seed=0`: argparse alone stops at seed=0
    ("unrecognized arguments"); every override reaches the config, in order."""
    import flexlora.engines as engines
    from flexlora.cli import parse_args

    args = parse_args(["run", "method=fedit", "--overwrite", "seed=0"])
    assert args.overrides == ["method=fedit", "seed=0"] and args.overwrite
    args = parse_args(["run", "seed=1", "--config", "configs/default.yaml", "seed=2", "--overwrite", "method=fedit"])
    assert args.overrides == ["seed=1", "seed=2", "method=fedit"] and args.config == "configs/default.yaml"
    assert load_config(args.config, args.overrides).seed == 2  # the later one wins, as typed
    with pytest.raises(SystemExit):  # a command without overrides still refuses them
        parse_args(["bench", "aggregate", "--quick", "seed=0"])

    seen = []
    monkeypatch.setattr(engines, "run_experiment", lambda cfg, **kw: seen.append(cfg))
    assert main(["run", "method=fedit", "--overwrite", "seed=0"]) == 0
    [cfg] = seen
    assert cfg.method == "fedit" and cfg.seed == 0 and cfg.output.overwrite is True


def test_the_console_script_takes_overrides_after_a_flag(tmp_path):
    """The installed `flexlora` command, the exact order of the issue; a cheap bad value after
    the flag proves it was parsed as an override (and stops before any model is loaded)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).with_name("flexlora")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "flexlora.cli"]
    proc = subprocess.run(
        [*command, "run", "method=fedit", "--overwrite", "seed=0", "federation.rounds=0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "flexlora: error: federation.rounds: must be >= 1, got 0\n"
