"""The data model every source produces: one task (or data shard) per client."""

from __future__ import annotations

from dataclasses import dataclass, field

from flexlora.errors import DataError  # noqa: F401  (re-exported: data code raises it)


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str
    category: str = ""


@dataclass
class ClientData:
    client_id: str
    category: str
    train: list[Example]
    test: list[Example] = field(default_factory=list)
    eval: list[Example] = field(default_factory=list)
    # Aggregation weight n_k; defaults to the local training-set size.
    weight: int | None = None

    @property
    def num_examples(self) -> int:
        return self.weight if self.weight is not None else len(self.train)


@dataclass
class FederatedDataset:
    """Training clients (sampled each round) and held-out clients (evaluation only).

    `issues` lists the problems found while loading (bad records skipped, empty clients
    dropped), one line each, so that a run can report them instead of crashing.
    """

    name: str
    clients: list[ClientData]
    heldout: list[ClientData]
    issues: list[str] = field(default_factory=list)

    def __post_init__(self):
        train_ids = {c.client_id for c in self.clients}
        leaked = train_ids & {c.client_id for c in self.heldout}
        if leaked:
            raise ValueError(f"held-out clients also in training: {sorted(leaked)[:5]}")
