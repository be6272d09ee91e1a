"""Data sources on small fixtures written here: NI per-client folders, Dolly JSONL, generic
JSON; bad records, missing ids, empty clients; the Dirichlet split; held-out selection."""

import json

import pytest

from flexlora.config import ConfigError, load_config
from flexlora.data.records import Issues, read_records
from flexlora.data.sources import load_federated_dataset
from flexlora.data.split import dirichlet_split, task_category
from flexlora.data.types import DataError


def rec(i, category="Word Analogy 266.json", output=None):
    return {
        "instruction": f"Task {i}: answer.",
        "input": f"question {i}",
        "output": output or f"answer {i}",
        "category": category,
    }


def write_ni(folder, clients: dict, meta: dict | None = None, indent=None):
    """clients: id -> {split: list of records or raw text}."""
    folder.mkdir(parents=True, exist_ok=True)
    for cid, splits in clients.items():
        for split, records in splits.items():
            text = records if isinstance(records, str) else json.dumps(records, indent=indent)
            (folder / f"local_{split}_{cid}.json").write_text(text)
    if meta is not None:
        (folder / "clients.json").write_text(json.dumps(meta))
    return folder


def ni_cfg(path, *overrides):
    return load_config(overrides=["data.source=natural-instructions", f"data.path={path}", *overrides]).data


@pytest.fixture
def ni_folder(tmp_path):
    """Ids 3, 7, 12, 40, 41 (not contiguous); 12 has test data only, 41 only empty files;
    client 7's training file holds four bad records among good ones."""
    cat = "Program Execution 1001.json"
    bad_train = [
        rec(1, cat),
        {"instruction": "no output here", "input": "x", "category": cat},
        rec(2, cat, output="   "),
        {"instruction": "numeric", "input": "x", "output": 5, "category": cat},
        "not an object",
        rec(3, cat),
    ]
    return write_ni(
        tmp_path / "ni",
        {
            3: {"training": [rec(i) for i in range(4)], "eval": [rec(9)], "test": [rec(10), rec(11)]},
            7: {"training": bad_train, "test": [rec(12, cat)]},
            12: {"test": [rec(13, "Mathematics 84.json")]},
            40: {"training": [rec(i, "Mathematics 85.json") for i in range(3)], "test": [rec(14, "Mathematics 85.json")]},
            41: {"training": "", "test": "[]"},
        },
        meta={
            "3": {"category": "Word Analogy 266.json", "train_examples_in_source": 320, "holdout": False},
            "7": {"category": cat, "train_examples_in_source": 100},
        },
        indent=1,
    )


def test_ni_folder_ids_weights_bad_records_and_empty_clients(ni_folder):
    data = load_federated_dataset(ni_cfg(ni_folder, "data.heldout_ids=[12]"), seed=0)
    assert [c.client_id for c in data.clients] == ["3", "7", "40"]
    assert [c.client_id for c in data.heldout] == ["12"]
    by_id = {c.client_id: c for c in data.clients}
    # clients.json's source sizes are the aggregation weights; 40 is not listed: local size
    assert [by_id[i].num_examples for i in ("3", "7", "40")] == [320, 100, 3]
    assert len(by_id["3"].train) == 4 and len(by_id["3"].eval) == 1 and len(by_id["3"].test) == 2
    assert [ex.output for ex in by_id["7"].train] == ["answer 1", "answer 3"]
    issues = "\n".join(data.issues)
    train7 = str(ni_folder / "local_training_7.json")
    # file, line (the file is indented: one record per few lines) and record number
    assert f"{train7}:" in issues
    for reason in (
        "record 2: missing field 'output/response'",
        "record 3: empty field 'output'",
        "record 4: field 'output' is a int",
        "record 5: record is a str, not a JSON object",
    ):
        assert reason in issues, reason
    lines = {int(line.split(":")[1]) for line in data.issues if line.startswith(train7)}
    assert len(lines) == 4 and min(lines) > 1  # real line numbers, not all 1
    assert "client 41 has no usable examples; dropped" in issues
    # load_config(weight_by=local) ignores clients.json
    local = load_federated_dataset(ni_cfg(ni_folder, "data.heldout_ids=[12]", "data.weight_by=local"), seed=0)
    assert [c.num_examples for c in local.clients] == [4, 2, 3]


def test_ni_client_without_training_data_is_reported_not_trained(ni_folder):
    data = load_federated_dataset(ni_cfg(ni_folder, "data.heldout_ids=[40]"), seed=0)
    assert "12" not in {c.client_id for c in data.clients}
    assert any("client 12 has no training examples" in line for line in data.issues)


def test_bad_records_error_policy_names_file_and_line(ni_folder):
    with pytest.raises(DataError) as err:
        load_federated_dataset(ni_cfg(ni_folder, "data.heldout_ids=[12]", "data.bad_records=error"), seed=0)
    message = str(err.value)
    assert message.startswith(str(ni_folder / "local_training_7.json") + ":")
    assert "record 2: missing field" in message and "\n" not in message


