"""The experiment configuration's schema: pydantic models with every key's type, default,
constraint (range, choices) and meaning (the docstring under it).

Loading (YAML plus `key=value` overrides), the one-line error messages and the checks that
need more than one key or a registry (methods, data sources, templates, resource profiles) are
in flexlora.config, which re-exports these classes. docs/configuration.md is generated from
this module (`flexlora config --reference`); a test fails when it is out of date.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError


class Explain:
    """Extra words for a key's error message and reference entry: `noun` names what the value
    is ("a LoRA rank must be >= 1"), `allowed` spells out a pattern ("auto, cpu or cuda[:N]")."""

    def __init__(self, noun: str | None = None, allowed: str | None = None):
        self.noun, self.allowed = noun, allowed


LoraRank = Annotated[int, Field(ge=1), Explain(noun="a LoRA rank")]


class Section(BaseModel):
    """A configuration section: unknown keys are errors, assignments are checked too, and a
    boolean is never taken for a number (nor a number for a boolean)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value, info):
        wants_bool = _base_type(cls.model_fields[info.field_name].annotation) is bool
        if wants_bool and not isinstance(value, bool):
            raise PydanticCustomError("bool_type", "expected true or false")
        if isinstance(value, bool) and not wants_bool:
            kind = _base_type(cls.model_fields[info.field_name].annotation)
            if kind in (int, float):
                raise PydanticCustomError(f"{kind.__name__}_type", "expected a number")
        return value


def _base_type(annotation):
    """int for `int`, `int | None` and `Annotated[int, ...]`; the annotation itself otherwise."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Annotated:
        return _base_type(args[0])
    if typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType) and len(args) == 1:
        return _base_type(args[0])
    return annotation


class DataConfig(Section):
    source: str = "synthetic"
    """synthetic (built in) | natural-instructions (a per-client folder) | dolly (JSONL, Dirichlet split) | json (generic JSON/JSONL instruction records) | hf (a Hugging Face dataset, split by a Flower Datasets partitioner; the extra flexlora[hf]); see flexlora.data.sources."""
    path: str | None = None
    """The folder or file of a non-synthetic source; hf: also a Hugging Face Hub id."""
    num_clients: int = Field(24, ge=1)
    """synthetic; dolly/json without a client field; hf with the iid or dirichlet partitioner: the number of clients to split into."""
    train_per_client: int = Field(24, ge=1)
    """synthetic: training examples per client."""
    test_per_client: int = Field(8, ge=0)
    """synthetic: test examples per client."""
    heldout_tasks: list[str] | None = None
    """synthetic: task types kept for evaluation only."""
    heldout_ids: list[str | int] | None = None
    """Held-out (evaluation-only) clients by id, never sampled for training; heldout_ids, heldout_fraction and heldout_categories add up."""
    heldout_fraction: float | None = Field(None, gt=0, lt=1)
    """A fraction of the clients held out, drawn with split_seed (so the same in every run)."""
    heldout_categories: list[str] | None = None
    """Whole task categories held out, e.g. ["Word Analogy"]."""
    split_seed: int = 0
    """Seed of the held-out draw and the Dirichlet split: fixed across runs and seeds."""
    dirichlet_alpha: float = Field(0.5, gt=0)
    """dolly/json; hf's dirichlet partitioner: Dirichlet(alpha) over categories; small is skewed."""
    min_client_size: int = Field(2, ge=1)
    """dolly/json: the Dirichlet split is redrawn until every client has this many examples; hf (iid, dirichlet): every client must have this many."""
    client_field: str = "client"
    """json: the record field naming the client."""
    test_path: str | None = None
    """dolly/json/hf: records kept out of training as the test split."""
    test_per_category: int = Field(10, ge=0)
    """dolly/json/hf without test_path: records per category held out for test."""
    hf_preset: str | None = None
    """hf: the column layout: alpaca (instruction, input, output, category) | dolly (instruction, context, response, category) | medical-flashcards (the question in input); FlowerTune's challenges general-nlp, finance, code (alpaca) and medical (medical-flashcards); null: a known Hub id's, else alpaca."""
    hf_columns: dict[str, str | None] = Field(default_factory=dict)
    """hf: columns by role (instruction, input, output, category), over the preset's, e.g. {instruction: question, output: answer}; a column named here must exist; null drops the role."""
    hf_split: str = "train"
    """hf: the split of a Hub id, a folder or a save_to_disk DatasetDict (a single file is one split)."""
    hf_subset: str | None = None
    """hf: the Hub dataset's subset (configuration) name."""
    hf_partitioner: Literal["iid", "dirichlet", "natural-id"] = "iid"
    """hf: Flower Datasets' partitioner: iid (num_clients equal shards) | dirichlet (Dirichlet(dirichlet_alpha) over hf_partition_by) | natural-id (one client per value of hf_partition_by)."""
    hf_partition_by: str | None = None
    """hf: the column that dirichlet splits over and natural-id groups by; null: the category column."""
    weight_by: Literal["auto", "local", "source"] = "auto"
    """n_k, a client's aggregation weight: local (its training-set size), source (clients.json's source size) or auto (source where given)."""
    max_train_per_client: int | None = Field(None, ge=1)
    """Keep a seeded subset of each client's training examples; null: all."""
    bad_records: Literal["skip", "error"] = "skip"
    """A malformed record: skip (report file:line and go on) or error (stop at the first)."""
    template: str = "alpaca"
    """Prompt template: alpaca | chat."""
    cutoff_len: int = Field(192, ge=16)
    """Tokens per training example, at most (longer inputs are shortened)."""
    train_on_inputs: bool = False
    """Also train on the prompt's tokens (false: the answer's only)."""


