"""Cost of the reliability layer at SmolLM2-135M's shapes (no model needed): one round's update
validation and one checkpoint write/read. Usage: PYTHONPATH=src python scripts/bench_reliability.py

4 clients a round at the paper's uniform ranks (T1..T4: attention/MLP 8/8, 30/30, 30/200,
200/200), 30 layers x 7 projections = 210 modules; the FlexLoRA state keeps K = min(ΣR, m, n).
"""

import tempfile
import time
import types
from pathlib import Path

import torch

from flexlora.aggregation.base import ClientUpdate
from flexlora.checkpoint import load_checkpoint, save_checkpoint
from flexlora.validation import check_update, update_norm, validate_round

PROJ = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
        "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
SHAPES = {f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}": mn for i in range(30) for p, mn in PROJ.items()}
TYPES = [(8, 8), (30, 30), (30, 200), (200, 200)]


def timed(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, min(times), max(times)


def main():
    torch.manual_seed(0)
    tasks, updates = [], []
    for i, (ra, rm) in enumerate(TYPES):
        ranks = {m: min(rm if ".mlp." in m else ra, *SHAPES[m]) for m in SHAPES}
        tasks.append(types.SimpleNamespace(client_id=f"c{i}", module_ranks=ranks, factors=None, options={}))
        updates.append(ClientUpdate(f"c{i}", 100, 16.0, {m: (torch.randn(r, SHAPES[m][1]) * 0.01, torch.randn(SHAPES[m][0], r) * 0.01) for m, r in ranks.items()}))
    (valid, rejected), lo, hi = timed(lambda: validate_round(updates, tasks, SHAPES, 16.0, max_norm_ratio=10.0))
    print(f"validate_round, 4 clients x {len(SHAPES)} modules: {lo:.2f}-{hi:.2f} s ({len(valid)} valid, {len(rejected)} rejected)")
    _, lo, hi = timed(lambda: [check_update(u, t, SHAPES, 16.0) for u, t in zip(updates, tasks)])
    print(f"  of which shape/dtype/finiteness checks: {lo:.2f}-{hi:.2f} s")
    _, lo, hi = timed(lambda: [update_norm(u) for u in updates])
    print(f"  of which update norms (float32 Gram matrices): {lo:.2f}-{hi:.2f} s")

    R = {m: sum(min(rm if ".mlp." in m else ra, *SHAPES[m]) for ra, rm in TYPES) for m in SHAPES}
    state = {}
    for m, (rows, cols) in SHAPES.items():
        k = min(R[m], rows, cols)
        state[f"{m}.U"], state[f"{m}.S"], state[f"{m}.Vh"] = torch.randn(rows, k), torch.rand(k), torch.randn(k, cols)
    server = types.SimpleNamespace(round=1, state_dict=lambda: ({f"state/{k}": v for k, v in state.items()}, {"round": server.round}))
    history = [{"round": r, "eval": {"rougeL_generated": 0.1}} for r in range(50)]
    with tempfile.TemporaryDirectory() as d:
        for i in range(3):
            server.round = i + 1
            t = time.perf_counter()
            save_checkpoint(Path(d), server, history, {})
            write = time.perf_counter() - t
            size = sum(f.stat().st_size for f in Path(d).iterdir())
            t = time.perf_counter()
            load_checkpoint(Path(d))
            read = time.perf_counter() - t
            print(f"checkpoint of {len(state)} tensors, {size / 2**20:.0f} MiB: write {write:.2f} s, read {read:.2f} s")


if __name__ == "__main__":
    main()
