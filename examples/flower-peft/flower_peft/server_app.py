"""flower-peft: the ServerApp. A flexlora strategy (run config `method`: flexlora, hetlora, fedit,
fedex, florist, ...) in place of FedAvg; each node trains at its own LoRA rank. At the end the
global model is saved to `save-path`: a PEFT adapter folder (adapter_config.json +
adapter_model.safetensors) and, for methods that change the base weights, base_offset.safetensors
({module: tensor} to add to each LoRA module's base weight)."""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from flexlora.strategies import HeteroRankStrategy
from flower_peft.task import get_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    save_path = Path(cfg["save-path"] or f"results/{datetime.now():%Y-%m-%d_%H-%M-%S}")

    # The initial arrays declare the adapter's modules and shapes (a fresh PEFT model's); each
    # node's round-1 adapter is the method's shared start at the node's own rank.
    template = get_model(cfg, rank=max(int(r) for r in str(cfg["lora-ranks"]).split(",")))
    strategy = HeteroRankStrategy(
        cfg["method"],
        lora_alpha=cfg["lora-alpha"],
        fraction_train=cfg["fraction-train"],
        fraction_evaluate=0.0,
        min_train_nodes=cfg["min-nodes"],
        min_available_nodes=cfg["min-nodes"],
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(get_peft_model_state_dict(template)),
        num_rounds=cfg["num-server-rounds"],
        train_config=ConfigRecord({"save-path": str(save_path)}),
    )
    save_global_model(strategy, template, save_path)


def save_global_model(strategy: HeteroRankStrategy, template, path: Path) -> None:
    """The global adapter as a PEFT folder at its own ranks, and the base offset if any."""
    path.mkdir(parents=True, exist_ok=True)
    adapter, ranks = strategy.aggregator.global_adapter()
    if adapter:
        config = copy.deepcopy(template.peft_config["default"])
        config.r = max(ranks.values())
        # rank_pattern keys are module names inside the base model: drop PeftModel's prefix.
        config.rank_pattern = {m.removeprefix("base_model.model."): r for m, r in ranks.items() if r != config.r}
        config.save_pretrained(str(path))
        save_file(adapter, str(path / "adapter_model.safetensors"))
    offset = strategy.aggregator.base_offset()
    if offset:
        save_file({m: t.contiguous() for m, t in offset.items()}, str(path / "base_offset.safetensors"))
