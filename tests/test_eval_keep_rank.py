"""`flexlora eval --keep-rank R`: a saved adapter evaluated with every component beyond rank R
cut, the saved files untouched; the cut itself (evaluation.keep_rank) against its formula."""

import hashlib
import json

import pytest
import torch
from test_compare import tiny_grid_overrides

from flexlora.cli import main
from flexlora.evaluation import keep_rank


def test_the_cut_keeps_the_first_components_at_the_original_scaling():
    torch.manual_seed(0)
    A, B = torch.randn(8, 12), torch.randn(10, 8)
    factors, ranks = {"m": (A, B), "small": (A[:2].clone(), B[:, :2].clone())}, {"m": 8, "small": 2}
    cut, cut_ranks = keep_rank(factors, ranks, 3)
    assert cut_ranks == {"m": 3, "small": 2}
    (a, b), alpha = cut["m"], 16.0
    assert a.shape == (3, 12) and b.shape == (10, 3)
    # PEFT scales by alpha / rank: the cut update is the original's first 3 components.
    assert torch.allclose((alpha / 3) * b @ a, (alpha / 8) * B[:, :3] @ A[:3], atol=1e-6)
    assert torch.equal(cut["small"][0], factors["small"][0]) and torch.equal(cut["small"][1], factors["small"][1])
    assert torch.equal(factors["m"][0], A) and factors["m"][1].shape == (10, 8)  # the inputs are left as they were
    with pytest.raises(ValueError, match="must be >= 1"):
        keep_rank(factors, ranks, 0)


def test_an_svd_ordered_adapter_cut_is_its_best_low_rank_approximation():
    # FlexLoRA exports B = U_r S_r / s, A = V_rᵀ: the first R components are the top R singular
    # triplets, so the cut's error is the Eckart-Young minimum, sqrt(Σ_{i>R} σ_i²).
    torch.manual_seed(1)
    delta = torch.randn(16, 20, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    r, alpha = 16, 32.0
    scale = alpha / r
    factors = {"m": (Vh[:r], U[:, :r] * S[:r] / scale)}
    [(a, b)] = keep_rank(factors, {"m": r}, 5)[0].values()
    error = torch.linalg.norm(delta - (alpha / 5) * b @ a)
    assert error == pytest.approx(float(S[5:].pow(2).sum().sqrt()), rel=1e-10)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_eval_keep_rank_cuts_a_copy_and_changes_the_score(tmp_path, capsys):
    from flexlora import lora
    from flexlora.models import default_target_modules, load_model

    overrides = tiny_grid_overrides(tmp_path)
    model, _ = load_model("tiny-llama", torch.device("cpu"), seed=0)
    targets = default_target_modules(model)
    shapes = lora.module_shapes(model, targets)
    generator = torch.Generator().manual_seed(0)
    factors = {
        name: (0.3 * torch.randn(8, d_in, generator=generator), 0.3 * torch.randn(d_out, 8, generator=generator))
        for name, (d_out, d_in) in shapes.items()
    }
    saved = lora.save_adapter(model, factors, {name: 8 for name in shapes}, 16.0, targets, tmp_path / "adapter")
    before = _digest(saved)

    scores = {}
    for keep in (None, 2):
        out = tmp_path / f"eval-{keep}.json"
        args = ["eval", "--adapter", str(saved), "--out", str(out), *overrides]
        assert main([*args, "--keep-rank", str(keep)] if keep else args) == 0
        scores[keep] = json.loads(out.read_text())
    assert _digest(saved) == before  # the saved adapter's bytes are untouched
    cut = scores[2]
    assert cut["keep_rank"] == 2 and cut["ranks_evaluated"] == {"2": len(shapes)}
    assert "keep_rank" not in scores[None]
    assert cut["eval_loss"] != pytest.approx(scores[None]["eval_loss"], abs=1e-4)
    assert "components beyond rank 2 cut (saved ranks [8], evaluated ranks [2])" in capsys.readouterr().out

    # Nothing to cut without an adapter; a rank below 1 is refused before anything loads.
    assert main(["eval", "--base", "--keep-rank", "2", *overrides]) == 2
    assert main(["eval", "--adapter", str(saved), "--keep-rank", "0", *overrides]) == 2
    err = capsys.readouterr().err
    assert "--keep-rank: cuts a saved adapter; --base has none" in err and "--keep-rank: must be >= 1, got 0" in err
