"""The config the loopback deployment tests share: FlexLoRA on the tiny model, two rounds of every
client, two short steps each, the rank types at T1=2, T2=4, T3=4 (attention) / 16 (MLP), T4=16,
and the global adapter kept whole (eval.export_rank=64 > Σ r_k). Each test adds its nodes."""

from __future__ import annotations

RANKS = ["resources.t1=2", "resources.t2=4", "resources.t3_attention=4", "resources.t3_mlp=16", "resources.t4=16"]


def tiny_flexlora(num_clients: int) -> list[str]:
    """The overrides of a `num_clients`-client federation that trains each client in both rounds."""
    return [
        "model=tiny-llama",
        "device=cpu",
        "method=flexlora",
        "seed=0",
        f"data.num_clients={num_clients}",
        "data.train_per_client=6",
        "data.test_per_client=2",
        "data.cutoff_len=512",
        "federation.rounds=2",
        f"federation.clients_per_round={num_clients}",
        "train.steps=2",
        "train.batch_size=2",
        "train.micro_batch_size=1",
        "eval.max_new_tokens=4",
        "eval.max_examples_per_client=1",
        "eval.export_rank=64",
        *RANKS,
    ]


def on_nodes(num_nodes: int, node_wait_s: int = 300) -> list[str]:
    """A deployment's overrides: wait for every node, and give each round five minutes."""
    return [f"flower.min_nodes={num_nodes}", f"flower.node_wait_s={node_wait_s}", "flower.round_timeout_s=300"]
