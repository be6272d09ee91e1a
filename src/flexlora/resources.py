"""Client resources: the paper's rank types and resource profiles.

A rank type says which LoRA rank a client can afford on each kind of module; a profile says
how often each type occurs in the federation. Types are drawn once per run from the seed.

`resources.profile` is one of (docs/resources.md):
- a preset name (PROFILES): the paper's four types with the paper's probabilities;
- a distribution's short name, KIND-MIN-MAX (log-uniform-8-200, uniform-8-200): the same as
  {distribution: KIND, min: MIN, max: MAX}, and what profile_label writes for it, so that a
  grid (`flexlora compare --profiles`) and a run folder can name it in one word;
- a list, one entry per client in order: a type name, a rank (int) or {attention: r, mlp: r};
- a path to a JSON/YAML file holding such a list or a mapping client id -> entry;
- a mapping: {distribution: log-uniform | uniform, min, max} (or per module kind:
  {distribution: ..., attention: {min, max}, mlp: {min, max}}), {distribution: discrete,
  ranks: [...], probs: [...]}, {probs: {type: p, ...} or a preset name} or {clients: list |
  mapping | path}; the last two may add or redefine types with {types: {name: r or
  {attention: r, mlp: r}}}.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RankType:
    """Ranks by module kind; `default` covers any module not named in `by_module`."""

    name: str
    default: int
    by_module: tuple[tuple[str, int], ...] = ()

    def rank_for(self, module_name: str) -> int:
        leaf = module_name.rsplit(".", 1)[-1]
        for suffix, rank in self.by_module:
            if leaf == suffix:
                return rank
        return self.default

    def max_rank(self) -> int:
        return max([self.default, *(r for _, r in self.by_module)])


# The paper's four types (Bai et al. 2024, Sec. 5.1).
def paper_rank_types(t1: int = 8, t2: int = 30, t3_attention: int = 30, t3_mlp: int = 200, t4: int = 200):
    return {
        "T1": RankType("T1", t1),
        "T2": RankType("T2", t2),
        "T3": RankType("T3", t3_attention, tuple((m, t3_mlp) for m in MLP)),
        "T4": RankType("T4", t4),
    }


# Probability of each type per profile (Sec. 5.1 of the paper).
PROFILES: dict[str, dict[str, float]] = {
    "homo": {"T1": 1.0},
    "uniform": {"T1": 0.25, "T2": 0.25, "T3": 0.25, "T4": 0.25},
    "heavy-tail-light": {"T1": 0.80, "T2": 0.05, "T3": 0.05, "T4": 0.10},
    "heavy-tail-strong": {"T1": 0.05, "T2": 0.05, "T3": 0.10, "T4": 0.80},
    "normal": {"T1": 0.10, "T2": 0.40, "T3": 0.40, "T4": 0.10},
}


def assign_rank_types(client_ids: list[str], profile, seed: int) -> dict[str, str]:
    """Client id -> type name, drawn once per run, under the paper's default types (see
    client_rank_types for the types that non-preset profiles define)."""
    return client_rank_types(client_ids, profile, seed, paper_rank_types())[0]


# ---------------------------------------------------------------- profiles beyond four types

KINDS = ("attention", "mlp")
DISTRIBUTIONS = ("log-uniform", "uniform", "discrete")
FILE_SUFFIXES = (".json", ".yaml", ".yml")
_PROFILE_KEYS = ("distribution", "probs", "clients")
_SHORT_DISTRIBUTION = re.compile(r"(log-uniform|uniform)-(\d+)-(\d+)")


def module_kind(module_name: str) -> str:
    """attention | mlp | other, from the module's last name (q_proj ... down_proj)."""
    leaf = module_name.rsplit(".", 1)[-1]
    return "attention" if leaf in ATTENTION else "mlp" if leaf in MLP else "other"


