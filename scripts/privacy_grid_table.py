"""The privacy-utility table of docs/privacy.md ("What privacy costs, measured") from the grids
scripts/privacy_grid.sh writes: per method and noise multiplier σ, C, ε at δ, the final held-out
generated Rouge-L, its paired difference against the same method at σ = 0 (clipped) and against
the zero-shot model, with the intervals `flexlora compare` computes (flexlora.analysis.stats; with one seed
the two-level interval is the examples-only one), and for FlexLoRA the noise energy's shares
before and after truncation (metrics.jsonl, privacy.noise_energy; mean over rounds). The
zero-shot scores (the grid's zero_shot.json) are a baseline of their own: is a cell better than
the untrained model at all?

    python scripts/privacy_grid_table.py [docs/privacy_grid] > docs/privacy_grid/table.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from flexlora.analysis.cells import load_cells
from flexlora.analysis.differences import _categories_of, _final_examples
from flexlora.analysis.stats import paired_difference

METRIC = "rougeL_generated"


def cell_of(grid: Path, method: str) -> dict | None:
    if not (grid / "grid.json").is_file():
        return None
    _, rows = load_cells(grid)
    return next((r for r in rows if r["cell"].method == method), None)


def difference(row: dict, base: dict | None) -> str:
    if base is None:
        return "–"
    runs, baseline = [_final_examples(row)], [_final_examples(base)]
    d = paired_difference(runs, baseline, METRIC, categories=_categories_of([row, base], runs + baseline))
    text = f"{d.mean:+.3f} [{d.example_low:+.3f}, {d.example_high:+.3f}]"
    if d.has_categories:
        text += f" ({d.category_low:+.3f}, {d.category_high:+.3f})"
    return text + ("" if d.significant else " n.s.")


def zero_shot_row(root: Path) -> dict | None:
    """The base model's evaluation as a row `difference` reads (history of one evaluation)."""
    path = next(iter(sorted(root.glob("sigma-*/*/zero_shot.json"))), None)
    return {"history": [{"eval": json.loads(path.read_text())}]} if path else None


def share(value: float) -> str:
    """A share near 1 as 1 ∓ its distance from 1, so that it stays readable (a share can pass 1:
    the noise can point against ΔW)."""
    if abs(value - 1) >= 1e-3:
        return f"{value:.3f}"
    return f"1 {'−' if value < 1 else '+'} {abs(1 - value):.1e}"


def noise_shares(row: dict) -> str:
    records = [r["privacy"]["noise_energy"] for r in row["history"] if "noise_energy" in r.get("privacy", {})]
    if not records:
        return "–"
    parts = []
    for group in ("attention", "mlp"):
        before = statistics.mean(r[group]["share_before"] for r in records)
        after = statistics.mean(r[group]["share_after"] for r in records)
        retained = statistics.mean(r[group]["retained"] for r in records)
        parts.append(f"{group} {share(before)} → {share(after)} (kept {retained:.3f})")
    return "; ".join(parts)


def main(root: Path) -> None:
    sigmas = sorted((p for p in root.glob("sigma-*") if p.is_dir()), key=lambda p: float(p.name[6:]))
    zero = zero_shot_row(root)
    if zero is not None:
        print(f"Zero-shot (the base model): {zero['history'][0]['eval'][METRIC]:.3f}\n")
    print("| method | σ | C | ε (δ) | Rouge-L | − σ = 0 (clipped) | − zero-shot | noise share before → after truncation |")
    print("|---|---|---|---|---|---|---|---|")
    for method in ("flexlora", "fedit", "ffa"):
        clipped = cell_of(root / "sigma-0" / method, method)
        for sigma_dir in sigmas:
            row = cell_of(sigma_dir / method, method)
            sigma = sigma_dir.name[6:]
            if row is None:
                print(f"| {method} | {sigma} | | | not finished | | | |")
                continue
            privacy = row["summary"]["privacy"]
            eps = privacy["epsilon"]
            eps_text = "∞" if eps is None else f"{eps:.3g}"
            C = row["history"][-1]["privacy"]["clipping_norm"]
            print(
                f"| {method} | {sigma} | {C:.3g} | {eps_text} ({privacy['delta']:.2g}) | {row['summary']['final']:.3f} "
                f"| {difference(row, clipped) if sigma != '0' else '–'} | {difference(row, zero)} | {noise_shares(row)} |"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/privacy_grid"))
