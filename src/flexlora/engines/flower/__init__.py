"""Flower engine: any method of the project on Flower's simulation and deployment
engines, with the project's own server, client step and evaluation unchanged.

- ServerApp (`server_app`, or `run_simulation`): builds the same `Experiment` as the in-process
  runtime (model, data, FederatedServer, centralised evaluation, run folder), finds out which
  client each node holds, and runs the same `run_rounds` loop with `FlowerRuntime`, which only
  turns ClientTasks into Flower Messages and replies back into ClientUpdates, streamed: at most
  `flower.max_in_flight` tasks pushed and unanswered, each reply handed on as it is pulled.
- `FederatedStrategy`: a Flower Strategy around the FederatedServer. One Message per node, each
  with the LoRA factors at that client's own ranks (Flower's stock strategies send one shared
  ArrayRecord to everyone); `configure_train`/`aggregate_train` are built from the same two
  halves FlowerRuntime uses, so the strategy also works under Flower's own `Strategy.start`.
- ClientApp (`client_app`): `query` says which client a node holds and what it can afford;
  `train` runs `client.train_client` on the node's data and replies with the factors.

On the wire (no pickle): each tensor field is an ArrayRecord named after it holding one packed
Array (packed.py: the field's tensors back to back in one .npy byte vector, floating-point ones
in `flower.transport_dtype`: float32, float16 or bfloat16), described by a JSON index (names,
dtypes, shapes, offsets) in the ConfigRecord beside the metadata: "factors" (`<module>.lora_A` /
`<module>.lora_B`), a method's global base offset "base_offset" (one dense (out, in) tensor per
module), sparse deltas "deltas" (`<module>.indices` int64, `<module>.values`; a method whose
client trains the base weights), their shapes in the "update" JSON. The ClientTask and the
experiment config travel as JSON strings in a ConfigRecord "task"; the reply's ClientUpdate
fields in a ConfigRecord "update".

Which client a node is: in simulation, node i holds training client i (`partition-id`); in a
deployment, the node config names its data (`data-path`, optionally `client-id`) and its
resources (`lora-rank=N`, `rank-type=T3` or `memory-budget-mb=M`; none: the run's profile).
A node declares its size (aggregation weight n_k) once, in its discovery reply: its training-set
size, or `num-examples=N` from its node config (set by the node's operator); the server rejects
a later reply claiming more, and `federation.max_weight_share` bounds what any declared size buys.

torch, transformers and PEFT are imported only where a model or tensor is needed: in a
deployment every Message starts a fresh ClientApp process, and a `query` needs none of them.

Modules by role: codec.py (protocol objects <-> Flower records), packed.py (tensors <-> one
packed array and its index), server_app.py (strategy,
runtime, node discovery, ServerApp), client_app.py (node data and model, ClientApp),
simulation.py (`run_simulation`), certs.py (TLS certificates and SuperNode keys).
"""

from __future__ import annotations

try:  # an extra, not a core dependency: say which one when it is missing
    import flwr  # noqa: F401
except ModuleNotFoundError:
    from flexlora.extras import missing

    raise missing("flwr", "the Flower engine") from None

from flexlora.engines.flower.client_app import (  # noqa: F401
    CLIENT_ERROR,
    RESOURCE_KEYS,
    client_app,
    load_node_data,
    node_client,
    node_model,
)
from flexlora.engines.flower.codec import (  # noqa: F401
    DELTAS,
    DTYPES,
    FACTORS,
    INDEX,
    NODE,
    OFFSET,
    PACKED,
    TASK,
    UPDATE,
    decode,
    decode_task,
    decode_update,
    encode,
    encode_task,
    encode_update,
    factors_to_record,
    is_packed,
    message_bytes,
    message_objects,
    packed_array,
    payload_bytes,
    record_to_factors,
    record_to_tensors,
    tensors_to_record,
)
from flexlora.engines.flower.server_app import (  # noqa: F401
    FederatedStrategy,
    FlowerRuntime,
    Sent,
    config_from_run_config,
    discover,
    reply_result,
    serve,
    server_app,
    wait_for_nodes,
)
from flexlora.engines.flower.simulation import backend_config, run_simulation  # noqa: F401
