"""data.source=hf on datasets the tests write (never downloaded): every file format and a
save_to_disk folder load; column presets; clients from Flower Datasets' partitioners, equal to
what Flower Datasets' own FederatedDataset gives; held-out clients; bad input as one line
naming the column or the file; a short `flexlora run` on an hf-source JSONL file."""

import json
from collections import Counter

import pytest

from flexlora.cli import main
from flexlora.config import ConfigError, load_config
from flexlora.data.records import Issues
from flexlora.data.sources import load_federated_dataset
from flexlora.data.types import DataError

pytest.importorskip("flwr_datasets", reason="data.source=hf needs the hf extra: pip install 'flexlora[hf]'")
import datasets  # noqa: E402

CATEGORIES = ("open_qa", "summarization", "brainstorming", "classification")


def rows(n=48):
    """Alpaca-layout rows: 4 categories, 4 users, an input on every third row."""
    return [
        {
            "instruction": f"question {i}",
            "input": f"context {i}" if i % 3 == 0 else "",
            "output": f"answer {i}",
            "category": CATEGORIES[i % 4],
            "user": 100 + (i * 7) % 4,
        }
        for i in range(n)
    ]


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    """The datasets cache in the test's folder, and the Hub off (as on a machine without it)."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def hf_data(path, *overrides, for_training=True):
    cfg = load_config(overrides=["data.source=hf", f"data.path={path}", *overrides]).data
    return load_federated_dataset(cfg, seed=0, for_training=for_training)


def everything(data):
    """Every example of every client, training, held-out and test, as (instruction, input, output)."""
    return Counter((e.instruction, e.input, e.output) for c in data.clients + data.heldout for e in c.train + c.test)


def by_client(data):
    return {c.client_id: sorted(e.instruction for e in c.train + c.test) for c in data.clients + data.heldout}


# ----------------------------------------------------------------------------- partitioners


@pytest.mark.parametrize(
    "overrides, partitioner",
    [
        (["data.num_clients=5"], lambda: __import__("flwr_datasets").partitioner.IidPartitioner(5)),
        (
            ["data.num_clients=4", "data.hf_partitioner=dirichlet", "data.dirichlet_alpha=0.3"],
            lambda: __import__("flwr_datasets").partitioner.DirichletPartitioner(
                4, partition_by="category", alpha=0.3, min_partition_size=2, seed=42
            ),
        ),
    ],
    ids=["iid", "dirichlet"],
)
def test_clients_are_flower_datasets_partitions_and_every_record_reaches_one_client(tmp_path, overrides, partitioner):
    from flwr_datasets import FederatedDataset

    path = write_jsonl(tmp_path / "data.jsonl", rows())
    # split_seed 42 is FederatedDataset's default seed: the same shuffle, then the same partitioner
    data = hf_data(path, "data.split_seed=42", "data.test_per_category=0", *overrides, for_training=False)
    flower = FederatedDataset(dataset="json", data_files=str(path), partitioners={"train": partitioner()})
    expected = {
        str(i): sorted(flower.load_partition(i)["instruction"]) for i in range(flower.partitioners["train"].num_partitions)
    }
    assert by_client(data) == expected
    assert everything(data) == Counter((r["instruction"], r["input"], r["output"]) for r in rows())

    # The split follows data.split_seed, not the run's seed.
    other = hf_data(path, "data.split_seed=7", "data.test_per_category=0", *overrides, for_training=False)
    assert by_client(other) != by_client(data)
    cfg = load_config(
        overrides=["data.source=hf", f"data.path={path}", "data.split_seed=42", "data.test_per_category=0", *overrides]
    ).data
    assert by_client(load_federated_dataset(cfg, seed=5, for_training=False)) == by_client(data)


def test_natural_id_test_split_and_heldout_clients(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", rows())
    data = hf_data(
        path, "data.hf_partitioner=natural-id", "data.hf_partition_by=user", "data.test_per_category=2", "data.heldout_ids=[102]"
    )
    # one client per user; the test split (2 a category, taken first) as one group per category
    assert [c.client_id for c in data.clients] == ["100", "101", "103"]
    assert {c.client_id for c in data.heldout} == {"102"} | {f"test:{c}" for c in CATEGORIES}
    assert sum(len(c.test) for c in data.heldout if c.client_id.startswith("test:")) == 8
    users = {r["instruction"]: str(r["user"]) for r in rows()}
    for client in data.clients:
        assert {users[e.instruction] for e in client.train} == {client.client_id}
    assert everything(data) == Counter((r["instruction"], r["input"], r["output"]) for r in rows())

    # by category (natural id over the category column, the default) and by fraction
    data = hf_data(path, "data.hf_partitioner=natural-id", "data.test_per_category=0", "data.heldout_categories=[Open_QA]")
    assert sorted(c.client_id for c in data.clients) == ["brainstorming", "classification", "summarization"]
    assert [(c.client_id, len(c.test), c.train) for c in data.heldout] == [("open_qa", 12, [])]
    a = hf_data(path, "data.num_clients=6", "data.test_per_category=0", "data.heldout_fraction=0.34")
    assert len(a.heldout) == 2 and not {c.client_id for c in a.heldout} & {c.client_id for c in a.clients}


# ----------------------------------------------------------------------------- formats


def test_every_format_and_a_saved_dataset_load_the_same_clients(tmp_path):
    table = datasets.Dataset.from_list(rows(24))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part-a.jsonl", rows(24)[:10])
    write_jsonl(folder / "part-b.jsonl", rows(24)[10:])
    (tmp_path / "data.json").write_text(json.dumps(rows(24), indent=1))  # a JSON list
    write_jsonl(tmp_path / "data.jsonl", rows(24))
    table.to_csv(tmp_path / "data.csv", index=False)
    table.to_parquet(tmp_path / "data.parquet")
    table.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": table, "validation": table.select(range(3))}).save_to_disk(tmp_path / "saved-dict")
    paths = ["data.json", "data.jsonl", "data.csv", "data.parquet", "saved", "saved-dict", "folder"]
    loaded = {p: hf_data(tmp_path / p, "data.num_clients=3", "data.test_per_category=1") for p in paths}
    reference = loaded["data.jsonl"]
    assert len(reference.clients) == 3 and sum(len(c.train) for c in reference.clients) == 24 - 4
    for p in paths:  # the CSV's empty inputs come back as missing cells: read as ""
        assert by_client(loaded[p]) == by_client(reference), p
        assert everything(loaded[p]) == everything(reference), p
    # a DatasetDict's other split by data.hf_split
    small = hf_data(
        tmp_path / "saved-dict",
        "data.hf_split=validation",
        "data.num_clients=1",
        "data.test_per_category=0",
        "data.min_client_size=1",
        for_training=False,
    )
    assert sum(len(c.train) + len(c.test) for c in small.clients + small.heldout) == 3


# ----------------------------------------------------------------------------- columns


def test_presets_and_explicit_columns_map_the_columns(tmp_path):
    from flexlora.data.hf import column_mapping

    dolly = [{"instruction": f"q{i}", "context": f"c{i}", "response": f"r{i}", "category": CATEGORIES[i % 2]} for i in range(12)]
    data = hf_data(
        write_jsonl(tmp_path / "dolly.jsonl", dolly), "data.hf_preset=dolly", "data.num_clients=2", "data.test_per_category=0"
    )
    examples = {e.instruction: e for c in data.clients for e in c.train}
    assert examples["q3"].input == "c3" and examples["q3"].output == "r3" and examples["q3"].category == "summarization"

    # medalpaca's flashcards: the question is `input`, under one constant instruction
    cards = [
        {"instruction": "Answer this question truthfully", "input": f"What is {i}?", "output": f"It is {i}."} for i in range(8)
    ]
    data = hf_data(
        write_jsonl(tmp_path / "cards.jsonl", cards), "data.hf_preset=medical", "data.num_clients=2", "data.test_per_category=0"
    )
    assert sorted((e.instruction, e.input, e.output) for c in data.clients for e in c.train) == sorted(
        (f"What is {i}?", "", f"It is {i}.") for i in range(8)
    )

    # explicit columns over the preset; null drops a role
    qa = [{"question": f"q{i}", "answer": f"a{i}", "input": "ignored", "topic": "t"} for i in range(6)]
    data = hf_data(
        write_jsonl(tmp_path / "qa.jsonl", qa),
        "data.hf_columns={instruction: question, output: answer, input: null, category: topic}",
        "data.num_clients=2",
        "data.test_per_category=0",
    )
    assert {(e.instruction, e.input, e.output, e.category) for c in data.clients for e in c.train} == {
        (f"q{i}", "", f"a{i}", "t") for i in range(6)
    }

    # a FlowerTune Hub id picks its layout's preset when data.hf_preset is null
    cfg = load_config(overrides=["data.source=hf", "data.path=flwrlabs/medical-meadow-medical-flashcards"]).data
    assert column_mapping(cfg, ["instruction", "input", "output"], "x") == {"instruction": "input", "output": "output"}


def test_dolly_through_flower_datasets_has_the_dolly_sources_test_split_and_pool(tmp_path):
    """data.source=hf with the dolly preset and the dirichlet partitioner is Dolly's split
    with Flower Datasets' partitioner: the same test split and training pool, other clients."""
    dolly = [
        {"instruction": f"{c} q{i}", "context": "", "response": f"{c} a{i}", "category": c} for c in CATEGORIES for i in range(15)
    ]
    path = write_jsonl(tmp_path / "dolly.jsonl", dolly)
    common = ["data.num_clients=4", "data.test_per_category=3", "data.dirichlet_alpha=1.0"]
    ours = load_federated_dataset(load_config(overrides=["data.source=dolly", f"data.path={path}", *common]).data, seed=0)
    flower = hf_data(path, "data.hf_preset=dolly", "data.hf_partitioner=dirichlet", *common)
    assert len(ours.heldout) == 4 and [(c.client_id, c.test) for c in ours.heldout] == [
        (c.client_id, c.test) for c in flower.heldout
    ]
    assert everything(ours) == everything(flower)
    assert by_client(ours) != by_client(flower)  # other random draws: other clients


