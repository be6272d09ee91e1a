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
    import torch

    from flexlora.bench.aggregate import Row, goals, interleaved, median

    calls = []
    results = interleaved(3, torch.device("cpu"), {"x": lambda: calls.append("x") or 1, "y": lambda: calls.append("y") or 2})
    assert calls == ["x", "y"] * 3  # round-robin, so load changes hit both alike
    assert results["x"][0] == 1 and len(results["x"][1]) == 3
    assert median([3.0, 1.0, 100.0]) == 3.0

    common = dict(size="1.3b", module="q_proj", shape=(2048, 2048), clients=10, total_rank=272, max_rank=200)
    rows = [
        Row(**common, case="a", mode="reference", time_s=3.0, peak_mb=1, times=[3.0, 2.0, 9.0], speedup=1.0),
        Row(
            **common,
            case="a",
            mode="auto->factored",
            time_s=0.05,
            peak_mb=1,
            times=[0.05, 0.04, 0.9],
            quality={8: 1.0, 200: 1.0000001},
            speedup=60.0,
        ),
        Row(**common, case="b", mode="auto->dense", time_s=2.0, peak_mb=1, times=[2.0] * 3, quality={200: 1.00002}, speedup=2.4),
    ]
    lines = goals(rows)
    assert lines[0].startswith("PASS 1.3b case a q_proj 2048×2048 auto->factored: within")
    assert lines[1].startswith("PASS") and "60.0x, medians of 3" in lines[1]
    assert lines[2].startswith("FAIL") and lines[3].startswith("FAIL") and "2.4x" in lines[3]
    assert lines[-1] == "goals: 2 of 4 met, 2 FAILED"


# `flexlora bench scale` on the tiny model: two small settings, each its own child process.
SCALE_TINY = [
    "device=cpu",
    "data.num_clients=6",
    "data.train_per_client=2",
    "data.test_per_client=1",
    "data.cutoff_len=256",  # byte-level tokenizer: prompts are long
    "resources.t1=2",
    "resources.t2=4",
    "resources.t3_attention=4",
    "resources.t3_mlp=16",
    "resources.t4=16",
]