class ResourcesConfig(Section):
    profile: str | list | dict = "uniform"
    """Clients' rank types: a profile name (homo | uniform | heavy-tail-light | heavy-tail-strong | normal), a list of rank type names ([T1, T4, ...]), or a mapping / per-client list describing a rank distribution; checked by flexlora.resources."""
    t1: LoraRank = 8
    """Rank of type T1 (every module)."""
    t2: LoraRank = 30
    """Rank of type T2 (every module)."""
    t3_attention: LoraRank = 30
    """Rank of type T3 on attention modules."""
    t3_mlp: LoraRank = 200
    """Rank of type T3 on MLP modules."""
    t4: LoraRank = 200
    """Rank of type T4 (every module)."""


class LoraSettings(Section):
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator: a module's update is (alpha / r) B A."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """LoRA dropout on the adapter's input."""
    target_modules: list[str] | None = None
    """Modules that get an adapter (each must name a linear layer of the model); null: the architecture's defaults."""


class FederationConfig(Section):
    rounds: int = Field(3, ge=1)
    """Federated rounds."""
    clients_per_round: int = Field(4, ge=1)
    """Clients sampled per round."""
    fraction: float | None = Field(None, gt=0, le=1)
    """If set, overrides clients_per_round: ceil(fraction x training clients)."""
    min_updates: int = Field(1, ge=1)
    """A round with fewer valid updates keeps the previous global state (docs/reliability.md)."""
    max_norm_ratio: float | None = Field(10.0, gt=1)
    """Reject an update whose norm exceeds this multiple of the median of the round's others; null: off."""
    client_timeout_s: float | None = Field(None, gt=0)
    """A client still training after this many seconds is dropped for the round (checked per step); null: no limit."""
    dropout_rate: float = Field(0.0, ge=0, le=1)
    """Fault injection for tests: each sampled client fails with this probability (seeded)."""
    max_weight_share: float | None = Field(None, gt=0, le=1)
    """No client's share of a round's total aggregation weight exceeds this (the excess is spread over the others); null: p_k = n_k / sum n_j. A reply claiming more examples than its client declared is rejected whatever this is."""


class TrainConfig(Section):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Local optimizer: adamw (FedIT) | sgd (FedAvg)."""
    lr: float = Field(3e-4, gt=0)
    """Local learning rate."""
    lr_b_ratio: float = Field(1.0, gt=0)
    """LoRA's B factor trains at lr_b_ratio x lr, A (and anything else) at lr (LoRA+'s ratio; 1: one rate). A method argument of the same name, where a method has one, wins: lora_a2's defaults to 5, its paper's (docs/baselines.md)."""
    weight_decay: float = Field(0.0, ge=0)
    """Optimizer weight decay."""
    steps: int | None = Field(6, ge=1)
    """Local optimizer steps per round; null: use epochs."""
    epochs: float = Field(1.0, gt=0)
    """Local epochs per round when steps is null."""
    batch_size: int = Field(4, ge=1)
    """Examples per optimizer step."""
    micro_batch_size: int | None = None
    """Examples per forward/backward pass; must divide batch_size; null: the whole batch at once (smaller saves memory)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    gradient_checkpointing: bool = False
    """Recompute the decoder layers' activations in the backward pass instead of keeping them: less memory, about a third more compute (docs/memory.md)."""