def _rank(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: a LoRA rank must be an integer >= 1, got {value!r}")
    return value


def _kind_ranks(value, where: str) -> tuple[int, int]:
    """(attention rank, MLP rank) of an entry that is a rank or {attention: r, mlp: r}."""
    if isinstance(value, dict):
        if set(value) != set(KINDS):
            raise ValueError(
                f"{where}: ranks by module kind need exactly the keys attention and mlp, got {sorted(map(str, value))}"
            )
        return _rank(value["attention"], f"{where}.attention"), _rank(value["mlp"], f"{where}.mlp")
    rank = _rank(value, where)
    return rank, rank


def ranks_type(attention: int, mlp: int, name: str | None = None) -> RankType:
    """A rank type with `attention` on every module but the MLP ones, which get `mlp` (as T3);
    named r<rank> when both are equal, else a<attention>-m<mlp>, unless `name` is given."""
    name = name or (f"r{attention}" if attention == mlp else f"a{attention}-m{mlp}")
    return RankType(name, attention, tuple((m, mlp) for m in MLP) if mlp != attention else ())


def _is_generated_name(name: str) -> bool:
    parts = name.split("-")
    return (len(parts) == 1 and name[:1] == "r" and name[1:].isdigit()) or (
        len(parts) == 2 and parts[0][:1] == "a" and parts[0][1:].isdigit() and parts[1][:1] == "m" and parts[1][1:].isdigit()
    )


def _custom_types(spec, base_types: dict[str, RankType]) -> dict[str, RankType]:
    """The base types plus the profile's `types:` (a new name, or a redefined one)."""
    types_ = dict(base_types)
    if spec is None:
        return types_
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"types: expected a mapping of type name -> rank or {{attention: r, mlp: r}}, got {spec!r}")
    for name, value in spec.items():
        name = str(name)
        if _is_generated_name(name):
            raise ValueError(f"types.{name}: names like r8 and a8-m64 are kept for ranks given directly; pick another name")
        types_[name] = ranks_type(*_kind_ranks(value, f"types.{name}"), name=name)
    return types_


def _entry_type(entry, where: str, types_: dict[str, RankType]) -> RankType:
    """One client's entry of an explicit assignment: a type name, a rank or per-kind ranks."""
    if isinstance(entry, str):
        if entry not in types_:
            raise ValueError(f"{where}: unknown rank type {entry!r}; choose from: {', '.join(types_)}, or give a rank")
        return types_[entry]
    return ranks_type(*_kind_ranks(entry, where))


