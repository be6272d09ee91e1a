"""lm-evaluation-harness on a saved adapter, a merged model or the base model
(`flexlora eval --lm-eval TASKS`): any of the harness's tasks (MMLU, HellaSwag, ARC, ... where
the Hub is reachable) or task YAMLs of one's own (`--lm-eval-include`, e.g. over a local JSON
file), scored by the harness's Hugging Face model (`HFLM`) and written into the eval JSON beside
Rouge-L, with the harness's version and each task's version.

The model is built here and handed to HFLM as a model object, not as a name for HFLM to load
with its `peft=` argument: flexlora's model sources are not all folders HFLM can load (the
bundled SmolLM2 is a GGUF file whose tokenizer transformers converts; tiny-llama and
random-llama-1b are drawn from a seed with a byte-level tokenizer), and the run's `model_dtype`,
`quantization` and `device` must apply. The adapter is read by PEFT
(`PeftModel.from_pretrained`, what `peft=` does) and applied as every flexlora evaluation applies
it (evaluation.adapters: merged into float32 weights, `--keep-rank` honoured), so that the
harness scores the same model as Rouge-L; tests/test_lm_eval.py checks that the scores equal
HFLM's own `pretrained=FOLDER, peft=ADAPTER` loading."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from flexlora.config import ConfigError, ExperimentConfig
from flexlora.extras import require

FEATURE = "flexlora eval --lm-eval"
# HFLM's notes when handed a model object: expected here, not something a user can act on.
_EXPECTED_NOTES = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


@dataclass
class LmEvalOptions:
    """What `flexlora eval --lm-eval*` asks of the harness."""

    tasks: list[str]
    include: list[str] = field(default_factory=list)  # folders (or files) of task YAMLs
    limit: int | None = None  # examples per task (the first N; for a quick look, not a score to quote)
    num_fewshot: int | None = None  # None: each task's own default
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template
    batch_size: int = 8

    def __post_init__(self):
        if not self.tasks:
            raise ConfigError("--lm-eval: no task named (comma-separated lm-eval task names, e.g. --lm-eval arc_easy,hellaswag)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--lm-eval-limit: must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"--lm-eval-batch-size: must be >= 1, got {self.batch_size}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"--lm-eval-fewshot: must be >= 0, got {self.num_fewshot}")
        for path in self.include:
            if not Path(path).exists():
                raise ConfigError(f"--lm-eval-include: {path} does not exist (a folder of lm-eval task YAML files)")


def task_manager(options: LmEvalOptions):
    """The harness's task index, every requested name checked before any model loads. Only the
    include paths are indexed when they hold every task (indexing the harness's own 14,000
    tasks and groups takes about ten seconds)."""
    require("lm_eval", FEATURE)
    from lm_eval.tasks import TaskManager

    def unknown_to(manager) -> list[str]:
        return [t for t in options.tasks if t not in manager.all_tasks and not t.endswith((".yaml", ".yml"))]

    if options.include:
        manager = TaskManager(include_path=options.include, include_defaults=False)
        if not unknown_to(manager):
            return manager
    manager = TaskManager(include_path=options.include or None)
    if unknown := unknown_to(manager):
        where = " or under " + ", ".join(options.include) if options.include else ""
        raise ConfigError(
            f"--lm-eval: unknown task {', '.join(repr(t) for t in unknown)} (not among lm-eval's tasks{where}; "
            "`lm-eval ls tasks` lists them)"
        )
    return manager


def score(model, tokenizer, options: LmEvalOptions, manager) -> dict:
    """The harness's scores of `model` (any causal LM, a PEFT model included) on the tasks, as
    the eval JSON's `lm_eval` section (summarize)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    quiet = _DropNotes()
    hf_logger.addFilter(quiet)
    try:
        # A tokenizer that ends every text with EOS (T5-style, as tiny-llama's byte-level one)
        # would put EOS between a task's context and its continuation: lm-eval's
        # add_bos_token=False encodes without special tokens, as flexlora trains. Any other
        # tokenizer keeps its own (BOS or none), as lm-eval runs any Hugging Face model.
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=options.batch_size,
            add_bos_token=False if appends_eos(tokenizer) else None,
        )
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(options.tasks),
            task_manager=manager,
            limit=options.limit,
            num_fewshot=options.num_fewshot,
            apply_chat_template=options.chat_template,
            log_samples=False,
        )
    except (ConnectionError, FileNotFoundError) as e:  # a Hub dataset offline, a data file missing
        raise ConfigError(f"--lm-eval: a task's data could not be loaded: {_one_line(e)}") from None
    except Exception as e:
        # A task YAML's doc_to_text/doc_to_target naming a field its data lacks: the harness's
        # Jinja templates raise jinja2's errors (matched by module: jinja2 is lm-eval's dependency).
        if type(e).__module__.startswith("jinja2"):
            raise ConfigError(f"--lm-eval: a task's prompt template failed on its data: {_one_line(e)}") from None
        raise
    finally:
        hf_logger.removeFilter(quiet)
    return summarize(results, options)