# ----------------------------------------------------------------------------- bad input


def test_bad_rows_are_reported_by_file_and_row(tmp_path):
    bad = rows(12)
    bad[2]["output"] = "  "
    bad[5].pop("output")  # a missing key: a missing cell
    bad[7]["instruction"] = None
    path = write_jsonl(tmp_path / "data.jsonl", bad)
    data = hf_data(path, "data.num_clients=2", "data.test_per_category=0")
    assert data.issues == [
        f"{path}: row 3: empty column 'output'",
        f"{path}: row 6: empty column 'output'",
        f"{path}: row 8: empty column 'instruction'",
    ]
    assert sum(len(c.train) for c in data.clients) == 9
    with pytest.raises(DataError) as err:
        hf_data(path, "data.num_clients=2", "data.bad_records=error")
    assert str(err.value) == f"{path}: row 3: empty column 'output' (data.bad_records=skip skips such records)"


def _bad(tmp_path, name):
    """(path, overrides) of a bad case."""
    good = write_jsonl(tmp_path / "good.jsonl", rows(40))
    if name == "garbage.parquet":
        (tmp_path / name).write_bytes(b"this is not parquet at all")
        return tmp_path / name, []
    if name == "broken.jsonl":
        (tmp_path / name).write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "outp\n')
        return tmp_path / name, []
    if name == "data.txt":
        (tmp_path / name).write_text("instruction,output\n")
        return tmp_path / name, []
    return good, {
        "column": ["data.hf_columns.output=answer"],
        "preset column": ["data.hf_preset=dolly"],
        "partition column": ["data.hf_partitioner=natural-id", "data.hf_partition_by=client"],
        "empty partition": ["data.num_clients=50", "data.min_client_size=1"],
        "dirichlet": [
            "data.hf_partitioner=dirichlet",
            "data.num_clients=3",
            "data.dirichlet_alpha=0.01",
            "data.min_client_size=12",
        ],
        "split": ["data.hf_split=validation"],
    }[name]


