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

from flexlora.config import ConfigError, load_config


def _run(args) -> None:
    from flexlora.experiment import run_experiment

    cfg = load_config(args.config, args.overrides)
    run_experiment(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexlora", description="Federated LoRA fine-tuning under heterogeneous tasks and resources")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated experiment (default: FlexLoRA on SmolLM2-135M, built-in tasks)")
    run.add_argument("--config", "-c", help="YAML config file")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federation.rounds=5 method=fedit")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"flexlora: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
