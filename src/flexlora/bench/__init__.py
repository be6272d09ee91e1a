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
lines) is in flexlora.bench.common. A module exposes `run_benchmark(...)` (or
`run_eval_benchmark`), `format_table(rows)` and `goals(rows)`; cli.py maps its flags.
"""
