"""The NI grid after LoRA-A² changed rule (issue 30): its six cells of the earlier rule are the
variant lora_a2:score=gradient:lr_b_ratio=1, finished; the plain lora_a2 cells (the published
rule) are registered, to be run by scripts/compare_ni.sh's stage a2; stage 3's rival rule still
reads the cells it was fixed on."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess

from flexlora.analysis.cells import Cell, load_cells

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANT = "lora_a2:score=gradient:lr_b_ratio=1"
PROFILES = ["heavy-tail-light", "heavy-tail-strong"]


def test_the_earlier_rule_s_cells_are_a_finished_variant_and_the_plain_cells_are_registered():
    grid, rows = load_cells(ROOT / "docs" / "compare_ni")
    cells = [Cell(**c) for c in grid["cells"]]
    expected = {(p, s) for p in PROFILES for s in range(3)}
    assert {(c.profile, c.seed) for c in cells if c.method == VARIANT} == expected
    assert {(c.profile, c.seed) for c in cells if c.method == "lora_a2"} == expected
    finished = {(r["cell"].profile, r["cell"].seed) for r in rows if r["cell"].method == VARIANT}
    assert finished == expected  # each under its variant name: lora_a2-score-gradient-lr_b_ratio-1-...
    assert Cell(VARIANT, "heavy-tail-light", 0).name == "lora_a2-score-gradient-lr_b_ratio-1-heavy-tail-light-seed0"


def script(tmp_path, finals: dict, stages: str) -> subprocess.CompletedProcess:
    """scripts/compare_ni.sh in a copy of the layout, cells from `finals` ({folder: Rouge-L}),
    `flexlora` replaced by a recorder of its arguments."""
    (tmp_path / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "compare_ni.sh", tmp_path / "scripts" / "compare_ni.sh")
    for folder, final in finals.items():
        cell = tmp_path / "docs" / "compare_ni" / "cells" / folder
        cell.mkdir(parents=True)
        (cell / "summary.json").write_text(json.dumps({"final": final}))
    recorder = tmp_path / "flexlora"
    recorder.write_text('#!/usr/bin/env bash\necho "flexlora $*"\n')
    recorder.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DISTRIBUTION_RIVAL", "STAGE3_METHODS")}
    env |= {"STAGES": stages, "FLEXLORA": str(recorder)}
    return subprocess.run(["bash", str(tmp_path / "scripts" / "compare_ni.sh")], env=env, capture_output=True, text=True)


def test_stage_a2_reruns_lora_a2_seed_zero_first(tmp_path):
    run = script(tmp_path, {}, "a2")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("flexlora compare --out docs/compare_ni ") for line in lines)
    assert "--methods lora_a2 --profiles heavy-tail-light,heavy-tail-strong --seeds 0 " in lines[0]
    assert "--methods lora_a2 --profiles heavy-tail-light,heavy-tail-strong --seeds 1,2 " in lines[1]


def test_stage_three_s_rival_comes_from_the_cells_the_rule_was_fixed_on(tmp_path):
    """LoRA-A²'s new cells scoring highest must not change the rival picked from the old ones."""
    finals = {f"{m}-{p}-seed{s}": 0.20 for m in ["fedex", "florist", "raflora"] for p in PROFILES for s in range(3)}
    finals |= {f"fedex-{p}-seed{s}": 0.25 for p in PROFILES for s in range(3)}
    finals |= {f"{Cell(VARIANT, p, s).name}": 0.10 for p in PROFILES for s in range(3)}
    finals |= {f"lora_a2-{p}-seed{s}": 0.90 for p in PROFILES for s in range(3)}
    run = script(tmp_path, finals, "3")
    assert run.returncode == 0, run.stderr
    assert "--methods flexlora,fedex --profiles log-uniform-8-200" in run.stdout
