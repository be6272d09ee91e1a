"""Bad input stops the CLI before any work: one line on stderr naming the problem, exit 2, no
run folder written. Config values here; data files further down."""

from __future__ import annotations

import json
import time

import pytest

from flexlora.cli import main


def fails_fast(argv: list[str], message: str, tmp_path, capsys) -> str:
    started = time.perf_counter()
    assert main(["run", *argv, f"output.dir={tmp_path / 'runs'}", "output.name=x"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and err.startswith("flexlora: error: "), err
    assert not (tmp_path / "runs" / "x").exists()  # nothing written
    assert time.perf_counter() - started < 30  # no model loaded, no training
    return err


BAD_CONFIG = [
    # The list (test_config.py checks the messages; here: nothing is written either).
    ("resources.t1=0", "resources.t1: a LoRA rank must be >= 1"),
    ("federation.fraction=1.5", "federation.fraction: must be in (0, 1]"),
    ("method=fedavgx", "method: unknown aggregation method 'fedavgx'"),
    ("resources.profile=lopsided", "resources.profile: unknown profile 'lopsided'"),
    ("model=./no/such/model", "model: model path does not exist: ./no/such/model"),
    ("federation.round=3", "unknown config key 'federation.round'"),
    # Reliability settings.
    ("federation.dropout_rate=1.5", "federation.dropout_rate: must be in [0, 1]"),
    ("federation.min_updates=0", "federation.min_updates: must be >= 1"),
    ("federation.min_updates=9", "federation.min_updates: 9 is more than federation.clients_per_round (4)"),
    ("federation.max_norm_ratio=0.5", "federation.max_norm_ratio: must be > 1"),
    ("federation.client_timeout_s=0", "federation.client_timeout_s: must be > 0"),
    ("federation.client_timeout_s=soon", "federation.client_timeout_s: expected a number"),
    ("output.checkpoint=maybe", "output.checkpoint: expected true or false"),
]


@pytest.mark.parametrize("override, message", BAD_CONFIG, ids=[o for o, _ in BAD_CONFIG])
def test_bad_config_value(override, message, tmp_path, capsys):
    fails_fast([override], message, tmp_path, capsys)


def test_a_model_folder_transformers_cannot_read_leaves_no_run_folder(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # no model_type
    fails_fast([f"model={folder}"], f"model: cannot load {folder} (ValueError: Unrecognized model in {folder}", tmp_path, capsys)


@pytest.mark.parametrize("modules", ["[nope]", "[q_proj,v_prj]"], ids=["none-found", "one-typo"])
def test_target_modules_not_in_the_model_leave_no_run_folder(modules, tmp_path, capsys):
    missing = "['nope']" if modules == "[nope]" else "['v_prj']"
    fails_fast(
        ["model=tiny-llama", f"lora.target_modules={modules}"],
        f"lora.target_modules: {missing} not among the model's linear layers (down_proj, gate_proj, k_proj, lm_head, o_proj",
        tmp_path,
        capsys,
    )


def test_existing_run_folder_needs_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("precious\n")
    assert main(["run", f"output.dir={tmp_path / 'runs'}", "output.name=x"]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite to replace it or --resume" in err and err.count("\n") == 1
    assert (run_dir / "metrics.jsonl").read_text() == "precious\n"


# --- data files ----------------------------------------------------------------------------

GOOD = {"instruction": "Reverse the word.", "input": "abc", "output": "cba", "category": "reverse", "client": "a"}


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


BAD_DATA = [
    # (file name, content, extra overrides, expected message; {path} is the file)
    ("bad.jsonl", jsonl(GOOD, '{"instruction": "x", "output": '), ["data.bad_records=error"], "{path}:2: invalid JSON"),
    ("list.jsonl", jsonl(GOOD, [1, 2]), ["data.bad_records=error"], "{path}:2: record is a list, not a JSON object"),
    (
        "noout.jsonl",
        jsonl(GOOD, {"instruction": "x", "input": ""}),
        ["data.bad_records=error"],
        "{path}:2: missing field 'output/response'",
    ),
    (
        "type.jsonl",
        jsonl(GOOD, {**GOOD, "instruction": 7}),
        ["data.bad_records=error"],
        "{path}:2: field 'instruction' is a int, expected a string",
    ),
    ("empty-out.jsonl", jsonl(GOOD, {**GOOD, "output": "  "}), ["data.bad_records=error"], "{path}:2: empty field 'output'"),
    ("cut.json", json.dumps([GOOD, GOOD], indent=1)[:-30], ["data.bad_records=error"], "invalid JSON"),
    ("object.json", json.dumps({"records": [GOOD]}), ["data.bad_records=error"], "{path}:1: missing field 'instruction'"),
    ("empty.jsonl", "", [], "{path}: no usable instruction records"),
    (
        "nothing-usable.jsonl",
        jsonl([1], "not json"),
        [],
        "{path}: no usable instruction records (2 data issue(s), first: {path}:2: invalid JSON (Expecting value))",
    ),
]


@pytest.mark.parametrize("name, content, extra, message", BAD_DATA, ids=[d[0] for d in BAD_DATA])
def test_bad_data_file(name, content, extra, message, tmp_path, capsys):
    path = tmp_path / name
    path.write_text(content)
    fails_fast(["data.source=json", f"data.path={path}", *extra], message.format(path=path), tmp_path, capsys)


def test_a_natural_instructions_folder_with_nothing_usable_names_the_first_problem(tmp_path, capsys):
    folder = tmp_path / "ni"
    folder.mkdir()
    (folder / "local_training_0.json").write_text("garbage")
    fails_fast(
        ["data.source=natural-instructions", f"data.path={folder}"],
        f"{folder}: no client with training examples is left after choosing held-out clients "
        f"(2 data issue(s), first: {folder / 'local_training_0.json'}:1: expected a JSON list of records)",
        tmp_path,
        capsys,
    )


def test_missing_data_path_and_empty_folder(tmp_path, capsys):
    fails_fast(["data.source=json", f"data.path={tmp_path / 'nope.jsonl'}"], "data.path: not found", tmp_path, capsys)
    fails_fast(["data.source=json"], "data.path: data.source=json needs data.path", tmp_path, capsys)
    (tmp_path / "folder").mkdir()
    fails_fast(
        ["data.source=json", f"data.path={tmp_path / 'folder'}"], "no .json or .jsonl files in the folder", tmp_path, capsys
    )