@pytest.mark.parametrize(
    "case, message",
    [
        ("column", "{good}: data.hf_columns.output: no column 'answer' (columns: instruction, input, output, category, user)"),
        ("preset column", "{good}: data.hf_preset=dolly: no column 'response'"),
        ("partition column", "{good}: data.hf_partition_by: no column 'client'"),
        ("empty partition", "{good}: data.num_clients: 40 records cannot give 50 clients 1 each"),
        ("dirichlet", "{good}: data.hf_partitioner=dirichlet: "),
        ("garbage.parquet", "{path}: cannot be read by the datasets library: "),
        ("broken.jsonl", "{path}: cannot be read by the datasets library: "),
        ("data.txt", "{path}: unknown file type '.txt'"),
    ],
)
def test_bad_input_is_one_line_naming_the_column_or_file(tmp_path, case, message):
    path, overrides = _bad(tmp_path, case)
    with pytest.raises(DataError) as err:
        hf_data(path, "data.test_per_category=0", *overrides)
    text = str(err.value)
    assert "\n" not in text and text.startswith(message.format(good=tmp_path / "good.jsonl", path=path)), text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.hf_preset=flowertune"], "data.hf_preset: unknown preset 'flowertune'; choose from: alpaca, dolly,"),
        (
            ["data.hf_columns.answer=output"],
            "data.hf_columns: unknown role 'answer'; choose from: instruction, input, output, category",
        ),
        (["data.hf_columns.output=null"], "data.hf_columns.output: every example needs an output column"),
        (["data.path=./no/such.jsonl"], "data.path: not found: ./no/such.jsonl"),
        (["data.weight_by=source"], "data.weight_by: 'source' needs a natural-instructions clients.json"),
        (["data.hf_partitioner=shards"], "data.hf_partitioner: must be iid, dirichlet or natural-id"),
    ],
)
def test_config_mistakes_are_one_line_naming_the_key(tmp_path, overrides, message):
    path = write_jsonl(tmp_path / "good.jsonl", rows(4))
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["data.source=hf", f"data.path={path}", *overrides])
    assert "\n" not in str(err.value) and message in str(err.value)


