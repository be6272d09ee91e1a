"""flower-peft: the ClientApp. It trains a PEFT LoRA adapter at this node's own rank and
exchanges adapter weights as ArrayRecords, as any FlowerTune ClientApp does. It imports nothing
of flexlora: what a flexlora strategy asks of it is
- to declare its rank: `lora-rank` in its replies, and an answer to the `query.lora_rank`
  Message that the strategy sends before the node's first round;
- `num-examples` in its train reply (Flower's convention);
- to add `base-offset` to its base weights when the Message has one (FedEx-LoRA, FLoRIST)."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from flower_peft.task import add_base_offset, get_model, load_data, train

app = ClientApp()


def node_rank(context: Context) -> int:
    """This node's LoRA rank: its node config `lora-rank` (a deployed SuperNode:
    `--node-config "lora-rank=16"`), else run config `lora-ranks` by partition id (simulation)."""
    if "lora-rank" in context.node_config:
        return int(context.node_config["lora-rank"])
    ranks = [int(r) for r in str(context.run_config["lora-ranks"]).split(",")]
    return ranks[int(context.node_config.get("partition-id", 0)) % len(ranks)]


@app.query("lora_rank")
def lora_rank(msg: Message, context: Context) -> Message:
    """Tell the strategy this node's rank before its first round."""
    return Message(RecordDict({"metrics": MetricRecord({"lora-rank": node_rank(context)})}), reply_to=msg)


@app.train()
def train_adapter(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    config = msg.content["config"]
    # The rank the strategy sent: this node's own, except under FedIT (the federation's smallest).
    rank = int(config.get("lora-rank", node_rank(context)))
    model = get_model(cfg, rank)
    if "base-offset" in msg.content:
        add_base_offset(model, msg.content["base-offset"].to_torch_state_dict())
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())

    partition_id = int(context.node_config.get("partition-id", 0))
    texts = load_data(partition_id, cfg)
    loss = train(model, texts, cfg, seed=partition_id * 1000 + int(config["server-round"]))

    metrics = MetricRecord({"train-loss": loss, "num-examples": len(texts), "lora-rank": node_rank(context)})
    return Message(RecordDict({"arrays": ArrayRecord(get_peft_model_state_dict(model)), "metrics": metrics}), reply_to=msg)