def summarize(results: dict, options: LmEvalOptions) -> dict:
    """lm-eval's result dict -> {harness_version, tasks: {name: {version, num_fewshot, examples,
    metrics, higher_is_better}}, groups: {...} (groups' aggregate scores, if any), options}.
    A metric is named as lm-eval names it without its filter when that is "none" ("acc",
    "acc_stderr"; "exact_match,strict-match" keeps its filter); a stderr lm-eval did not compute
    ("N/A") is null."""
    group_names = set(results.get("groups", {}))
    sections: dict[str, dict] = {"tasks": {}, "groups": {}}
    for name, row in results["results"].items():
        metrics = {}
        for key, value in row.items():
            if "," not in key:  # alias, name, sample_len: labels, not scores
                continue
            metric, filter_name = key.split(",", 1)
            metrics[metric if filter_name == "none" else key] = None if value == "N/A" else value
        entry = {"version": results["versions"].get(name), "metrics": metrics}
        if name in results.get("n-shot", {}):
            entry["num_fewshot"] = results["n-shot"][name]
        if name in results.get("n-samples", {}):
            entry["examples"] = results["n-samples"][name]["effective"]
        entry["higher_is_better"] = results.get("higher_is_better", {}).get(name, {})
        sections["groups" if name in group_names else "tasks"][name] = entry
    summary = {"harness_version": results.get("lm_eval_version"), "tasks": sections["tasks"]}
    if sections["groups"]:
        summary["groups"] = sections["groups"]
    summary |= {
        "limit": options.limit,
        "num_fewshot": options.num_fewshot,
        "chat_template": options.chat_template,
        "include": [str(Path(p).resolve()) for p in options.include],
    }
    return summary


def run_lm_eval(cfg: ExperimentConfig, adapter: str | Path | None, options: LmEvalOptions, keep: int | None = None, echo=print):
    """Score the base model of `cfg` (its model, dtype, quantization, device), with the saved
    PEFT adapter if given (cut to rank `keep`), on the harness's tasks."""
    from flexlora.evaluation.adapters import adapter as applied
    from flexlora.evaluation.adapters import check_adapter, keep_rank_line, read_adapter
    from flexlora.experiment import load_base, resolve_device

    check_adapter(keep, adapter)
    manager = task_manager(options)
    model, tokenizer = load_base(cfg, resolve_device(cfg.device))
    saved = read_adapter(model, adapter, keep) if adapter is not None else None
    if saved is not None and keep is not None:
        echo(keep_rank_line(adapter, saved))
    with applied(model, *(saved.applied() if saved else (None, None, None, None))) as evaluated:
        section = score(evaluated, tokenizer, options, manager)
    what = f"adapter {adapter}" if adapter is not None else f"model {cfg.model}"
    echo(f"lm-eval {section['harness_version']} on {what}:")
    for kind in ("tasks", "groups"):
        for name, entry in section.get(kind, {}).items():
            echo(f"  {name}: " + result_line(entry))
    return section


def result_line(entry: dict) -> str:
    """'v2.0, 0-shot, 3 examples: acc 0.3333 ± 0.2722, acc_norm ...'"""
    metrics = entry["metrics"]
    parts = []
    for name, value in metrics.items():
        if "_stderr" in name or not isinstance(value, int | float):
            continue
        stderr = metrics.get(name.replace(",", "_stderr,", 1) if "," in name else f"{name}_stderr")
        parts.append(f"{name} {value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, int | float) else ""))
    about = [f"v{entry['version']}"] if entry.get("version") is not None else []
    about += [f"{entry['num_fewshot']}-shot"] if "num_fewshot" in entry else []
    about += [f"{entry['examples']} examples"] if "examples" in entry else []
    return ", ".join(about) + ": " + (", ".join(parts) or "no scores")


def appends_eos(tokenizer) -> bool:
    """Whether the tokenizer's default encoding ends a text with its EOS token."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id


class _DropNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPECTED_NOTES)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
