"""The experiment configuration's schema: typed dataclasses with their defaults and what each
key means. Loading (YAML plus `key=value` overrides, type coercion) and the checks of every
value are in flexlora.config, which re-exports these classes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class DataConfig:
    # synthetic (built in) | natural-instructions (per-client folder) | dolly (JSONL, Dirichlet
    # split) | json (generic JSON/JSONL instruction records); see flexlora.data.sources
    source: str = "synthetic"
    path: str | None = None  # the folder or file of a non-synthetic source
    num_clients: int = 24  # synthetic; dolly/json without a client field: clients to split into
    train_per_client: int = 24  # synthetic
    test_per_client: int = 8  # synthetic
    heldout_tasks: list[str] | None = None  # synthetic: task types kept for evaluation only
    # Held-out (evaluation-only) clients, never sampled for training; the three add up.
    heldout_ids: list[str | int] | None = None
    heldout_fraction: float | None = None  # drawn with split_seed, so the same in every run
    heldout_categories: list[str] | None = None  # whole task categories, e.g. ["Word Analogy"]
    split_seed: int = 0  # held-out draw and Dirichlet split: fixed across runs and seeds
    dirichlet_alpha: float = 0.5  # dolly/json: Dirichlet(alpha) over categories; small = skewed
    min_client_size: int = 2  # dolly/json: the Dirichlet split is redrawn until every client has this many
    client_field: str = "client"  # json: record field naming the client
    test_path: str | None = None  # dolly/json: records kept out of training as the test split
    test_per_category: int = 10  # dolly/json without test_path: records per category held out for test
    weight_by: str = "auto"  # auto | local | source: n_k = local training-set size or clients.json's source size
    max_train_per_client: int | None = None  # keep a seeded subset of each client's training examples
    bad_records: str = "skip"  # skip (report file:line and go on) | error (stop at the first)
    template: str = "alpaca"  # alpaca | chat
    cutoff_len: int = 192
    train_on_inputs: bool = False


@dataclass
class ResourcesConfig:
    profile: str | list[str] = "uniform"  # homo | uniform | heavy-tail-light | heavy-tail-strong | normal | [T1, T4, ...]
    t1: int = 8
    t2: int = 30
    t3_attention: int = 30
    t3_mlp: int = 200
    t4: int = 200


@dataclass
class LoraSettings:
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: the architecture's defaults


@dataclass
class FederationConfig:
    rounds: int = 3
    clients_per_round: int = 4
    fraction: float | None = None  # if set, overrides clients_per_round: ceil(fraction * N)
    # Reliability (docs/reliability.md). A round with fewer valid updates than min_updates keeps
    # the previous global state.
    min_updates: int = 1
    # Reject an update whose norm exceeds this multiple of the median of the round's others; null: off.
    max_norm_ratio: float | None = 10.0
    # A client still training after this many seconds is dropped for the round (checked per step).
    client_timeout_s: float | None = None
    # Fault injection for tests: each sampled client fails with this probability (seeded).
    dropout_rate: float = 0.0
    # No client's share of a round's total aggregation weight exceeds this (the excess is spread
    # over the others); null: p_k = n_k / sum n_j. A reply claiming more examples than its
    # client declared (its training-set size in-process, its discovery reply on Flower) is
    # rejected whatever this is.
    max_weight_share: float | None = None


@dataclass
class TrainConfig:
    optimizer: str = "adamw"  # adamw (FedIT) | sgd (FedAvg)
    lr: float = 3e-4
    weight_decay: float = 0.0
    steps: int | None = 6  # local optimizer steps per round; None: use epochs
    epochs: float = 1.0
    batch_size: int = 4
    micro_batch_size: int | None = None  # None: the whole batch at once; smaller saves memory
    max_grad_norm: float = 1.0
    # Activation checkpointing of the decoder layers: recompute activations in the backward
    # pass instead of keeping them (less memory, about a third more compute). docs/memory.md
    gradient_checkpointing: bool = False


@dataclass
class EvalConfig:
    max_new_tokens: int = 32
    batch_size: int = 16
    every: int = 1  # evaluate after every `every` rounds (and always after the last)
    max_examples_per_client: int | None = None
    export_rank: int | None = None  # rank of the exported global adapter; None: the largest client rank
    kv_cache: bool = True  # one prefill per example for both scores, each client's shared prompt prefix once; false: the two-prefill path
    decode_batch_size: int | None = None  # kv_cache: rows decoded together; None: 4 x batch_size


@dataclass
class OutputConfig:
    dir: str = "runs"
    name: str | None = None  # None: <method>-<profile>-seed<seed>-<timestamp>
    overwrite: bool = False  # CLI: --overwrite
    checkpoint: bool = True  # write the server state after every round (needed by --resume)
    # Checkpoints kept (the newest first); with more than one, a resume whose newest checkpoint
    # is corrupted (checksum, truncation) falls back to the one before.
    keep_checkpoints: int = 1


@dataclass
class FlowerConfig:
    """Settings of the Flower engine (`engine: flower`); ignored by the in-process runtime."""

    transport_dtype: str = "float32"  # float32 | float16: LoRA factors on the wire, both ways
    workers: int = 1  # simulation: ClientApps training at once (each holds its own model copy)
    cpus_per_worker: int | None = None  # simulation: CPU cores per ClientApp; None: all cores / workers
    gpus_per_worker: float | None = None  # simulation: GPU share per ClientApp; None: 1/workers on CUDA, else 0
    ray_object_store_mb: int = 512  # simulation: Ray's shared-memory object store
    min_nodes: int | None = None  # nodes to wait for before round 1; None: every client (simulation), clients_per_round (deployment)
    node_wait_s: float = 300.0  # how long the ServerApp waits for min_nodes to connect
    round_timeout_s: float = 3600.0  # how long it waits for a round's replies; a missing reply is a dropout
    # Tasks pushed to nodes and not answered yet, at most (rounds stream: a task is built and
    # encoded only when a slot is free, each reply folded as it comes). Each in-flight task holds
    # its encoded Message (a rank-200 SmolLM2 client: ~243 MB in float32) on the server side, so
    # server memory grows with this, not with clients per round; but at most this many nodes
    # train at once (simulation: set it >= flower.workers; deployment: the nodes to run in parallel).
    max_in_flight: int = 8


@dataclass
class ExperimentConfig:
    seed: int = 0
    engine: str = "local"  # local (in-process) | flower (Flower's simulation engine; deployment: flower_app/)
    model: str = "smollm2-135m-instruct"  # smollm2-135m-instruct | tiny-llama | random-llama-1b | HF path or id
    # Dtype of the frozen base weights: float32 | bfloat16 | float16 (with quantization: the
    # compute dtype of the 4-bit layers). LoRA factors, their gradients, the optimizer state and
    # every update sent to the server stay float32 whatever it is. On CUDA, a 16-bit base also
    # runs the forward pass under autocast. docs/memory.md
    model_dtype: str = "float32"
    quantization: str | None = None  # null | nf4: base linear layers in 4-bit NF4 (bitsandbytes, QLoRA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    method: str = "flexlora"  # flexlora | fedit | hetlora | slora | flora | ffa | rolora (flexlora.methods)
    # Arguments of the method (see docs/baselines.md), plus server_opt: {name: fedavgm|fedadam|
    # fedyogi, lr, ...} (flexlora, fedit) and fedprox_mu (any method).
    method_args: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