def test_truncated_json_keeps_earlier_records_and_reports_the_rest(tmp_path):
    path = tmp_path / "local_training_1.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "outp')
    issues = Issues()
    records = read_records(path, issues)
    assert len(records) == 1 and records[0].line == 2
    assert issues.lines == [
        f"{path}:3: record 2: invalid JSON (Unterminated string starting at); the rest of the file is skipped"
    ] or (
        len(issues.lines) == 1 and issues.lines[0].startswith(f"{path}:3: ") and "rest of the file is skipped" in issues.lines[0]
    )


def test_heldout_by_category_and_fraction_never_train(ni_folder):
    data = load_federated_dataset(ni_cfg(ni_folder, "data.heldout_categories=[mathematics]"), seed=0)
    assert {c.client_id for c in data.heldout} == {"12", "40"}
    assert all(c.train == [] for c in data.heldout)  # a held-out client carries no training data
    assert {task_category(c.category) for c in data.heldout} == {"Mathematics"}
    # A fraction is drawn with data.split_seed: the same held-out set whatever the run seed.
    a = load_federated_dataset(ni_cfg(ni_folder, "data.heldout_fraction=0.3"), seed=0)
    b = load_federated_dataset(ni_cfg(ni_folder, "data.heldout_fraction=0.3"), seed=5)
    assert {c.client_id for c in a.heldout} == {c.client_id for c in b.heldout}
    assert not {c.client_id for c in a.heldout} & {c.client_id for c in a.clients}


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.heldout_ids=[5]", "data.heldout_ids: no client with id '5'"),
        ("data.heldout_categories=[Poetry]", "data.heldout_categories: no client of category 'Poetry'"),
        ("data.heldout_ids=[3, 7, 12, 40]", "every client is held out"),
    ],
)
def test_heldout_mistakes_are_one_line_errors(ni_folder, override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_federated_dataset(ni_cfg(ni_folder, override), seed=0)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.source=dolly"], "data.path: data.source=dolly needs data.path"),
        (["data.source=json", "data.path=/no/such/file.jsonl"], "data.path: not found"),
        (["data.source=parquet"], "unknown data source 'parquet'"),
        (["data.bad_records=ignore"], "data.bad_records: must be skip or error"),
        (["data.heldout_fraction=1"], "data.heldout_fraction: must be in (0, 1)"),
        (["data.dirichlet_alpha=0"], "data.dirichlet_alpha: must be > 0"),
    ],
)
def test_data_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)


def test_no_client_files_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no local_training_<id>.json"):
        load_federated_dataset(ni_cfg(tmp_path / "empty"), seed=0)


# ----------------------------------------------------------------------------- Dirichlet


def test_dirichlet_split_is_seeded_covers_every_record_once_and_follows_alpha():
    labels = [f"cat{i % 8}" for i in range(1600)]
    a = dirichlet_split(labels, 20, 0.5, seed=3)
    assert a == dirichlet_split(labels, 20, 0.5, seed=3)
    assert a != dirichlet_split(labels, 20, 0.5, seed=4)
    flat = [i for part in a for i in part]
    assert sorted(flat) == list(range(1600))  # every record exactly once

    def categories_per_client(alpha):
        parts = dirichlet_split(labels, 20, alpha, seed=0)
        return sum(len({labels[i] for i in p}) for p in parts) / len(parts)

    skewed, even = categories_per_client(0.05), categories_per_client(100.0)
    assert even == 8  # large alpha: every client sees every category
    assert skewed < 4  # small alpha: each client sees few categories
    assert min(len(p) for p in dirichlet_split(labels, 20, 0.05, seed=0, min_size=10)) >= 10


def test_dirichlet_split_impossible_minimum_is_a_data_error():
    with pytest.raises(DataError, match="cannot give 10 clients 5 each"):
        dirichlet_split(["a"] * 20, 10, 1.0, seed=0, min_size=5)


# ----------------------------------------------------------------------------- Dolly / generic


def dolly_lines(n_per_cat=12, cats=("open_qa", "summarization", "brainstorming")):
    out = []
    for c in cats:
        for i in range(n_per_cat):
            out.append(
                {"instruction": f"{c} q{i}", "context": "" if i % 2 else f"ctx {i}", "response": f"{c} a{i}", "category": c}
            )
    return out