class EvalConfig(Section):
    max_new_tokens: int = Field(32, ge=1)
    """Tokens generated per test example, at most."""
    batch_size: int = Field(16, ge=1)
    """Test examples per forward pass."""
    every: int = Field(1, ge=1)
    """Evaluate after every `every` rounds (and always after the last)."""
    max_examples_per_client: int | None = Field(None, ge=1)
    """Test examples per client, at most; null: all."""
    export_rank: int | None = Field(None, ge=1)
    """Rank of the exported global adapter; null: the largest client rank."""
    kv_cache: bool = True
    """One prefill per example for both scores, each client's shared prompt prefix once; false: the two-prefill path."""
    decode_batch_size: int | None = Field(None, ge=1)
    """With kv_cache: rows decoded together; null: 4 x batch_size."""
    spectrum: bool = True
    """Log per round, per module kind, the global update's energy share in each rank band of the clients' ranks and its effective rank ("spectrum" in metrics.jsonl, rank_energy.png; flexlora.spectrum). Measured on SmolLM2 shapes (210 modules, one CPU thread): 0.1 s a round at rank 8, 3 s at rank 200 (from the factors), 7 s for a dense global update (FLoRA, FedEx-LoRA, SLoRA's sparse stage)."""


class OutputConfig(Section):
    dir: str = "runs"
    """Folder that holds the run folders."""
    name: str | None = None
    """Run folder name; null: <method>-<profile>-seed<seed>-<timestamp>."""
    overwrite: bool = False
    """Replace an existing run folder (CLI: --overwrite)."""
    checkpoint: bool = True
    """Write the server state after every round (needed by --resume)."""
    keep_checkpoints: int = Field(1, ge=1)
    """Checkpoints kept, the newest first; with more than one, a resume whose newest checkpoint is corrupted falls back to the one before."""
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    """Experiment trackers fed each round's record as metrics.jsonl gets it, the config at the start and the summary at the end: tensorboard (event files in <run>/tensorboard) | mlflow | wandb; [] (none): metrics.jsonl is the record. Each is an extra (pip install 'flexlora[tensorboard]'); a tracker that fails mid-run is reported once and switched off (docs/tracking.md)."""
    experiment: str = "flexlora"
    """mlflow: the experiment's name; wandb: the project's."""
    mlflow_uri: str | None = None
    """mlflow: the tracking URI (file:///..., sqlite:///..., http://host:5000); null: MLFLOW_TRACKING_URI, else SQLite in <output.dir>/mlflow.db (MLflow 3 refuses file:// stores unless MLFLOW_ALLOW_FILE_STORE=true)."""
    wandb_mode: Literal["offline", "online", "disabled"] | None = None
    """wandb: null: WANDB_MODE, else offline (the run's files in <run>/wandb; `wandb sync` uploads them)."""


class FlowerConfig(Section):
    """Settings of the Flower engine (`engine: flower`); ignored by the in-process runtime."""

    transport_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """LoRA factors (and any base offset or sparse values) on the wire, both ways, packed into one array per field: float32 exact (a Flower run equals an in-process run bit for bit); float16 or bfloat16 half the bytes (float16: ~3 significant digits, an error above 65,504; bfloat16: ~2 digits, float32's range)."""
    workers: int = Field(1, ge=1)
    """Simulation: ClientApps training at once (each holds its own model copy)."""
    cpus_per_worker: int | None = Field(None, ge=1)
    """Simulation: CPU cores per ClientApp; null: all cores / workers."""
    gpus_per_worker: float | None = Field(None, ge=0)
    """Simulation: GPU share per ClientApp; null: 1/workers on CUDA, else 0."""
    ray_object_store_mb: int = Field(512, ge=64)
    """Simulation: Ray's shared-memory object store (MB)."""
    min_nodes: int | None = Field(None, ge=1)
    """Nodes to wait for before round 1; null: every client (simulation), clients_per_round (deployment)."""
    node_wait_s: float = Field(300.0, gt=0)
    """How long the ServerApp waits for min_nodes to connect (seconds)."""
    round_timeout_s: float = Field(3600.0, gt=0)
    """How long it waits for a round's replies (seconds); a missing reply is a dropout."""
    max_in_flight: int = Field(8, ge=1)
    """Tasks pushed to nodes and not answered yet, at most. Each holds its encoded message on the server (a rank-200 SmolLM2 client: ~243 MB in float32), so server memory grows with this, not with clients per round; but at most this many nodes train at once (simulation: set it >= flower.workers)."""
    secure_aggregation: bool = False
    """Flower's SecAgg+: the server receives only the weighted mean of the clients' uploads (flexlora, flora, fedex, fedit, ffa, hetlora with zero padding); per-update validation is then off (docs/privacy.md)."""
    # SecAgg+ (secure_aggregation): its SecAggPlusWorkflow's arguments (docs/privacy.md).
    secagg_num_shares: float = Field(1.0, gt=0)
    """Neighbours each client splits its mask secrets among: a fraction (<= 1) of the round's clients, or a count (an integer > 2)."""
    secagg_reconstruction_threshold: float = Field(0.5, gt=0)
    """Shares that rebuild a secret (a dropped client's masks; fewer reveal nothing): a fraction (<= 1) of secagg_num_shares, or a count (an integer >= 2, below secagg_num_shares)."""
    secagg_clipping_range: float = Field(1.0, gt=0)
    """c: each entry of a client's weighted upload (w_k / max w) x_k is clipped to [-c, c] before quantisation; its contribution to the mean can never exceed this."""
    secagg_quantization_range: int = Field(2**22, ge=2)
    """q: [-c, c] is quantised to integers 0..q; the mean's error per entry is below 2c/q with equal weights (docs/privacy.md)."""
    secagg_modulus_range: int = Field(2**32, ge=4, le=2**32)
    """M: masks and sums are taken modulo M, a power of 2 above q; clients per round x q must stay below M."""


