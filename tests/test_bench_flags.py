"""Each benchmark adds its own command-line flags (flexlora.bench.<name>.add_arguments), and
`flexlora bench <name> --help` shows what it showed when cli.build_parser held every
benchmark's flags: tests/fixtures/bench_cli.json was recorded from that parser (the help text
at 100 columns, the one-line help `flexlora bench --help` lists, and the parsed defaults)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "bench_cli.json"
SRC = Path(__file__).resolve().parents[1] / "src"


def bench_cli(parser) -> dict:
    """Per `flexlora bench` subcommand: its --help text, its line in `flexlora bench --help`,
    and the values its flags take when none is given."""
    import argparse

    def subparsers(p):
        return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))

    bench_action = subparsers(subparsers(parser).choices["bench"])
    lines = {a.dest: a.help for a in bench_action._choices_actions}
    out = {}
    for name, sub in bench_action.choices.items():
        defaults = vars(parser.parse_args(["bench", name]))
        defaults = {k: v for k, v in defaults.items() if k != "func"}
        out[name] = {"help": sub.format_help(), "line": lines[name], "defaults": defaults}
    return out


@pytest.fixture
def columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help text at the terminal's width


def test_every_benchmark_has_the_flags_and_help_it_had(columns):
    from flexlora.cli import build_parser

    expected = json.loads(FIXTURE.read_text())
    got = bench_cli(build_parser())
    assert sorted(got) == sorted(expected) == ["aggregate", "client", "deployment", "eval", "scale", "secagg"]
    for name in expected:
        assert got[name]["help"] == expected[name]["help"], name
        assert got[name]["line"] == expected[name]["line"], name
        assert got[name]["defaults"] == expected[name]["defaults"], name


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["bench", "aggregate", "--quick", "--sizes", "8b", "--repeat", "2", "--device", "cpu"],
            {"quick": True, "sizes": "8b", "repeat": 2, "device": "cpu", "oversample": 64},
        ),
        (
            ["bench", "client", "--models", "tiny-llama", "--steps", "5", "--timeout", "12.5"],
            {"models": "tiny-llama", "steps": 5, "timeout": 12.5, "reference": "all"},
        ),
        (
            ["bench", "scale", "--clients", "2,4", "--ni", "train.steps=2", "--rounds", "3", "device=cpu"],
            {"clients": "2,4", "ni": True, "rounds": 3, "overrides": ["train.steps=2", "device=cpu"]},
        ),
        (
            ["bench", "eval", "--clients", "3", "eval.kv_cache=true"],
            {"clients": 3, "repeat": 1, "overrides": ["eval.kv_cache=true"]},
        ),
        (
            ["bench", "deployment", "--precision", "bfloat16", "--startup-repeat", "0", "train.steps=6"],
            {"precision": "bfloat16", "startup_repeat": 0, "nodes": 2, "overrides": ["train.steps=6"]},
        ),
    ],
)
def test_a_benchmark_command_line_parses_to_its_values(argv, expected):
    from flexlora.cli import parse_args

    args = parse_args(argv)
    assert {key: getattr(args, key) for key in expected} == expected
    assert args.func.__module__ == f"flexlora.bench.{argv[1]}"  # the benchmark runs its own command


def test_a_bad_choice_is_refused_by_the_benchmarks_own_flags(capsys):
    from flexlora.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["bench", "deployment", "--precision", "int8"])
    assert "argument --precision: invalid choice: 'int8'" in capsys.readouterr().err


def test_adding_the_benchmarks_flags_imports_neither_torch_nor_transformers():
    # Every benchmark module is imported to add its flags: each keeps torch and the model code
    # out of its module level, so that building the command line costs no more than importing
    # the package itself (what `import flexlora` loads is not the benchmarks' doing).
    code = (
        "import sys, flexlora; before = set(sys.modules);"
        "from flexlora.cli import build_parser; build_parser();"
        "bad = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('torch', 'transformers', 'peft'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert out.returncode == 0, out.stdout + out.stderr


if __name__ == "__main__":  # record the fixture (only from the parser the flags must match)
    import os

    os.environ["COLUMNS"] = "100"
    from flexlora.cli import build_parser

    FIXTURE.write_text(json.dumps(bench_cli(build_parser()), indent=1, sort_keys=True) + "\n")
