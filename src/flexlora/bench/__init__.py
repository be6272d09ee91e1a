"""Benchmarks, one module each, run as `flexlora bench <name>` (or `python -m flexlora.bench <name>`):

- aggregate: FlexLoRA's server step against the released code's procedure (per-client products,
  full SVD), on random client factors at LLaMA module shapes;
- client: one client's local training per precision option (float32, bfloat16, nf4,
  +gradient checkpointing): peak memory and tokens/s, each in a fresh process, next to a bare
  PEFT loop;
- scale: a real federation at growing clients per round, each run its own process: peak
  resident memory, seconds per client, the server's share of a round;
- eval: evaluation examples/s, the two-prefill path against the cached one.
- deployment: what a round costs on a loopback Flower deployment (TLS, node authentication),
  with and without node workers, against the simulation engine and the in-process runtime.

What they share (child-process environment, memory sampling, interleaved timing, PASS/FAIL goal
lines, the printed report) is in flexlora.bench.common; the loopback Flower deployment that
`deployment` runs is flexlora.bench.loopback. A benchmark is one module that exposes its
command: ``HELP`` (its line in `flexlora bench --help`), ``add_arguments(parser)`` (its flags)
and ``run_command(args)``, besides `run_benchmark(...)` (or `run_eval_benchmark`),
`format_table(rows)` and `goals(rows)`. cli.py finds the modules that have ``add_arguments``
(``commands()``): adding a benchmark touches no other file. A benchmark module imports torch
and the model code inside its functions, never at module level, so that building the command
line stays light.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def commands() -> list[tuple[str, ModuleType]]:
    """(name, module) of every benchmark: the modules of this package with ``add_arguments``,
    by name."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "add_arguments"):
            found.append((info.name, module))
    return sorted(found, key=lambda item: item[0])
