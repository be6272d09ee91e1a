"""Config loading: YAML + overrides, and one-line errors naming the problem."""

import pytest

from flexlora.cli import main
from flexlora.config import ConfigError, load_config


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
