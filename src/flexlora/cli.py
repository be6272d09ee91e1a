"""Command line: `flexlora run | ...`. Errors in config or data end in one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Many small per-module linear-algebra calls: with OpenMP's default busy-wait, a 2-core machine
# shared with another process stalls ~0.4 s per call. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

from flexlora.config import ConfigError, load_config
from flexlora.data.types import DataError
from flexlora.reporting import WriteError

# Overrides that --resume accepts (e.g. to extend a finished run by more rounds).
RESUME_OVERRIDES = ("federation.rounds", "device")


def _run(args) -> None:
    from flexlora.engines import run_experiment

    engine = [f"engine={args.engine}"] if args.engine else []
    if args.resume is None:
        overrides = list(args.overrides) + (["output.overwrite=true"] if args.overwrite else []) + engine
        run_experiment(load_config(args.config, overrides))
        return
    run_dir = Path(args.resume)
    if args.config or args.overwrite:
        raise ConfigError("--resume takes its config from the run folder; --config and --overwrite cannot be combined with it")
    for text in args.overrides:
        key = text.split("=", 1)[0].strip()
        if key not in RESUME_OVERRIDES:
            raise ConfigError(f"--resume: '{key}' cannot be changed when resuming; allowed: {', '.join(RESUME_OVERRIDES)}")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume: {run_dir} is not a run folder (no config.yaml)")
    # The engine may change on resume: the checkpoint does not depend on it.
    run_experiment(load_config(run_dir / "config.yaml", [*args.overrides, *engine]), resume=run_dir)


def _flower_app(args) -> None:
    from flexlora.engines import FLOWER_APP

    print(FLOWER_APP)


def _flower_certs(args) -> None:
    from flexlora.engines.flower.certs import make_node_keys, make_tls_certificates

    tls = make_tls_certificates(args.out, args.host or ["127.0.0.1", "localhost"], args.days)
    keys = make_node_keys(args.out, [f"supernode-{i}" for i in range(1, args.nodes + 1)])
    for label, path in tls.items():
        print(f"{label}: {path}")
    for name, (private, public) in keys.items():
        print(f"{name}: {private} (private), {public} (public)")


def _node(args) -> None:
    from flexlora.engines.node.channel import ChannelError, default_socket_path, worker_status

    try:
        if args.node == "serve":
            from flexlora.engines.node.worker import main as serve

            serve(args)
        else:
            import json

            print(json.dumps(worker_status(args.socket or default_socket_path()), indent=2))
    except (ValueError, ChannelError) as e:
        raise ConfigError(f"node {args.node}: {e}") from None


def _eval(args) -> None:
    from flexlora.experiment import run_evaluation
    from flexlora.reporting import write_json

    config, adapter, merged = args.config, args.adapter, None
    if args.run:
        run_dir = Path(args.run)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--run: {run_dir} is not a run folder (no config.yaml)")
        config = config or str(run_dir / "config.yaml")
        if adapter is None and not args.base:
            if (run_dir / "merged" / "config.json").is_file() and not (run_dir / "adapter").exists():
                merged = run_dir / "merged"  # a method that changes the base weights exports the merged model
            else:
                adapter = str(run_dir / "adapter")
    if args.base and adapter is not None:
        raise ConfigError("--base evaluates the model without an adapter; drop --adapter")
    if adapter is None and not args.base and merged is None:
        raise ConfigError("flexlora eval needs --adapter DIR, --run RUN_DIR or --base")
    options = _lm_eval_options(args)
    cfg = load_config(config, [*args.overrides, *([f"model={merged}"] if merged else [])])
    metrics = {}
    if options is not None:  # first: a task whose data cannot load stops before Rouge-L's generation
        from flexlora.evaluation.lm_eval import run_lm_eval

        metrics["lm_eval"] = run_lm_eval(cfg, adapter, options, keep=args.keep_rank)
    if not args.lm_eval_only:
        metrics = run_evaluation(cfg, adapter, args.clients, keep=args.keep_rank) | metrics
    else:
        metrics = {"model": cfg.model, "adapter": str(adapter) if adapter is not None else None} | metrics
    if args.out:
        write_json(Path(args.out), metrics)
        print(f"metrics: {args.out}")


def _lm_eval_options(args):
    """LmEvalOptions from `--lm-eval*`, or None without --lm-eval (its other flags then refused)."""
    if args.lm_eval is None:
        given = [flag for flag, value in LM_EVAL_FLAGS.items() if getattr(args, value) not in (None, False, [])]
        if given:
            raise ConfigError(f"{given[0]} needs --lm-eval TASKS")
        return None
    from flexlora.evaluation.lm_eval import LmEvalOptions

    return LmEvalOptions(
        tasks=_list(args.lm_eval),
        include=args.lm_eval_include or [],
        limit=args.lm_eval_limit,
        num_fewshot=args.lm_eval_fewshot,
        chat_template=args.lm_eval_chat_template,
        batch_size=args.lm_eval_batch_size,
    )


# the flags that only mean something with --lm-eval -> their argparse names
LM_EVAL_FLAGS = {
    "--lm-eval-include": "lm_eval_include",
    "--lm-eval-limit": "lm_eval_limit",
    "--lm-eval-fewshot": "lm_eval_fewshot",
    "--lm-eval-chat-template": "lm_eval_chat_template",
    "--lm-eval-only": "lm_eval_only",
}


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _config(args) -> None:
    import json

    from flexlora.config import ExperimentConfig, reference_markdown, to_yaml

    if args.schema:
        print(json.dumps(ExperimentConfig.model_json_schema(), indent=2))
    elif args.reference:
        print(reference_markdown(), end="")
    else:
        print(to_yaml(load_config(args.config, args.overrides)), end="")


def _compare(args) -> None:
    from flexlora.analysis.report import write_report
    from flexlora.analysis.runner import command_line, run_grid

    if args.report_only:
        write_report(args.out)
        return
    try:
        seeds = [int(s) for s in _list(args.seeds)]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got '{args.seeds}'") from None
    run_grid(
        args.out,
        _list(args.methods),
        _list(args.profiles),
        seeds,
        args.config,
        args.overrides,
        baseline=args.baseline,
        command=command_line(args.argv),
    )


def _rank_report(args) -> None:
    from flexlora.analysis.rank_report import write_rank_report

    try:
        rounds = tuple(int(r) for r in args.rounds.split(",") if r.strip())
    except ValueError:
        raise ConfigError(f"--rounds: expected comma-separated integers, got '{args.rounds}'") from None
    try:
        md = write_rank_report(args.dirs, args.out or args.dirs[0], rounds)
    except ValueError as e:
        raise ConfigError(f"rank-report: {e}") from None
    print(f"rank report: {md}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexlora", description="Federated LoRA fine-tuning under heterogeneous tasks and resources"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated experiment (default: FlexLoRA on SmolLM2-135M, built-in tasks)")
    run.add_argument("--config", "-c", help="YAML config file")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder (output.overwrite=true)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federation.rounds=5 method=fedit")
    run.add_argument(
        "--engine",
        choices=["local", "flower"],
        help="local: in-process (default); flower: Flower's simulation engine (same as engine=flower)",
    )
    run.set_defaults(func=_run)
    ev = sub.add_parser("eval", help="evaluate a saved global adapter (or the base model) on any data source")
    ev.add_argument("--config", "-c", help="YAML config (default with --run: the run's config.yaml)")
    ev.add_argument("--run", help="a run folder: its config and its adapter/")
    ev.add_argument("--adapter", help="a PEFT adapter folder")
    ev.add_argument("--base", action="store_true", help="evaluate the base model without an adapter")
    ev.add_argument("--clients", default="heldout", help="heldout (default) | training | all: whose test sets")
    ev.add_argument("--out", help="write the metrics (overall, per client, per category) to this JSON file")
    ev.add_argument(
        "--keep-rank",
        type=int,
        metavar="R",
        help="evaluate the adapter with every component beyond rank R cut (A's rows, B's columns; the saved "
        "adapter is untouched): for FlexLoRA's SVD-ordered export its best rank-R approximation",
    )
    _add_lm_eval_flags(ev)
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.source=dolly data.path=...")
    ev.set_defaults(func=_eval)
    conf = sub.add_parser(
        "config",
        help="print the resolved configuration as YAML (defaults, --config file, overrides); --schema: the JSON schema",
    )
    conf.add_argument("--config", "-c", help="YAML config file")
    what = conf.add_mutually_exclusive_group()
    what.add_argument("--schema", action="store_true", help="print the configuration's JSON schema instead")
    what.add_argument(
        "--reference",
        action="store_true",
        help="print the Markdown reference of every key instead (flexlora config --reference > docs/configuration.md)",
    )
    conf.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method=fedit train.lr=1e-4")
    conf.set_defaults(func=_config)
    cmp = sub.add_parser(
        "compare",
        help="methods x resource profiles x seeds on one data source: a resumable grid and a Markdown/CSV/PNG report",
    )
    cmp.add_argument("--config", "-c", help="YAML config file shared by every cell")
    cmp.add_argument("--out", required=True, help="grid folder (cells/, compare.md/.csv/.png); rerun to resume")
    cmp.add_argument(
        "--methods",
        default="fedit,flexlora",
        help="comma-separated, e.g. fedit,hetlora,flexlora; NAME:KEY=VALUE is a variant with method_args "
        "of its own, in cells of its own (hetlora:padding=replication)",
    )
    cmp.add_argument("--profiles", default="uniform,heavy-tail-light,heavy-tail-strong", help="comma-separated resource profiles")
    cmp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    cmp.add_argument("--baseline", default="fedit", help="method the report measures improvements against")
    cmp.add_argument("--report-only", action="store_true", help="only rewrite the report from the finished cells")
    cmp.add_argument("overrides", nargs="*", help="key=value overrides for every cell, e.g. data.source=natural-instructions")
    cmp.set_defaults(func=_compare)
    rr = sub.add_parser(
        "rank-report",
        help="the rank-collapse summary (rank_collapse.md/.png) from runs' spectrum records: run folders or compare grid folders",
    )
    rr.add_argument("dirs", nargs="+", help="run folders, or `flexlora compare` grid folders (every cell)")
    rr.add_argument("--out", help="where to write the report (default: the first DIR)")
    rr.add_argument("--rounds", default="1,5,10", help="rounds whose share is tabulated (default 1,5,10)")
    rr.set_defaults(func=_rank_report)
    certs = sub.add_parser(
        "flower-certs",
        help="write a test CA, a SuperLink TLS certificate and SuperNode auth keys (trials/CI only)",
    )
    certs.add_argument("--out", required=True, help="folder to write into")
    certs.add_argument(
        "--host",
        action="append",
        help="SuperLink host name or IP for the certificate (repeatable; default 127.0.0.1 and localhost)",
    )
    certs.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make (default 2)")
    certs.add_argument("--days", type=int, default=30, help="certificate validity in days (default 30)")
    certs.set_defaults(func=_flower_certs)
    app = sub.add_parser("flower-app", help='print the folder of the Flower app, for `flwr run "$(flexlora flower-app)" ...`')
    app.set_defaults(func=_flower_app)

    node = sub.add_parser(
        "node",
        help="a long-lived node worker for a Flower deployment: loads the base model once, trains its SuperNode's tasks",
    ).add_subparsers(dest="node", required=True)
    ns = node.add_parser(
        "serve", help="load the base model and serve tasks on a private Unix socket (node config worker-socket=PATH)"
    )
    ns.add_argument(
        "--socket",
        help="socket path, in a folder only this user can enter (default $XDG_RUNTIME_DIR/flexlora/node.sock or ~/.flexlora/node.sock)",
    )
    ns.add_argument(
        "--model", default="smollm2-135m-instruct", help="base model: the runs' `model` (or the node config's local `model` path)"
    )
    ns.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16", "nf4"],
        help="base weights; must match the runs' model_dtype/quantization",
    )
    ns.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda[:N]")
    ns.add_argument("--seed", type=int, default=0, help="the runs' seed (draws the weights of tiny-llama / random-llama-1b)")
    ns.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory, same result)")
    ns.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ns.add_argument(
        "--max-queued", type=int, default=4, help="tasks that may wait while one trains; more are refused (default 4)"
    )
    ns.set_defaults(func=_node)
    nst = node.add_parser("status", help="ask a running worker what it serves and what it did")
    nst.add_argument("--socket", help="socket path (default as for serve)")
    nst.set_defaults(func=_node)

    _add_benchmarks(sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True))
    return parser


def _add_lm_eval_flags(ev) -> None:
    lm = ev.add_argument_group("lm-evaluation-harness (the extra lmeval; docs/data_and_eval.md)")
    lm.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="also score lm-eval tasks, comma-separated (e.g. mmlu,arc_easy, or tasks of --lm-eval-include); "
        "the scores go into --out's JSON under lm_eval",
    )
    lm.add_argument(
        "--lm-eval-include", action="append", metavar="PATH", help="a folder of task YAML files of your own (repeatable)"
    )
    lm.add_argument("--lm-eval-limit", type=int, metavar="N", help="only the first N examples of each task (a quick look)")
    lm.add_argument("--lm-eval-fewshot", type=int, metavar="K", help="few-shot examples per prompt (default: each task's own)")
    lm.add_argument("--lm-eval-chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    lm.add_argument("--lm-eval-batch-size", type=int, default=8, metavar="B", help="requests per forward pass (default 8)")
    lm.add_argument("--lm-eval-only", action="store_true", help="skip Rouge-L on the data source's clients: lm-eval only")


def _add_benchmarks(bench) -> None:
    """`flexlora bench <name>`: each benchmark module adds its own flags and runs its command
    (flexlora.bench: HELP, add_arguments, run_command)."""
    from flexlora.bench import commands

    for name, module in commands():
        parser = bench.add_parser(name, help=module.HELP)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run_command)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but `key=value` overrides may come anywhere among the flags
    (`run method=fedit --overwrite seed=0`): argparse takes a command's positionals only before
    its first flag, so the ones after it come back unrecognized and are appended here, in order."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [t for t in rest if "=" in t and not t.startswith("-")]
    unknown = [t for t in rest if t not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for the report's "exact command"
    try:
        args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"flexlora: error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:  # the run started and stopped on a failed write: exit 1, one line
        print(f"flexlora: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