def _read_clients_file(path: str):
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"clients file {path} not found")
    try:
        text = file.read_text()
        content = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ValueError(
            f"clients file {path} cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if not isinstance(content, (list, dict)) or not content:
        raise ValueError(f"clients file {path}: expected a list (one entry per client) or a mapping client id -> entry")
    return content


def _explicit_entries(clients, types_: dict[str, RankType]) -> tuple[list[RankType] | dict[str, RankType], str]:
    """Every entry checked: (a list of types or a mapping client id -> type, where it came from)."""
    where = "clients"
    if isinstance(clients, str):
        where, clients = f"clients file {clients}", _read_clients_file(clients)
    if isinstance(clients, (list, tuple)):
        return [_entry_type(e, f"{where}[{i}]", types_) for i, e in enumerate(clients)], where
    if isinstance(clients, dict) and clients:
        return {str(cid): _entry_type(e, f"{where}: client {cid}", types_) for cid, e in clients.items()}, where
    raise ValueError(f"clients: expected a list, a mapping client id -> entry or a JSON/YAML file, got {clients!r}")


def _bounds(spec, where: str) -> tuple[int, int]:
    if not isinstance(spec, dict) or set(spec) != {"min", "max"}:
        raise ValueError(f"{where}: expected {{min: r, max: r}}, got {spec!r}")
    low, high = _rank(spec["min"], f"{where}.min"), _rank(spec["max"], f"{where}.max")
    if low > high:
        raise ValueError(f"{where}: min {low} is above max {high}")
    return low, high


@dataclass(frozen=True)
class RankDistribution:
    """Ranks drawn per client: log-uniform or uniform over the integers of [min, max] per
    module kind, or a discrete choice among given ranks."""

    kind: str  # log-uniform | uniform | discrete
    attention: tuple[int, int] = (1, 1)  # [min, max] of the attention (and any other) modules
    mlp: tuple[int, int] = (1, 1)
    choices: tuple[tuple[int, int], ...] = ()  # discrete: (attention, mlp) ranks
    probs: tuple[float, ...] = ()

    def rank_at(self, u: float, low: int, high: int) -> int:
        """The rank at quantile u in [0, 1): log-uniform floors exp(U(ln min, ln(max + 1))), so
        P(r) = ln(1 + 1/r) / ln((max + 1) / min); uniform: each integer 1 / (max - min + 1)."""
        if self.kind == "uniform":
            return low + int(u * (high - low + 1))
        return min(high, int(math.exp(math.log(low) + u * (math.log(high + 1) - math.log(low)))))

    def draw(self, rng: random.Random) -> tuple[int, int]:
        """(attention rank, MLP rank) of one client. One quantile serves both kinds: a client
        that affords a high rank on attention affords a high one on the MLP too (as T1..T4)."""
        if self.kind == "discrete":
            return rng.choices(self.choices, weights=self.probs)[0]
        u = rng.random()
        return self.rank_at(u, *self.attention), self.rank_at(u, *self.mlp)


def _distribution(spec: dict) -> RankDistribution:
    kind = spec["distribution"]
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"distribution: unknown {kind!r}; choose from: {', '.join(DISTRIBUTIONS)}")
    if kind == "discrete":
        extra = sorted(set(spec) - {"distribution", "ranks", "probs"})
        if extra:
            raise ValueError(f"distribution discrete takes ranks and probs, not {extra[0]}")
        ranks = spec.get("ranks")
        if not isinstance(ranks, list) or not ranks:
            raise ValueError(f"ranks: expected a non-empty list of ranks or {{attention: r, mlp: r}}, got {ranks!r}")
        choices = tuple(_kind_ranks(r, f"ranks[{i}]") for i, r in enumerate(ranks))
        probs = spec.get("probs", [1.0 / len(ranks)] * len(ranks))
        if not isinstance(probs, list) or len(probs) != len(ranks):
            raise ValueError(f"probs: expected a list of {len(ranks)} probabilities (one per rank), got {probs!r}")
        if any(isinstance(p, bool) or not isinstance(p, (int, float)) or not p >= 0 for p in probs):
            raise ValueError(f"probs: every probability must be a number >= 0, got {probs!r}")
        if abs(sum(probs) - 1) > 1e-6:
            raise ValueError(f"probs: must add up to 1, got {sum(probs):g}")
        return RankDistribution(kind, choices=choices, probs=tuple(float(p) for p in probs))
    extra = sorted(set(spec) - {"distribution", "min", "max", *KINDS})
    if extra:
        raise ValueError(
            f"distribution {kind} takes min and max (or attention: {{min, max}} and mlp: {{min, max}}), not {extra[0]}"
        )
    if "min" in spec or "max" in spec:
        if set(spec) & set(KINDS):
            raise ValueError(f"distribution {kind}: give min/max or attention/mlp ranges, not both")
        if not {"min", "max"} <= set(spec):
            raise ValueError(f"distribution {kind}: needs both min and max, {'max' if 'min' in spec else 'min'} is missing")
        both = _bounds({k: spec[k] for k in ("min", "max")}, kind)
        return RankDistribution(kind, both, both)
    if set(KINDS) - set(spec):
        raise ValueError(f"distribution {kind}: needs min and max, or both attention: {{min, max}} and mlp: {{min, max}}")
    return RankDistribution(kind, _bounds(spec["attention"], "attention"), _bounds(spec["mlp"], "mlp"))


def _probs(spec, types_: dict[str, RankType]) -> dict[str, float]:
    if isinstance(spec, str):
        if spec not in PROFILES:
            raise ValueError(f"probs: unknown preset '{spec}'; choose from: {', '.join(PROFILES)}")
        return PROFILES[spec]
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"probs: expected a mapping type name -> probability or a preset name, got {spec!r}")
    for name, p in spec.items():
        if str(name) not in types_:
            raise ValueError(f"probs: unknown rank type {name!r}; choose from: {', '.join(types_)} (or define it under types)")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p >= 0:
            raise ValueError(f"probs.{name}: must be a number >= 0, got {p!r}")
    if abs(sum(spec.values()) - 1) > 1e-6:
        raise ValueError(f"probs: must add up to 1, got {sum(spec.values()):g}")
    return {str(k): float(v) for k, v in spec.items()}


@dataclass(frozen=True)
class Profile:
    """A parsed `resources.profile`: exactly one of probs (types drawn by these probabilities),
    explicit (a type per client, in order or by id) and distribution (ranks drawn per client)."""

    types: dict[str, RankType]
    probs: dict[str, float] | None = None
    explicit: list[RankType] | dict[str, RankType] | None = None
    source: str = "clients"  # where an explicit assignment came from, for error messages
    distribution: RankDistribution | None = None


