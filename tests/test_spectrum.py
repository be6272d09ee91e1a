"""The spectrum record of the global ΔW (issue 20, rank collapse): band shares of Σσ² over the
rank bands of the clients' ranks and the effective rank exp(H), computed from the factors
without forming ΔW (or from a dense base offset), per round in metrics.jsonl and plotted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flexlora.cli import main
from flexlora.methods.svd import factored_svd
from flexlora.reporting import spectrum_panels
from flexlora.spectrum import (
    band_labels,
    band_shares,
    coarse_edges,
    coarsen,
    dense_sigma_sq,
    effective_rank,
    factored_sigma_sq,
    geometric_rate,
    module_sigma_sq,
    rank_edges,
    spectrum_line,
    spectrum_record,
)

SIGMA = [4.0, 3.0, 2.0, 2.0, 1.0, 1.0]  # ΔW's singular values, by construction


def known_factors(m=12, n=9, sigma=SIGMA, seed=0):
    """(A (R, n), B (m, R)) with B @ A = U diag(σ) Vᵀ for orthonormal U, V, where neither
    factor is orthogonal (a random invertible T mixes them): only the product's σ are known."""
    g = torch.Generator().manual_seed(seed)
    R = len(sigma)
    U, _ = torch.linalg.qr(torch.randn(m, R, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, R, generator=g, dtype=torch.float64))
    T = torch.randn(R, R, generator=g, dtype=torch.float64) + 3 * torch.eye(R, dtype=torch.float64)
    B = U @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ T
    A = torch.linalg.solve(T, V.T)
    return A, B


def test_band_shares_and_effective_rank_equal_their_formula_on_a_known_spectrum():
    A, B = known_factors()
    sigma_sq, route = module_sigma_sq((A, B), 1.0, None)
    assert route == "factored"
    assert sigma_sq.tolist() == pytest.approx([s * s for s in SIGMA], abs=1e-12)
    # client ranks {2, 4}: bands [0, 2), [2, 4), [4, ∞) hold 16+9, 4+4, 1+1 of 35
    shares = band_shares(sigma_sq, [2, 4])
    assert shares == pytest.approx([25 / 35, 8 / 35, 2 / 35], abs=1e-12)
    assert shares != pytest.approx([7 / 13, 4 / 13, 2 / 13], abs=1e-3)  # σ instead of σ²
    assert shares != pytest.approx([29 / 35, 5 / 35, 1 / 35], abs=1e-3)  # bands [0, 2], (2, 4]
    p = [s * s / 35 for s in SIGMA]
    assert effective_rank(sigma_sq) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-12)
    q = [s / sum(SIGMA) for s in SIGMA]  # the plausible wrong rule: entropy of σ / Σσ
    assert effective_rank(sigma_sq) != pytest.approx(math.exp(-sum(x * math.log(x) for x in q)), rel=1e-3)
    assert band_labels([2, 4]) == ["[0,2)", "[2,4)", "[4,∞)"]