def test_dolly_split_test_records_never_train_and_bad_lines_are_reported(tmp_path):
    lines = [json.dumps(r) for r in dolly_lines()]
    lines.insert(5, "{broken json")
    lines.insert(9, json.dumps({"instruction": "no response", "context": "", "category": "open_qa"}))
    path = tmp_path / "dolly.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = load_config(
        overrides=[
            "data.source=dolly",
            f"data.path={path}",
            "data.num_clients=4",
            "data.test_per_category=3",
            "data.dirichlet_alpha=1.0",
        ]
    ).data
    data = load_federated_dataset(cfg, seed=0)
    assert any(line.startswith(f"{path}:6: invalid JSON") for line in data.issues)
    assert any(line.startswith(f"{path}:10: missing field 'output/response'") for line in data.issues)
    assert len(data.clients) == 4 and {c.client_id for c in data.heldout} == {
        "test:open_qa",
        "test:summarization",
        "test:brainstorming",
    }
    train = [ex for c in data.clients for ex in c.train]
    test = [ex for c in data.heldout for ex in c.test]
    assert len(test) == 9 and len(train) == 36 - 9
    assert not {(e.instruction, e.output) for e in train} & {(e.instruction, e.output) for e in test}
    assert next(e for e in train + test if e.instruction == "open_qa q0").input == "ctx 0"  # context -> input
    # The same split (data.split_seed) whatever the run seed.
    again = load_federated_dataset(cfg, seed=9)
    assert [[e.instruction for e in c.train] for c in again.clients] == [[e.instruction for e in c.train] for c in data.clients]

    # An explicit test file: its records leave the training pool.
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps(dolly_lines(2)))
    cfg2 = load_config(
        overrides=["data.source=dolly", f"data.path={path}", "data.num_clients=3", f"data.test_path={test_file}"]
    ).data
    data2 = load_federated_dataset(cfg2, seed=0)
    assert sum(len(c.test) for c in data2.heldout) == 6
    assert sum(len(c.train) for c in data2.clients) == 36 - 6


def test_generic_json_groups_by_client_field(tmp_path):
    records = [dict(rec(i), client=f"c{i % 3}") for i in range(12)]
    records[4].pop("client")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=2))
    cfg = load_config(
        overrides=["data.source=json", f"data.path={path}", "data.heldout_ids=[c2]", "data.test_per_category=0"]
    ).data
    data = load_federated_dataset(cfg, seed=0)
    assert [c.client_id for c in data.clients] == ["c0", "c1"]
    assert [len(c.train) for c in data.clients] == [4, 3]  # record 5 (c1) had no client field
    assert any("record 5: missing field 'client'" in line for line in data.issues)
    (held,) = data.heldout
    assert held.client_id == "c2" and len(held.test) == 4 and held.train == []


# ----------------------------------------------------------------------------- prompts


def test_long_prompts_are_shortened_so_the_answer_survives_the_cutoff():
    from flexlora.data.prompts import fit_prompt, tokenize_for_training
    from flexlora.data.types import Example
    from flexlora.models import TINY, load_model

    _, tokenizer = load_model(TINY, "cpu")  # byte-level: one token per byte
    ex = Example("Copy the last word.", "word " * 400, "word")
    feats = tokenize_for_training(ex, tokenizer, "alpaca", 256, train_on_inputs=False)
    answer = [t for t in feats["labels"] if t != -100]
    assert len(feats["input_ids"]) <= 256
    assert answer == tokenizer("word", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    text, ids = fit_prompt(ex, tokenizer, "alpaca", 256, 16)
    assert len(ids) <= 256 - 16 and text.endswith("### Response:\n") and "Copy the last word." in text


# ----------------------------------------------------------------------------- real data

from conftest import SHARED_DATA, requires_shared_data  # noqa: E402

NI = SHARED_DATA / "natural-instructions-1613-mini"
DOLLY = SHARED_DATA / "dolly-15k"


@requires_shared_data()
def test_real_ni_mini_split_loads_with_source_weights_and_unseen_categories():
    data = load_federated_dataset(ni_cfg(NI, "data.heldout_categories=[Word Analogy, Mathematics]"), seed=0)
    ids = {c.client_id for c in data.clients} | {c.client_id for c in data.heldout}
    assert len(ids) > 1500 and "967" not in ids  # the source lacks client 967
    assert {task_category(c.category) for c in data.heldout} == {"Word Analogy", "Mathematics"}
    assert not {task_category(c.category) for c in data.clients} & {"Word Analogy", "Mathematics"}
    meta = json.loads((NI / "clients.json").read_text())
    first = data.clients[0]
    assert first.num_examples == meta[first.client_id]["train_examples_in_source"] and len(first.train) <= 16
    assert all(line.split(":")[0].startswith(str(NI)) for line in data.issues)  # empty outputs: reported, skipped
    assert 76 == len({task_category(c.category) for c in data.clients + data.heldout})


@requires_shared_data()
def test_real_dolly_split_with_its_published_test_set():
    cfg = load_config(
        overrides=[
            "data.source=dolly",
            f"data.path={DOLLY}",
            "data.num_clients=10",
            "data.dirichlet_alpha=0.5",
            f"data.test_path={DOLLY / 'test-10-per-category.json'}",
        ]
    ).data
    data = load_federated_dataset(cfg, seed=0)
    assert len(data.clients) == 10 and len(data.heldout) == 8
    assert sum(len(c.test) for c in data.heldout) == 80
    train = sum(len(c.train) for c in data.clients)
    assert 15011 - 80 - 50 < train <= 15011 - 80  # every other record trains, once
    test_keys = {(e.instruction, e.output) for c in data.heldout for e in c.test}
    assert not any((e.instruction, e.output) in test_keys for c in data.clients for e in c.train)