def parse_profile(profile, base_types: dict[str, RankType]) -> Profile:
    """Every form of `resources.profile` (see the module's docstring), checked: a bad value is a
    one-line ValueError. A file is read here; client ids are checked in client_rank_types."""
    if isinstance(profile, str):
        if profile in PROFILES:
            return Profile(dict(base_types), probs=PROFILES[profile])
        if profile.endswith(FILE_SUFFIXES):
            explicit, source = _explicit_entries(profile, base_types)
            return Profile(dict(base_types), explicit=explicit, source=source)
        short = _SHORT_DISTRIBUTION.fullmatch(profile)
        if short:
            kind, low, high = short.groups()
            return Profile(
                dict(base_types), distribution=_distribution({"distribution": kind, "min": int(low), "max": int(high)})
            )
        raise ValueError(
            f"unknown profile '{profile}'; choose from: {', '.join(PROFILES)}, a distribution such as log-uniform-8-200, "
            "or a .json/.yaml clients file"
        )
    if isinstance(profile, (list, tuple)):
        explicit, source = _explicit_entries(list(profile), base_types)
        return Profile(dict(base_types), explicit=explicit, source=source)
    if not isinstance(profile, dict):
        raise ValueError(f"expected a preset name, a list, a file or a mapping, got {profile!r}")
    if "distribution" in profile:  # its own keys (a discrete one has probs over ranks)
        if "types" in profile or "clients" in profile:
            raise ValueError(
                f"{'types' if 'types' in profile else 'clients'}: not with a distribution, which draws ranks per client"
            )
        return Profile(dict(base_types), distribution=_distribution(profile))
    given = [k for k in _PROFILE_KEYS if k in profile]
    if len(given) != 1:
        raise ValueError(
            f"a profile mapping needs exactly one of {', '.join(_PROFILE_KEYS)}, got {', '.join(map(str, profile)) or 'none'}"
        )
    extra = sorted(set(map(str, profile)) - {given[0], "types"})
    if extra:
        raise ValueError(f"unknown profile key '{extra[0]}' beside {given[0]}; allowed: types")
    types_ = _custom_types(profile.get("types"), base_types)
    if given == ["probs"]:
        return Profile(types_, probs=_probs(profile["probs"], types_))
    explicit, source = _explicit_entries(profile["clients"], types_)
    return Profile(types_, explicit=explicit, source=source)


def client_rank_types(
    client_ids: list[str], profile, seed: int, base_types: dict[str, RankType]
) -> tuple[dict[str, str], dict[str, RankType]]:
    """(client id -> type name, every type by name) for the run: presets and `probs` draw a type
    per client, a distribution draws ranks per client (a type named after them, r16 or
    a8-m64), an explicit assignment gives each client its entry. All draws are seeded by the
    run's seed, in client order."""
    parsed = parse_profile(profile, base_types)
    types_ = dict(parsed.types)
    if parsed.probs is not None:
        names, probs = zip(*parsed.probs.items())
        rng = random.Random(f"rank-types-{seed}")
        return {cid: rng.choices(names, weights=probs)[0] for cid in client_ids}, types_
    if parsed.distribution is not None:
        rng = random.Random(f"rank-draw-{seed}")
        chosen = {cid: ranks_type(*parsed.distribution.draw(rng)) for cid in client_ids}
    elif isinstance(parsed.explicit, list):
        if len(parsed.explicit) != len(client_ids):
            raise ValueError(f"{parsed.source} has {len(parsed.explicit)} entries for {len(client_ids)} clients")
        chosen = dict(zip(client_ids, parsed.explicit))
    else:
        unknown = sorted(set(parsed.explicit) - set(client_ids))
        if unknown:
            raise ValueError(f"{parsed.source}: unknown client id '{unknown[0]}' ({len(unknown)} unknown in all)")
        missing = [cid for cid in client_ids if cid not in parsed.explicit]
        if missing:
            raise ValueError(f"{parsed.source}: no entry for client '{missing[0]}' ({len(missing)} missing in all)")
        chosen = {cid: parsed.explicit[cid] for cid in client_ids}
    for rank_type in chosen.values():
        types_.setdefault(rank_type.name, rank_type)
    return {cid: t.name for cid, t in chosen.items()}, types_