def test_effective_rank_extremes_and_zero_update():
    assert effective_rank(torch.tensor([9.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([2.0] * 5)) == pytest.approx(5.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    assert band_shares(torch.zeros(3), [1]) == [0.0, 0.0]
    # a band past the end of the spectrum (a rank capped below its edge) holds nothing
    assert band_shares(torch.tensor([1.0, 1.0]), [1, 5, 9]) == pytest.approx([0.5, 0.5, 0.0, 0.0])


@pytest.mark.parametrize("m,n,R", [(40, 30, 7), (30, 50, 12), (64, 64, 1)])
def test_factored_equals_dense_on_random_factors(m, n, R):
    g = torch.Generator().manual_seed(m + n + R)
    B, A = torch.randn(m, R, generator=g), torch.randn(R, n, generator=g)
    factored = factored_sigma_sq(B, A)
    dense = dense_sigma_sq(B.double() @ A.double())
    reference = torch.linalg.svdvals(B.double() @ A.double()).square()
    assert factored.shape[0] == R
    assert torch.allclose(factored, reference[:R], rtol=1e-10, atol=1e-12 * float(reference[0]))
    assert torch.allclose(dense[:R], reference[:R], rtol=1e-9, atol=1e-12 * float(reference[0]))
    assert float(dense[R:].abs().sum()) < 1e-10 * float(reference[0])  # rank R: the rest is rounding
    # the same singular values as the aggregation's factored kernel
    kernel = factored_svd(B.double(), A.double(), R).S.square()
    assert torch.allclose(factored, kernel, rtol=1e-10)


def test_rank_deficient_factors_take_the_factored_route_exactly():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(20, 5, generator=g, dtype=torch.float64)
    B[:, 3:] = 0  # an adapter padded with zero columns (HetLoRA's global state)
    A = torch.randn(5, 16, generator=g, dtype=torch.float64)
    assert torch.allclose(factored_sigma_sq(B, A)[:3], torch.linalg.svdvals(B @ A)[:3].square(), rtol=1e-10)
    assert float(factored_sigma_sq(B, A)[3:].abs().max()) < 1e-20


def test_record_scales_the_adapter_adds_an_offset_and_pools_kinds():
    alpha = 8.0
    A, B = known_factors(m=12, n=9)  # q_proj: σ = SIGMA · α/R
    g = torch.Generator().manual_seed(2)
    offset = torch.randn(6, 9, generator=g, dtype=torch.float64)  # k_proj: a dense base offset ...
    Ak, Bk = (
        torch.randn(2, 9, generator=g, dtype=torch.float64),
        torch.randn(6, 2, generator=g, dtype=torch.float64),
    )  # ... plus an adapter
    factors = {"layers.0.attn.q_proj": (A, B), "layers.0.attn.k_proj": (Ak, Bk)}
    ranks = {"layers.0.attn.q_proj": 6, "layers.0.attn.k_proj": 2}
    edges = {"q_proj": [2, 4], "k_proj": [2, 3], "gate_proj": [2]}
    record = spectrum_record(factors, ranks, {"layers.0.attn.k_proj": offset}, alpha, edges)
    assert record["routes"] == {"factored": 1, "dense": 1}
    q = record["kinds"]["q_proj"]
    scale = alpha / 6
    assert q["share"] == pytest.approx([25 / 35, 8 / 35, 2 / 35], abs=1e-12)
    assert q["energy"] == pytest.approx(35 * scale**2, rel=1e-12)
    k_sigma_sq = torch.linalg.svdvals(offset + (alpha / 2) * Bk @ Ak).square()
    k = record["kinds"]["k_proj"]
    assert k["energy"] == pytest.approx(float(k_sigma_sq.sum()), rel=1e-10)
    assert k["share"] == pytest.approx(band_shares(k_sigma_sq, [2, 3]), abs=1e-10)
    assert k["effective_rank_mean"] == pytest.approx(effective_rank(k_sigma_sq), rel=1e-9)
    # attention pools q and k band by band, each with its own edges; edges are the largest
    group = record["groups"]["attention"]
    assert group["edges"] == [2, 4] and group["kinds"] == ["q_proj", "k_proj"]
    pooled = [q["share"][j] * q["energy"] + k["share"][j] * k["energy"] for j in range(3)]
    assert group["share"] == pytest.approx([e / sum(pooled) for e in pooled], rel=1e-10)
    assert group["effective_rank_mean"] == pytest.approx((q["effective_rank_mean"] + k["effective_rank_mean"]) / 2)
    assert "mlp" not in record["groups"]
    assert spectrum_record({}, {}, None, alpha, edges) is None  # no ΔW yet


def test_rank_edges_are_the_distinct_capped_ranks_per_kind():
    ranks = {
        "a": {"l0.q_proj": 8, "l1.q_proj": 8, "l0.k_proj": 8},
        "b": {"l0.q_proj": 200, "l1.q_proj": 200, "l0.k_proj": 192},
        "c": {"l0.q_proj": 30, "l1.q_proj": 30, "l0.k_proj": 30},
    }
    assert rank_edges(ranks) == {"k_proj": [8, 30, 192], "q_proj": [8, 30, 200]}


def test_a_rank_distribution_gets_octave_bands_not_one_band_per_drawn_rank():
    # log-uniform ranks in [8, 200] draw ~190 distinct ranks: one band each is unreadable
    drawn = {f"c{r}": {"l0.q_proj": r, "l0.k_proj": min(r, 192)} for r in range(8, 201) if r not in (16, 17, 33)}
    assert rank_edges(drawn) == {"k_proj": [8, 18, 36, 72, 144, 192], "q_proj": [8, 18, 36, 72, 144, 200]}
    assert coarse_edges([8, 30, 200]) == [8, 30, 200]  # the paper's types keep their own bands
    assert coarse_edges(list(range(8, 16))) == list(range(8, 16))  # 8 distinct ranks, no more
    assert coarse_edges(list(range(8, 17))) == [8, 16]


def test_coarsening_a_record_equals_measuring_with_the_coarse_bands():
    sigma_sq = torch.tensor([float(220 - i) for i in range(210)]) ** 2
    fine = list(range(8, 201))
    record = {"edges": fine, "bands": band_labels(fine), "share": band_shares(sigma_sq, fine), "energy": 1.0}
    coarse = coarsen(record)
    assert coarse["edges"] == [8, 16, 32, 64, 128, 200] and coarse["bands"] == band_labels(coarse["edges"])
    assert coarse["share"] == pytest.approx(band_shares(sigma_sq, coarse["edges"]), abs=1e-12)
    assert coarse["energy"] == 1.0
    # an old run's records with one band per drawn rank plot with the coarse bands
    history = [{"round": 1, "spectrum": {"kinds": {"q_proj": record}, "groups": {"attention": {**record, "kinds": ["q_proj"]}}}}]
    level, panels = spectrum_panels(history)
    assert level == "groups" and panels["attention"][0][1]["edges"] == [8, 16, 32, 64, 128, 200]


def test_geometric_rate_recovers_the_ratio():
    rounds = list(range(1, 11))
    assert geometric_rate(rounds, [0.4 * 0.8**r for r in rounds]) == pytest.approx(0.8, rel=1e-12)
    assert geometric_rate(rounds, [0.3] * 10) == pytest.approx(1.0)
    assert geometric_rate([1], [0.5]) is None


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_logs_the_spectrum_every_round_and_plots_it(tiny_overrides, tmp_path):
    # mixed ranks: T1 (2), T2 (4), T4 (16) on every module
    profile = "resources.profile=[T1, T2, T4, T1, T2, T4]"
    assert main(["run", *tiny_overrides, profile, "method=flexlora"]) == 0
    run = Path(next(a for a in tiny_overrides if a.startswith("output.dir=")).split("=", 1)[1]) / "test"
    records = _records(run)
    assert records[0]["round"] == 0 and records[0].get("spectrum") is None
    for r in records[1:]:
        s = r["spectrum"]
        layers = s["kinds"]["q_proj"]["modules"]
        assert s["seconds"] >= 0 and layers >= 2 and s["routes"] == {"aggregation": 7 * layers}  # FlexLoRA keeps ΔW's SVD
        assert set(s["kinds"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        for k in s["kinds"].values():
            assert k["edges"] == [2, 4, 16] and k["bands"] == ["[0,2)", "[2,4)", "[4,16)", "[16,∞)"]
            assert sum(k["share"]) == pytest.approx(1.0) and k["share"][-1] == 0.0  # global rank 16
            assert 1.0 <= k["effective_rank_min"] <= k["effective_rank_median"] <= k["effective_rank_max"] <= 16
            assert k["modules"] == layers
        assert set(s["groups"]) == {"attention", "mlp"}
    png = run / "rank_energy.png"
    assert png.is_file() and png.stat().st_size > 10_000
    # the study's summary on this run: its round-1 share beyond r_min is 1 − share of [0, 2)
    assert main(["rank-report", str(run), "--out", str(tmp_path / "report"), "--rounds", "1,2"]) == 0
    md = tmp_path / "report" / "rank_collapse.md"
    text = md.read_text()
    beyond = 1 - records[1]["spectrum"]["groups"]["mlp"]["share"][0]
    mlp_row = next(line for line in text.splitlines() if "| mlp |" in line)
    assert f"| {beyond:.3f} |" in mlp_row
    assert (tmp_path / "report" / "rank_collapse.png").stat().st_size > 10_000


def test_spectrum_can_be_turned_off_and_a_dense_method_is_measured(tiny_overrides):
    out = Path(next(a for a in tiny_overrides if a.startswith("output.dir=")).split("=", 1)[1])
    args = [a for a in tiny_overrides if not a.startswith(("output.name=", "federation.rounds="))]
    assert (
        main(["run", *args, "federation.rounds=1", "output.name=no-spectrum", "eval.spectrum=false", "resources.profile=uniform"])
        == 0
    )
    assert all(r.get("spectrum") is None for r in _records(out / "no-spectrum"))
    assert not (out / "no-spectrum" / "rank_energy.png").exists()
    # FLoRA: the global model is a dense base offset (every round's exact ΔW merged)
    profile = "resources.profile=[T4, T4, T4, T4, T4, T4]"  # 3 clients of rank 16 a round: ΔW of rank up to 48
    assert main(["run", *args, "federation.rounds=1", "output.name=flora", "method=flora", profile]) == 0
    s = _records(out / "flora")[1]["spectrum"]
    assert s["routes"] == {"dense": 7 * s["kinds"]["q_proj"]["modules"]}
    # its σ beyond the largest client rank are real: the sum of several clients' updates
    assert sum(k["share"][-1] for k in s["kinds"].values()) > 0


def test_rank_report_says_what_is_wrong_with_a_folder(tmp_path, capsys):
    assert main(["rank-report", str(tmp_path)]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1, \n')  # cut off mid-line
    assert main(["rank-report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'metrics.jsonl'}:2: not valid JSON" in err and err.count("\n") == 1
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    (tmp_path / "config.yaml").write_text("method: [flexlora\n")
    assert main(["rank-report", str(tmp_path)]) == 2
    assert f"{tmp_path / 'config.yaml'}: not valid YAML" in capsys.readouterr().err


def test_spectrum_line_reports_the_share_beyond_the_smallest_rank():
    A, B = known_factors()
    record = spectrum_record({"l0.up_proj": (A, B)}, {"l0.up_proj": 6}, None, 6.0, {"up_proj": [2, 4]})
    record["seconds"] = 0.25
    assert spectrum_line(record) == "ΔW energy beyond the smallest client rank: mlp 0.286; effective rank: mlp 4.1 (0.2 s)"
    assert spectrum_line(None) is None


def test_flexloras_spectrum_is_read_from_its_aggregation_not_recomputed(monkeypatch):
    """FlexLoRA's state is ΔW's SVD: the round's spectrum reads its S (route "aggregation") and
    equals, to rounding, the record computed from the global factors (issue 32: that recompute
    was about 50 ms of float64 QR per MLP module a round)."""
    from flexlora.methods import ClientUpdate, FlexLoRA
    from flexlora.spectrum import rank_edges as edges_of

    g = torch.Generator().manual_seed(3)
    shapes = {"layers.0.mlp.up_proj": (40, 24), "layers.0.attn.q_proj": (24, 24)}
    updates = [
        ClientUpdate(
            f"c{k}",
            10 + k,
            16.0,
            {m: (torch.randn(r, n, generator=g), torch.randn(mm, r, generator=g)) for m, (mm, n) in shapes.items()},
        )
        for k, r in enumerate((2, 6))
    ]
    method = FlexLoRA(device=None)
    state = method.aggregate(updates)
    edges = edges_of({u.client_id: {m: u.rank(m) for m in shapes} for u in updates})
    factors, ranks = method.global_factors(state, 16.0)
    recomputed = spectrum_record(factors, ranks, None, 16.0, edges)
    import flexlora.spectrum as spectrum_module

    monkeypatch.setattr(spectrum_module, "module_sigma_sq", lambda *a: pytest.fail("recomputed"))
    read = spectrum_record({}, {}, None, 16.0, edges, method.global_singular_values(state))
    assert read["routes"] == {"aggregation": 2} and recomputed["routes"] == {"factored": 2}
    for kind, r in recomputed["kinds"].items():
        assert read["kinds"][kind]["share"] == pytest.approx(r["share"], rel=1e-5, abs=1e-7)
        assert read["kinds"][kind]["effective_rank_mean"] == pytest.approx(r["effective_rank_mean"], rel=1e-5)
        assert read["kinds"][kind]["energy"] == pytest.approx(r["energy"], rel=1e-5)
