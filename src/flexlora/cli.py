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


def _bench_aggregate(args) -> None:
    from flexlora import bench

    if args.quick:
        sizes, repeat = ["quick"], 1
    else:
        sizes, repeat = args.sizes.split(","), args.repeat
    try:
        rows = bench.run_benchmark(
            sizes, args.cases.split(","), args.modes.split(","),
            seed=args.seed, device=args.device, repeat=repeat, oversample=args.oversample, niter=args.niter,
        )
    except ValueError as e:
        raise ConfigError(f"bench aggregate: {e}") from None
    print()
    print(bench.format_table(rows))
    print()
    print("\n".join(bench.goals(rows)))
    if args.json:
        bench.write_json(rows, args.json)
        print(f"results: {args.json}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexlora", description="Federated LoRA fine-tuning under heterogeneous tasks and resources")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated experiment (default: FlexLoRA on SmolLM2-135M, built-in tasks)")
    run.add_argument("--config", "-c", help="YAML config file")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federation.rounds=5 method=fedit")
    run.set_defaults(func=_run)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    agg = bench.add_parser(
        "aggregate",
        help="FlexLoRA's server step vs the reference procedure (per-client products + full SVD) on random client factors",
    )
    agg.add_argument("--sizes", default="1.3b,8b", help="comma-separated: quick (512x512, 512x1376), 1.3b (2048x2048, 2048x5504), 8b (4096x4096, 4096x14336)")
    agg.add_argument("--cases", default="a,b", help="a: 10 clients from heavy-tail-light; b: 80 clients from heavy-tail-strong")
    agg.add_argument("--modes", default="auto,dense,randomized", help="FlexLoRA svd modes: auto, factored, dense, randomized")
    agg.add_argument("--quick", action="store_true", help="small shapes only, one repeat (seconds)")
    agg.add_argument("--repeat", type=int, default=1, help="best of N timings (default 1)")
    agg.add_argument("--seed", type=int, default=0)
    agg.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    agg.add_argument("--oversample", type=int, default=64, help="randomized mode: extra subspace columns")
    agg.add_argument("--niter", type=int, default=2, help="randomized mode: power iterations")
    agg.add_argument("--json", help="also write the rows to this JSON file")
    agg.set_defaults(func=_bench_aggregate)
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