def profile_label(profile) -> str:
    """A short name of the profile for run folder names: the preset, the distribution with its
    bounds (log-uniform-4-64), the clients file's stem, or explicit/custom."""
    if isinstance(profile, str):
        return profile if profile in PROFILES or _SHORT_DISTRIBUTION.fullmatch(profile) else f"file-{Path(profile).stem}"
    if isinstance(profile, dict) and "distribution" in profile:
        kind = str(profile["distribution"])
        if "min" in profile and "max" in profile:
            return f"{kind}-{profile['min']}-{profile['max']}"
        return kind
    if isinstance(profile, dict) and "probs" in profile:
        return profile["probs"] if isinstance(profile["probs"], str) and "types" not in profile else "custom"
    return "explicit"


def client_record(rank_type: RankType | None, name: str, ranks: dict[str, int]) -> dict:
    """What clients.json says of a client: its type's name, what it drew per module kind (the
    type's ranks, before caps), and the ranks it trains at per module kind (one number, or
    every distinct one when capping by the module's size or the method made them differ)."""
    by_kind: dict[str, set[int]] = {}
    for module, r in ranks.items():
        by_kind.setdefault(module_kind(module), set()).add(r)
    record = {"rank_type": name, "max_rank": max(ranks.values())}
    if rank_type is not None:
        record["drawn"] = {"attention": rank_type.rank_for("q_proj"), "mlp": rank_type.rank_for("up_proj")}
    record["ranks"] = {k: (min(v) if len(v) == 1 else sorted(v)) for k, v in sorted(by_kind.items())}
    return record


def module_ranks(rank_type: RankType, module_shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Per-module rank of a client, capped at min(d_out, d_in) so small models stay valid."""
    return {name: min(rank_type.rank_for(name), min(shape)) for name, shape in module_shapes.items()}


# AdamW training state of one float32 LoRA parameter: the weight, its gradient, two moments.
TRAINING_BYTES_PER_PARAM = 16


def adapter_training_bytes(ranks: dict[str, int], module_shapes: dict[str, tuple[int, int]]) -> int:
    """Memory of an adapter's training state: r * (d_out + d_in) parameters per module, 16 bytes
    each. Activations and the frozen base model come on top and do not depend on the rank."""
    return TRAINING_BYTES_PER_PARAM * sum(r * sum(module_shapes[m]) for m, r in ranks.items())


def rank_type_for_memory(
    budget_mb: float, module_shapes: dict[str, tuple[int, int]], rank_types: dict[str, RankType]
) -> RankType:
    """The rank type with the largest adapter whose training state fits `budget_mb` (MiB of
    memory the client sets aside for LoRA), see adapter_training_bytes."""
    budget = budget_mb * 2**20
    cost = {name: adapter_training_bytes(module_ranks(rt, module_shapes), module_shapes) for name, rt in rank_types.items()}
    fitting = [name for name in rank_types if cost[name] <= budget]
    if not fitting:
        cheapest = min(cost, key=cost.get)
        raise ValueError(
            f"memory budget {budget_mb} MiB is below the smallest rank type's need ({cheapest}: {cost[cheapest] / 2**20:.1f} MiB)"
        )
    return rank_types[max(fitting, key=lambda name: (cost[name], name))]


def declared_rank_type(
    declaration: dict, module_shapes: dict[str, tuple[int, int]], rank_types: dict[str, RankType]
) -> RankType | None:
    """A client's own resources (from a Flower node config) as a rank type: `lora-rank` (one
    rank on every module), `rank-type` (a type name, e.g. T3) or `memory-budget-mb`; None if it
    declares none of them (the run's resource profile decides)."""
    given = [k for k in ("lora-rank", "rank-type", "memory-budget-mb") if declaration.get(k) not in (None, "")]
    if len(given) > 1:
        raise ValueError(f"declare one of lora-rank, rank-type, memory-budget-mb, got {', '.join(given)}")
    if not given:
        return None
    value = declaration[given[0]]
    if given[0] == "lora-rank":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"lora-rank must be an integer >= 1, got {value!r}")
        return RankType(f"r{value}", value)
    if given[0] == "rank-type":
        if value not in rank_types:
            raise ValueError(f"unknown rank-type {value!r}; choose from: {', '.join(rank_types)}")
        return rank_types[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"memory-budget-mb must be a number > 0, got {value!r}")
    return rank_type_for_memory(float(value), module_shapes, rank_types)
