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
