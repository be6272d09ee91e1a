"""`flexlora run --engine flower`: the experiment on Flower's simulation engine, in this process
(Ray actors as ClientApps), with the same ServerApp loop and ClientApp as a deployment."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flexlora.engines.flower.client_app import client_app
from flexlora.engines.flower.server_app import serve
from flexlora.extras import require

if TYPE_CHECKING:
    import torch

    from flexlora.config import ExperimentConfig


class _DropRunSimulationDeprecation(logging.Filter):
    def filter(self, record):  # the project pins flwr 1.41, where run_simulation works
        return "run_simulation" not in record.getMessage()


def backend_config(cfg: ExperimentConfig, device: torch.device) -> dict:
    import torch

    f = cfg.flower
    cpus = f.cpus_per_worker or max(1, (os.cpu_count() or 1) // f.workers)
    cuda = device.type == "cuda"
    gpus = f.gpus_per_worker if f.gpus_per_worker is not None else (1.0 / f.workers if cuda else 0.0)
    init_args = {
        "num_cpus": cpus * f.workers,
        "num_gpus": torch.cuda.device_count() if cuda else 0,
        "object_store_memory": f.ray_object_store_mb * 2**20,
        "include_dashboard": False,
    }
    return {"client_resources": {"num_cpus": cpus, "num_gpus": gpus}, "init_args": init_args}


def run_simulation(cfg: ExperimentConfig, echo=print, resume: str | Path | None = None) -> Path:
    """Run the experiment on Flower's simulation engine (Ray actors as ClientApps), or continue
    the run in the folder `resume`; returns the run folder, with the same files as the
    in-process runtime's."""
    require("ray", "Flower's simulation engine")  # flwr[simulation]: an extra of its own
    from flwr.simulation import run_simulation as flower_simulation

    from flexlora.experiment import Experiment

    exp = Experiment(cfg, echo, engine="flower-simulation", resume=resume)
    # Flower's files stay inside the run folder; no telemetry, no update check, no installs.
    flower_env = {
        "FLWR_HOME": str(exp.run_dir / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    saved_env = {k: os.environ.get(k) for k in flower_env}
    for k, v in flower_env.items():
        os.environ.setdefault(k, v)
    done: dict[str, Path] = {}
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        done["run_dir"] = serve(exp, grid, min_nodes=len(exp.dataset.clients))

    flwr_logger = logging.getLogger("flwr")
    level, deprecation = flwr_logger.level, _DropRunSimulationDeprecation()
    flwr_logger.setLevel(logging.WARNING)
    flwr_logger.addFilter(deprecation)
    try:
        flower_simulation(
            server_app=app,
            client_app=client_app,
            num_supernodes=len(exp.dataset.clients),
            backend_config=backend_config(cfg, exp.device),
        )
    finally:
        exp.close()
        flwr_logger.setLevel(level)
        flwr_logger.removeFilter(deprecation)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import ray

        if ray.is_initialized():
            ray.shutdown()
    if "run_dir" not in done:
        raise RuntimeError("the Flower simulation stopped before the run finished; see the log above")
    return done["run_dir"]
