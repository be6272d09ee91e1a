"""`flexlora bench aggregate` runs and reports (a smoke test: timings are not asserted)."""

import json

from flexlora.cli import main


def test_bench_aggregate_quick(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert main(["bench", "aggregate", "--quick", "--cases", "a", "--modes", "auto,randomized", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "| quick | a | q_proj 512×512 |" in out and "auto->factored" in out
    rows = json.loads(out_json.read_text())
    assert [r["mode"] for r in rows] == ["reference", "auto->factored", "randomized"] * 2
    for row in rows:
        assert row["time_s"] > 0 and set(row["quality"]) == {"8", "200"}
        if row["mode"] != "randomized":
            assert all(abs(q - 1) < 1e-5 for q in row["quality"].values())
        else:
            assert all(q <= 1.01 for q in row["quality"].values())


def test_bench_aggregate_bad_flag_is_one_line(capsys):
    assert main(["bench", "aggregate", "--sizes", "70b"]) == 2
    err = capsys.readouterr().err
    assert "unknown size '70b'" in err and err.count("\n") == 1


def test_bench_goals_use_medians_and_say_pass_or_fail():
    from flexlora.bench import Row, goals, interleaved, median

    import torch

    calls = []
    results = interleaved(3, torch.device("cpu"), {"x": lambda: calls.append("x") or 1, "y": lambda: calls.append("y") or 2})
    assert calls == ["x", "y"] * 3  # round-robin, so load changes hit both alike
    assert results["x"][0] == 1 and len(results["x"][1]) == 3
    assert median([3.0, 1.0, 100.0]) == 3.0

    common = dict(size="1.3b", module="q_proj", shape=(2048, 2048), clients=10, total_rank=272, max_rank=200)
    rows = [
        Row(**common, case="a", mode="reference", time_s=3.0, peak_mb=1, times=[3.0, 2.0, 9.0], speedup=1.0),
        Row(**common, case="a", mode="auto->factored", time_s=0.05, peak_mb=1, times=[0.05, 0.04, 0.9], quality={8: 1.0, 200: 1.0000001}, speedup=60.0),
        Row(**common, case="b", mode="auto->dense", time_s=2.0, peak_mb=1, times=[2.0] * 3, quality={200: 1.00002}, speedup=2.4),
    ]
    lines = goals(rows)
    assert lines[0].startswith("PASS 1.3b case a q_proj 2048×2048 auto->factored: within")
    assert lines[1].startswith("PASS") and "60.0x, medians of 3" in lines[1]
    assert lines[2].startswith("FAIL") and lines[3].startswith("FAIL") and "2.4x" in lines[3]
    assert lines[-1] == "goals: 2 of 4 met, 2 FAILED"
