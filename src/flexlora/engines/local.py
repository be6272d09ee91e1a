"""In-process simulation: every client trains in turn on the one shared model object."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from flexlora.client import train_client
from flexlora.config import ExperimentConfig
from flexlora.data.types import ClientData
from flexlora.experiment import Experiment
from flexlora.protocol import ClientFailure, ClientTask, ClientUpdate

log = logging.getLogger(__name__)


class LocalRuntime:
    def __init__(self, model, tokenizer, clients: list[ClientData], cfg: ExperimentConfig, target_modules: list[str]):
        self.model = model
        self.tokenizer = tokenizer
        self.clients = {c.client_id: c for c in clients}
        self.cfg = cfg
        self.target_modules = target_modules

    def train(self, tasks: Iterable[ClientTask]) -> Iterator[ClientUpdate | ClientFailure]:
        """Each client in turn: a task is taken only when its client is about to train, and its
        result handed back before the next one is taken (so one task and one update at a time)."""
        progress = tqdm(desc="clients", unit="client", leave=False)
        try:
            for task in tasks:
                progress.set_description(f"round {task.round} clients")
                try:
                    result = train_client(
                        self.model, self.tokenizer, self.clients[task.client_id], task, self.cfg, self.target_modules
                    )
                except Exception as e:  # one client's crash is a dropout, not the end of the run
                    log.warning("client %s failed: %s: %s", task.client_id, type(e).__name__, e)
                    result = ClientFailure(task.client_id, f"{type(e).__name__}: {e}")
                del task  # the factors it carried are not needed past training
                progress.update()
                yield result
        finally:
            progress.close()


def local_runtime(exp: Experiment) -> LocalRuntime:
    """The in-process runtime over an experiment's model and training clients."""
    return LocalRuntime(exp.model, exp.tokenizer, exp.dataset.clients, exp.cfg, exp.target_modules)


def run_local(cfg: ExperimentConfig, echo=print, resume: str | Path | None = None, zero_shot: dict | None = None) -> Path:
    """The whole experiment in this process (see flexlora.engines.run_experiment)."""
    exp = Experiment(cfg, echo, resume=resume, zero_shot=zero_shot)
    try:
        exp.make_server([c.client_id for c in exp.dataset.clients])
        exp.run(local_runtime(exp))
        return exp.finish()
    finally:
        exp.close()
