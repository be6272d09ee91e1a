"""`flexlora eval --lm-eval`: lm-evaluation-harness scores a saved adapter, a merged model or the
base model, offline, on tasks the test writes (a multiple-choice and a generate-until task over
local JSONL files). A federation trained on the tasks' pattern moves the harness's scores; the
scores equal those of the harness loading the same adapter itself (HFLM's `peft=`); the eval
JSON carries the metrics, the harness's version and the tasks' versions; bad input is one line."""

import importlib.metadata
import importlib.util
import json
import random

import pytest
import torch

from flexlora.cli import main
from flexlora.extras import quiet_peft

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (pip install 'flexlora[lmeval]')"
)

ANIMAL, WORDS = "zebra", ["apple", "river", "stone", "cloud", "lamp", "chair", "piano", "bread", "candle", "forest", "mirror"]
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\\n\\n### Instruction:\\n{{question}}\\n\\n### Response:\\n"
)  # the run's prompt template (data.template=alpaca), so that what the federation learnt applies


def _questions(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Name the animal: {' '.join(rng.sample(WORDS, 2))} {ANIMAL}" for _ in range(n)]


def write_training_data(path):
    """Four clients' records, each answering the animal among words: what the federation learns."""
    with path.open("w") as f:
        for i, question in enumerate(_questions(0, 40)):
            f.write(json.dumps({"instruction": question, "output": ANIMAL, "client": f"c{i % 4}"}) + "\n")
    return path


def write_tasks(folder):
    """A folder of two lm-eval tasks over local JSONL files (never the Hub): `animal_mc` (multiple
    choice: the animal among two other words, scored by accuracy and Brier score) and
    `animal_gen` (generate-until, exact match); and a group, `animals`, of the first."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    with (folder / "animals.jsonl").open("w") as f:
        for question in _questions(1, 12):
            choices = rng.sample(WORDS, 2)
            gold = rng.randrange(3)
            choices.insert(gold, ANIMAL)
            f.write(json.dumps({"question": question, "choices": choices, "answer": gold}) + "\n")
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "animals.jsonl"}
  cache_dir: {folder / "hf-cache"}
test_split: test
doc_to_text: "{ALPACA}"
"""
    (folder / "animal_mc.yaml").write_text(f"""task: animal_mc
{common}output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: brier_score
    aggregation: brier_score
    higher_is_better: false
metadata:
  version: 3.0
""")
    (folder / "animal_gen.yaml").write_text(f"""task: animal_gen
{common}output_type: generate_until
doc_to_target: "{{{{choices[answer]}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 10
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
""")
    (folder / "animals.yaml").write_text("""group: animals
task: [animal_mc]
aggregate_metric_list:
  - metric: acc
    aggregation: mean
metadata:
  version: 4.0
""")
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No Hub: the tasks' data is local, and a Hub-hosted one must fail at once, not retry."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, task folder): a tiny federation (tiny-llama, 3 clients, 2 rounds) trained on
    the animal records; about 20 s."""
    root = tmp_path_factory.mktemp("lm_eval")
    data = write_training_data(root / "train.jsonl")
    overrides = [
        "model=tiny-llama",
        "device=cpu",
        "data.source=json",
        f"data.path={data}",
        "data.test_per_category=0",
        "data.heldout_ids=[c3]",
        "federation.rounds=2",
        "federation.clients_per_round=3",
        "train.steps=4",
        "train.batch_size=4",
        "train.lr=3e-3",
        "eval.max_new_tokens=2",
        "eval.max_examples_per_client=1",
        "resources.profile=homo",
        "resources.t1=8",
        f"output.dir={root / 'runs'}",
        "output.name=animals",
    ]
    assert main(["run", *overrides]) == 0
    return root / "runs" / "animals", write_tasks(root / "tasks")


def _lm_eval(args, out, tasks="animals,animal_gen") -> dict:
    assert main(["eval", *args, "--lm-eval", tasks, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_a_trained_adapter_scores_above_the_base_model_in_the_eval_json(trained, tmp_path):
    run, tasks = trained
    include = ["--lm-eval-include", str(tasks)]
    base = _lm_eval(["--run", str(run), "--base", *include, "--lm-eval-only"], tmp_path / "base.json")
    tuned = _lm_eval(["--run", str(run), *include], tmp_path / "tuned.json")  # with Rouge-L on the run's held-out client

    assert tuned["adapter"] == str(run / "adapter") and base["adapter"] is None
    for result in (base, tuned):
        section = result["lm_eval"]
        assert section["harness_version"] == importlib.metadata.version("lm_eval")
        mc, gen = section["tasks"]["animal_mc"], section["tasks"]["animal_gen"]
        assert (mc["version"], gen["version"]) == (3.0, 2.0)  # the tasks' own versions
        assert mc["examples"] == gen["examples"] == 12 and mc["num_fewshot"] == 0
        assert set(mc["metrics"]) == {"acc", "acc_stderr", "brier_score", "brier_score_stderr"}
        assert mc["higher_is_better"] == {"acc": True, "brier_score": False}
        group = section["groups"]["animals"]  # a group's aggregate, as for mmlu
        assert float(group["version"]) == 4.0 and group["metrics"]["acc"] == mc["metrics"]["acc"]
    assert "rougeL_generated" in tuned and "eval_loss" in tuned  # one JSON: Rouge-L beside the harness
    assert "rougeL_generated" not in base

    scores = {name: r["lm_eval"]["tasks"] for name, r in (("base", base), ("tuned", tuned))}
    # The random base model picks among three words near chance and never writes the animal;
    # the federation's adapter picks it every time and writes it.
    assert scores["base"]["animal_mc"]["metrics"]["acc"] < 0.8
    assert scores["tuned"]["animal_mc"]["metrics"]["acc"] == 1.0
    assert scores["tuned"]["animal_mc"]["metrics"]["brier_score"] < scores["base"]["animal_mc"]["metrics"]["brier_score"]
    assert scores["base"]["animal_gen"]["metrics"]["exact_match"] == 0.0
    assert scores["tuned"]["animal_gen"]["metrics"]["exact_match"] == 1.0


def test_the_scores_are_the_harness_own_loading_of_the_adapter(trained, tmp_path):
    """HFLM(pretrained=FOLDER, peft=ADAPTER), the harness loading the base and the adapter
    itself, scores what `flexlora eval --lm-eval` scores (its model object, the adapter merged).
    A random adapter of rank 8 on every projection, so that the Brier score is far from its bounds (0 and 2)
    and a different model could not match it by chance."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from flexlora import lora
    from flexlora.models import default_target_modules, load_model

    _, tasks = trained
    model, tokenizer = load_model("tiny-llama", torch.device("cpu"), seed=0)
    targets = default_target_modules(model)
    generator = torch.Generator().manual_seed(0)
    factors = {
        name: (0.3 * torch.randn(8, d_in, generator=generator), 0.3 * torch.randn(d_out, 8, generator=generator))
        for name, (d_out, d_in) in lora.module_shapes(model, targets).items()
    }
    adapter = lora.save_adapter(model, factors, {name: 8 for name in factors}, 16.0, targets, tmp_path / "adapter")
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")

    args = ["model=tiny-llama", "device=cpu", "--lm-eval-include", str(tasks), "--lm-eval-only"]
    ours = _lm_eval(["--adapter", str(adapter), *args], tmp_path / "ours.json", "animal_mc")["lm_eval"]["tasks"]["animal_mc"]
    base = _lm_eval(["--base", *args], tmp_path / "base.json", "animal_mc")["lm_eval"]["tasks"]["animal_mc"]
    # add_bos_token=False: the byte-level tokenizer would end each context with EOS (see score())
    with quiet_peft():
        lm = HFLM(
            pretrained=str(tmp_path / "base"), peft=str(adapter), device="cpu", dtype="float32", batch_size=8, add_bos_token=False
        )
    theirs = lm_eval.simple_evaluate(
        model=lm, tasks=["animal_mc"], task_manager=TaskManager(include_path=str(tasks), include_defaults=False)
    )["results"]["animal_mc"]
    assert ours["metrics"]["acc"] == theirs["acc,none"]
    assert ours["metrics"]["brier_score"] == pytest.approx(theirs["brier_score,none"], abs=1e-5)
    assert 0.05 < ours["metrics"]["brier_score"] < 1.95  # a Brier score over three choices lies in [0, 2]
    assert abs(ours["metrics"]["brier_score"] - base["metrics"]["brier_score"]) > 0.01  # the adapter acted


def test_a_run_that_exports_a_merged_model_is_scored_from_merged(trained, tmp_path):
    """A method that changes the base weights (FLoRA, FLoRIST, FedEx-LoRA) exports `merged/`,
    not `adapter/`: `--run` scores that model. Here merged/ is the tiny base with the trained
    adapter merged by PEFT, so it scores what the adapter scores."""
    import shutil

    from peft import PeftModel

    from flexlora.models import load_model

    run, tasks = trained
    model, tokenizer = load_model("tiny-llama", torch.device("cpu"), seed=0)
    merged_run = tmp_path / "merged-run"
    merged_run.mkdir()
    shutil.copy(run / "config.yaml", merged_run / "config.yaml")
    with quiet_peft():
        PeftModel.from_pretrained(model, str(run / "adapter")).merge_and_unload().save_pretrained(merged_run / "merged")
    tokenizer.save_pretrained(merged_run / "merged")
    include = ["--lm-eval-include", str(tasks), "--lm-eval-only", "--lm-eval-limit", "6"]
    merged = _lm_eval(["--run", str(merged_run), *include], tmp_path / "m.json", "animal_mc")
    adapter = _lm_eval(["--run", str(run), *include], tmp_path / "a.json", "animal_mc")
    assert merged["model"] == str(merged_run / "merged") and merged["adapter"] is None
    assert merged["lm_eval"]["limit"] == 6 and merged["lm_eval"]["tasks"]["animal_mc"]["examples"] == 6
    got, want = merged["lm_eval"]["tasks"]["animal_mc"]["metrics"], adapter["lm_eval"]["tasks"]["animal_mc"]["metrics"]
    assert got["acc"] == want["acc"] == 1.0 and got["brier_score"] == pytest.approx(want["brier_score"], abs=1e-6)


def test_bad_input_is_one_line(trained, tmp_path, capsys, monkeypatch):
    run, tasks = trained
    hub_task = tmp_path / "hub" / "hub_task.yaml"
    hub_task.parent.mkdir()
    hub_task.write_text((tasks / "animal_mc.yaml").read_text().replace("task: animal_mc", "task: hub_task").replace(
        "dataset_path: json", "dataset_path: flexlora-tests/not-on-this-machine"
    ))  # fmt: skip
    typo = tmp_path / "typo" / "typo_task.yaml"
    typo.parent.mkdir()
    typo.write_text((tasks / "animal_mc.yaml").read_text().replace("task: animal_mc", "task: typo_task").replace(
        "{{choices}}", "{{choises}}"
    ))  # fmt: skip
    cases = {
        ("--lm-eval-limit", "3"): "--lm-eval-limit needs --lm-eval TASKS",
        ("--lm-eval", "animal_mc", "--lm-eval-include", str(tasks), "--lm-eval-limit", "0"): "--lm-eval-limit: must be >= 1, got 0",
        ("--lm-eval", "animal_mc", "--lm-eval-include", str(tmp_path / "nowhere")): f"--lm-eval-include: {tmp_path / 'nowhere'} does not exist",
        ("--lm-eval", "animal_mc", "--lm-eval-include", str(tasks), "--keep-rank", "0"): "--keep-rank: must be >= 1, got 0",
        ("--lm-eval", ",", "--lm-eval-include", str(tasks)): "--lm-eval: no task named",
        ("--lm-eval", "hub_task", "--lm-eval-include", str(hub_task.parent), "--lm-eval-only"): (
            "--lm-eval: a task's data could not be loaded: Couldn't reach 'flexlora-tests/not-on-this-machine' on the Hub"
        ),
        ("--lm-eval", "typo_task", "--lm-eval-include", str(typo.parent), "--lm-eval-only"): (
            "--lm-eval: a task's prompt template failed on its data: 'choises' is undefined"
        ),
    }  # fmt: skip
    for args, message in cases.items():
        assert main(["eval", "--run", str(run), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

    # An unknown task name: looked up in the include folder, then among lm-eval's own tasks.
    assert main(["eval", "--run", str(run), "--lm-eval", "animal_mc,no_such_task", "--lm-eval-include", str(tasks)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lm-eval: unknown task 'no_such_task' (not among lm-eval's tasks or under" in err

    # Without the package: one line naming the extra, before any model loads.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "lm_eval" else real(name, *a, **k))
    assert main(["eval", "--run", str(run), "--lm-eval", "animal_mc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flexlora eval --lm-eval needs the package lm-eval: pip install 'flexlora[lmeval]'" in err