class PrivacyConfig(Section):
    """Client-level differential privacy (docs/privacy.md): each client's change over the round clipped to clipping_norm in the space its method aggregates, Gaussian noise on the round's sum before the method's post-processing, and the (ε, δ) it spends in metrics.jsonl and summary.json (needs pip install 'flexlora[privacy]')."""

    enabled: bool = False
    """Turn client-level DP on (flexlora, fedit, hetlora, ffa, rolora; other methods are refused)."""
    clipping_norm: float | None = Field(None, gt=0)
    """C: a client's change over the round, over all modules (ΔW = (alpha/r) B A for flexlora; A and (alpha/r) B for fedit, hetlora, ffa, rolora), is scaled to norm at most C; null: no clipping (noise_multiplier must then be 0, and ε is infinite)."""
    noise_multiplier: float = Field(0.0, ge=0)
    """σ: Gaussian noise of standard deviation σ·C·w_max on the round's weighted sum, so σ·C / K on the aggregate of K equally weighted clients; 0: none (ε infinite)."""
    clipping: Literal["server", "client"] = "server"
    """Where updates are clipped: server (as they arrive) or client (before sending, keeping the client's rank; the server clips again what still exceeds C)."""
    weighting: Literal["equal", "capped"] = "equal"
    """The aggregation weights under DP: equal (w_k = 1; the guarantee holds with dataset sizes private) or capped (w_k = min(n_k, max_examples); dataset sizes are treated as public)."""
    max_examples: int | None = Field(None, ge=1)
    """capped: the cap on n_k in w_k = min(n_k, max_examples), the largest weight a client can have."""
    delta: float | None = Field(None, gt=0, lt=1)
    """δ of the reported (ε, δ); null: 1 / N^1.1 with N the training clients."""


class ExperimentConfig(Section):
    seed: int = 0
    """Seed of client sampling, rank-type assignment, initialisation and training."""
    engine: Literal["local", "flower"] = "local"
    """local (in-process) | flower (Flower's simulation engine; deployment: the app that `flexlora flower-app` prints)."""
    model: str = "smollm2-135m-instruct"
    """smollm2-135m-instruct | tiny-llama | random-llama-1b | a Hugging Face path or id."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen base weights (with quantization: the compute dtype of the 4-bit layers). LoRA factors, their gradients, the optimizer state and every update stay float32. On CUDA a 16-bit base also runs the forward pass under autocast (docs/memory.md)."""
    quantization: Literal["nf4"] | None = None
    """nf4: base linear layers in 4-bit NF4 (bitsandbytes, QLoRA); null: none."""
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$"), Explain(allowed="auto, cpu or cuda[:N]")] = "auto"
    """Where the model runs: auto | cpu | cuda | cuda:N."""
    method: str = "flexlora"
    """Aggregation method: flexlora | fedit | hetlora | slora | flora | ffa | rolora (flexlora.methods)."""
    method_args: dict[str, Any] = Field(default_factory=dict)
    """Arguments of the method (docs/baselines.md), plus server_opt: {name: fedavgm|fedadam|fedyogi, lr, ...} (flexlora, fedit) and fedprox_mu (any method)."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Data source, client split and prompts."""
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    """Clients' resource profile: which LoRA rank each client trains."""
    lora: LoraSettings = Field(default_factory=LoraSettings)
    """LoRA adapter settings."""
    federation: FederationConfig = Field(default_factory=FederationConfig)
    """Rounds, client sampling and reliability."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Local training of each client."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation of the global model."""
    output: OutputConfig = Field(default_factory=OutputConfig)
    """The run folder."""
    flower: FlowerConfig = Field(default_factory=FlowerConfig)
    """The Flower engine."""
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    """Client-level differential privacy."""

    def to_dict(self) -> dict:
        return self.model_dump()