def test_bench_scale_tiny(tmp_path, capsys):
    out_json = tmp_path / "scale.json"
    argv = [
        "bench",
        "scale",
        "--model",
        "tiny-llama",
        "--clients",
        "2,4",
        "--rounds",
        "2",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--out",
        str(out_json),
        *SCALE_TINY,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| K=")]
    assert len(rows) == 2, out
    for line, k in zip(rows, (2, 4)):
        cells = [c.strip() for c in line.strip("|").split("|")]
        label, clients, done, device, peak, per_client, server_s, share = cells[:8]
        assert (label, clients, done, device) == (f"K={k}", str(k), "2", "cpu")
        assert float(peak) > 0 and float(per_client) > 0 and float(server_s) >= 0
        assert 0 <= float(share.rstrip("%")) <= 100
    assert "peak memory at 4 clients/round <= 1.25x that at 2 (" in out and "\ngoals: " in out
    assert (tmp_path / "runs" / "k4" / "metrics.jsonl").is_file()

    result = json.loads(out_json.read_text())
    assert result["goals"] and result["goals"][0].startswith(
        ("PASS peak memory at 4 clients/round", "FAIL peak memory at 4 clients/round")
    )
    by_k = {r["clients_per_round"]: r for r in result["rows"]}
    assert set(by_k) == {2, 4}
    for k, row in by_k.items():
        assert row["returncode"] == 0 and "error" not in row
        assert row["peak_rss_mb"] > 0 and row["s_per_client"] > 0 and 0 <= row["server_share"] <= 1
        assert [r["round"] for r in row["rounds"]] == [1, 2]
        assert all(r["clients"] == k for r in row["rounds"])
        assert f"federation.clients_per_round={k}" in row["overrides"]


def test_bench_scale_goal_lines():
    from flexlora.bench.scale import goals

    def row(k, peak, kind="synthetic", error=None):
        r = {
            "label": f"K={k}",
            "kind": kind,
            "clients_per_round": k,
            "peak_rss_mb": peak,
            "rounds": [{"round": 1}, {"round": 2}],
            "overrides": ["federation.rounds=2"],
        }
        return {**r, "error": error} if error else r

    lines = goals([row(10, 1000), row(80, 1200)], total_memory_mb=24 * 1024)
    assert lines == ["PASS peak memory at 80 clients/round <= 1.25x that at 10 (1200 MB / 1000 MB = 1.20x)", "goals: 1 of 1 met"]
    assert (
        goals([row(10, 1000), row(80, 1300)])[0]
        == "FAIL peak memory at 80 clients/round <= 1.25x that at 10 (1300 MB / 1000 MB = 1.30x)"
    )
    assert goals([row(10, 1000), row(80, 9000, error="killed")])[0].endswith("that at 10 (K=80 did not complete)")
    both = goals([row(10, 1000), row(80, 1100), row(81, 4096, kind="ni")], total_memory_mb=24 * 1024)
    assert both[1].startswith("PASS the 1,613-client NI sample") and both[1].endswith(" (2 done, peak RSS 4.00 GiB of 24.0 GiB)")
    assert both[2] == "goals: 2 of 2 met"
    assert goals([row(10, 1000)]) == ["SKIP peak memory flat in clients per round (needs two --clients values)"]


def test_bench_scale_bad_option_is_one_line(capsys):
    assert main(["bench", "scale", "--clients", "10,x"]) == 2
    err = capsys.readouterr().err
    assert "--clients: expected comma-separated integers, got '10,x'" in err and err.count("\n") == 1
    assert main(["bench", "scale", "--clients", "0"]) == 2
    assert "--clients: every value must be >= 1" in capsys.readouterr().err
    assert main(["bench", "scale", "--rounds", "0", "--clients", "2"]) == 2
    assert "--rounds: must be >= 1" in capsys.readouterr().err
    assert main(["bench", "scale", "--clients", "2", "federation.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "no_such_key" in err and err.count("\n") == 1
    assert main(["bench", "scale", "--ni", "--clients", "", "--ni-path", "/nonexistent/ni"]) == 2
    assert "--ni-path: /nonexistent/ni is not a folder" in capsys.readouterr().err


def test_bench_scale_ni_setting():
    """--ni: the 1613-client NI sample at fraction 0.05, held-out 2%; the folder is checked first."""
    from pathlib import Path

    import pytest

    from flexlora.bench.scale import NI_PATH, settings, validate

    if not Path(NI_PATH).is_dir():
        pytest.skip(f"{NI_PATH} is absent (shared data, not part of the repository)")
    [ni] = settings([], 2, "tiny-llama", ni=True, extra=["device=cpu"])
    assert ni["kind"] == "ni" and ni["clients_per_round"] is None
    for key in (
        "data.source=natural-instructions",
        "federation.fraction=0.05",
        "data.heldout_fraction=0.02",
        "federation.rounds=2",
        "resources.profile=heavy-tail-strong",
        "output.checkpoint=false",
    ):
        assert key in ni["overrides"]
    assert ni["overrides"][-1] == "device=cpu"  # extra overrides come last, so they win
    validate(ni)


def test_the_shared_pieces_are_one_copy_and_count_goals():
    """flexlora.bench.common holds what the benchmarks share; a child process it prepares
    imports this source tree, and the goal count ignores goals not checked."""
    import subprocess
    import sys
    from pathlib import Path

    from flexlora.bench import aggregate, client, common, scale

    assert client.child_env is scale.child_env is common.child_env
    assert aggregate.interleaved is common.interleaved and client.goal is scale.goal is aggregate.goal is common.goal
    src = Path(__file__).resolve().parents[1] / "src"
    env = common.child_env()
    assert env["PYTHONPATH"].split(":")[0] == str(src)
    out = subprocess.run(
        [sys.executable, "-c", "import flexlora; print(flexlora.__file__)"],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == str(src / "flexlora" / "__init__.py")

    lines = [common.goal(True, "a", "1"), common.not_checked("b", "no data"), common.goal(False, "c", "3")]
    assert lines == ["PASS a (1)", "SKIP b (no data)", "FAIL c (3)"]
    assert common.with_count(lines)[-1] == "goals: 1 of 2 met, 1 FAILED"
    assert common.with_count([common.not_checked("b", "x")]) == ["SKIP b (x)"]


def test_python_dash_m_runs_the_same_command_line():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "flexlora.bench", "aggregate", "--sizes", "70b"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "unknown size '70b'" in proc.stderr and proc.stderr.count("\n") == 1
