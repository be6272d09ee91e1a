import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see flexlora/cli.py
# ../shared/data beside the repository; FLEXLORA_SHARED_DATA points elsewhere (e.g. from a
# git worktree that does not sit beside it).
SHARED_DATA = Path(os.environ.get("FLEXLORA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def tiny_overrides(tmp_path):
    """key=value overrides for a fast end-to-end run on the tiny random LLaMA."""
    return tiny_run(tmp_path)


def tiny_run(tmp_path):
    """tiny_overrides' list, for fixtures of wider scope (one run shared by a module's tests)."""
    return [
        "model=tiny-llama",
        "device=cpu",
        "data.num_clients=6",
        "data.train_per_client=6",
        "data.test_per_client=2",
        "data.cutoff_len=512",  # the tiny model's tokenizer is byte-level: prompts are long
        "federation.rounds=2",
        "federation.clients_per_round=3",
        "train.steps=2",
        "train.batch_size=2",
        "train.micro_batch_size=1",
        "eval.max_new_tokens=4",
        "eval.max_examples_per_client=1",
        "resources.t1=2",
        "resources.t2=4",
        "resources.t3_attention=4",
        "resources.t3_mlp=16",
        "resources.t4=16",
        f"output.dir={tmp_path / 'runs'}",
        "output.name=test",
    ]


def start_flexlora_run(args: list[str], log: Path, env_extra: dict | None = None, stderr=subprocess.STDOUT) -> subprocess.Popen:
    """`flexlora run ARGS` as a real process (this checkout's source first on its path), its
    output to `log`; `stderr=subprocess.PIPE` keeps stderr apart, to read as text."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}  # fmt: skip
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flexlora.cli", "run", *args], stdout=out, stderr=stderr, env=env, text=True
        )


def smallest_run(clients: int, rounds: int, per_round: int = 2, steps: int = 1) -> list[str]:
    """key=value overrides for the smallest whole run on the tiny model (4 examples a client, one
    test example, two new tokens, ranks 2 to 8), for tests of the run's machinery rather than of
    its training; later overrides win over these."""
    return [
        "model=tiny-llama",
        "device=cpu",
        f"data.num_clients={clients}",
        "data.train_per_client=4",
        "data.test_per_client=1",
        "data.cutoff_len=512",
        f"federation.rounds={rounds}",
        f"federation.clients_per_round={per_round}",
        f"train.steps={steps}",
        "train.batch_size=2",
        "eval.max_new_tokens=2",
        "eval.max_examples_per_client=1",
        "resources.t1=2",
        "resources.t2=4",
        "resources.t3_attention=4",
        "resources.t3_mlp=8",
        "resources.t4=8",
    ]


@pytest.fixture
def run_identity():
    """Flower Messages can only be made inside a run; set the identity a ServerApp would have."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def requires_shared_data():
    return pytest.mark.skipif(
        not SHARED_DATA.is_dir(), reason=f"real data not present at {SHARED_DATA} (a fresh clone has no ../shared)"
    )


@pytest.fixture(scope="module")
def one_thread():
    """For files of tiny matrices: with two OpenMP threads and another busy process on the two
    cores, each small LAPACK call can wait ~0.4 s at a thread barrier (measured). One thread
    keeps such a file at a few seconds; the previous setting is restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
