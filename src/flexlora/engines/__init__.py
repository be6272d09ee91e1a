"""Engines: the composition roots that wire an Experiment (model, data, server, evaluation) to a
transport. ``local`` trains the sampled clients in this process, one after the other on the one
shared model; ``flower`` runs them on Flower (simulation or real SuperNodes). An engine moves
ClientTasks out and ClientUpdates back; it never does the math and never knows which method runs.

Nothing here is imported by the machinery it composes (experiment, server, client, methods), so
there is no import cycle."""

from __future__ import annotations

from pathlib import Path

from flexlora.extras import require

# The Flower app for `flwr run` (deployment): a manifest that names the ServerApp and ClientApp,
# shipped in the package (`flexlora flower-app` prints it). Found here without importing flwr.
FLOWER_APP = Path(__file__).resolve().parent / "flower" / "app"


def run_experiment(cfg, echo=print, resume: str | Path | None = None, zero_shot: dict | None = None) -> Path:
    """Run the configured experiment on its engine (cfg.engine), or continue the one in the run
    folder `resume` from its last checkpoint; returns the run folder. `zero_shot`: the base
    model's held-out metrics if already known (in-process engine; Flower evaluates it again)."""
    if cfg.engine == "flower":
        require("flwr", "engine=flower")
        require("ray", "engine=flower (Flower's simulation engine, on Ray)")
        from flexlora.engines.flower import run_simulation

        return run_simulation(cfg, echo, resume)
    from flexlora.engines.local import run_local

    return run_local(cfg, echo, resume, zero_shot)