def test_an_unreachable_hub_id_is_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        hf_data("flwrlabs/code-alpaca-20k")
    text = str(err.value)
    assert "\n" not in text and text.startswith(
        "data.path: 'flwrlabs/code-alpaca-20k' is no local file or folder, and the Hugging Face Hub could not be reached"
    )


def test_a_missing_hf_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "flwr_datasets" else real(name, *a, **k)
    )
    path = write_jsonl(tmp_path / "good.jsonl", rows(4))
    assert main(["run", "model=tiny-llama", "data.source=hf", f"data.path={path}", f"output.dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.source=hf needs the package flwr-datasets: pip install 'flexlora[hf]'" in err
    assert not (tmp_path / "runs").exists()


def test_table_examples_reads_typed_columns_and_rejects_nested_cells():
    from flexlora.data.hf import table_examples

    table = datasets.Dataset.from_dict({"q": ["a", "b", "c"], "label": [1, 0, 1], "tags": [["x"], ["y"], []]})
    issues = Issues()
    kept, examples, _ = table_examples(table, {"instruction": "q", "output": "label"}, "t", issues)
    assert kept == [0, 1, 2] and [e.output for e in examples] == ["1", "0", "1"]  # a label column as text
    kept, _, _ = table_examples(table, {"instruction": "q", "output": "tags"}, "t", issues)
    assert kept == [] and issues.lines[0] == "t: row 1: column 'tags' holds a list, expected text"


# ----------------------------------------------------------------------------- a run


def test_flexlora_run_trains_the_hf_clients(tmp_path, tiny_overrides, capsys):
    records = rows(36)
    for i, r in enumerate(records):
        r["user"] = 100 + (i % 6) % 4  # users 100 and 101 hold twice as many rows as 102 and 103
    path = write_jsonl(tmp_path / "data.jsonl", records)
    overrides = [o for o in tiny_overrides if not o.startswith(("data.num_clients", "federation.rounds"))]
    data_args = ["data.source=hf", f"data.path={path}", "data.hf_partitioner=natural-id", "data.hf_partition_by=user"]
    data_args += ["data.test_per_category=1", "data.heldout_ids=[103]"]
    assert main(["run", *overrides, *data_args, "federation.rounds=1", "federation.clients_per_round=3"]) == 0
    capsys.readouterr()
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "test" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in metrics] == [0, 1]
    trained = metrics[1]["clients"]
    assert set(trained) == {"100", "101", "102"}  # the natural ids; 103 is held out
    for client in trained.values():
        assert client["steps"] == 2 and client["trainable_params"] > 0
    # each client's weight is its share of the partition's training records
    data = load_federated_dataset(load_config(overrides=data_args).data, seed=0)
    sizes = {c.client_id: len(c.train) for c in data.clients}
    assert metrics[1]["weights"] == pytest.approx({cid: n / sum(sizes.values()) for cid, n in sizes.items()})
    assert sizes["100"] > sizes["102"]
    assert set(metrics[1]["eval"]["per_client"]) == {"103"} | {f"test:{c}" for c in CATEGORIES}
    assert metrics[1]["eval"]["eval_loss"] < metrics[0]["eval"]["eval_loss"]  # the training reached the model
