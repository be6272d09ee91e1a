"""Rank configurations beyond the paper's four types (issue 20 part 3): ranks drawn from a
distribution, explicit per-client lists and files, per-module-kind ranks for any type; what
clients.json records; every client trains at exactly its drawn ranks."""

import json
import math
import random

import pytest

from flexlora.config import ConfigError, load_config
from flexlora.resources import (
    PROFILES,
    client_rank_types,
    client_record,
    module_ranks,
    paper_rank_types,
    parse_profile,
    profile_label,
)

IDS = [f"c{i:04d}" for i in range(2000)]
SHAPES = {
    "l.0.self_attn.q_proj": (64, 64),
    "l.0.self_attn.k_proj": (32, 64),
    "l.0.mlp.up_proj": (256, 64),
    "l.0.mlp.down_proj": (64, 256),
}


def drawn(profile, seed=0, ids=IDS):
    names, types_ = client_rank_types(ids, profile, seed, paper_rank_types())
    return [types_[names[cid]] for cid in ids]


def attention_ranks(types_):
    return [t.rank_for("q_proj") for t in types_]


def within_binomial(count: int, n: int, p: float, sds: float = 4.0) -> bool:
    """count of n draws is within `sds` binomial standard deviations of n·p."""
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


def test_log_uniform_ranks_spread_evenly_over_octaves_for_a_fixed_seed():
    profile = {"distribution": "log-uniform", "min": 4, "max": 64}
    ranks = attention_ranks(drawn(profile))
    assert min(ranks) == 4 and max(ranks) == 64  # the bounds, and both reached in 2000 draws
    # The geometric midpoint of [4, 64] is 16: half the clients below it. P(r < 16) =
    # ln(16/4) / ln(65/4) = 0.497 for integer ranks (floor of exp(U(ln 4, ln 65))); a uniform
    # draw over 4..64 would put 12/61 = 0.20 there and fail.
    p_below = math.log(16 / 4) / math.log(65 / 4)
    assert abs(p_below - 0.5) < 0.01
    below = sum(r < 16 for r in ranks)
    assert within_binomial(below, len(ranks), p_below), below
    # Each octave [4, 8), [8, 16), [16, 32) holds ln 2 / ln(65/4) = 0.248 of the clients.
    for low in (4, 8, 16):
        assert within_binomial(sum(low <= r < 2 * low for r in ranks), len(ranks), math.log(2) / math.log(65 / 4)), low
    # Every rank of the type is the same on every module kind; deterministic for the seed.
    assert all(t.rank_for("up_proj") == t.rank_for("q_proj") for t in drawn(profile)[:50])
    assert attention_ranks(drawn(profile)) == ranks
    assert attention_ranks(drawn(profile, seed=1)) != ranks


def test_a_distribution_short_name_is_the_mapping_and_its_own_label():
    """log-uniform-4-64 (what a grid's --profiles and a run folder name) draws exactly what the
    mapping does, and profile_label gives the name back, so a grid cell's name round-trips."""
    mapping = {"distribution": "log-uniform", "min": 4, "max": 64}
    assert attention_ranks(drawn("log-uniform-4-64", ids=IDS[:300])) == attention_ranks(drawn(mapping, ids=IDS[:300]))
    assert profile_label(mapping) == profile_label("log-uniform-4-64") == "log-uniform-4-64"
    assert attention_ranks(drawn("uniform-8-30", ids=IDS[:300])) == attention_ranks(
        drawn({"distribution": "uniform", "min": 8, "max": 30}, ids=IDS[:300])
    )
    with pytest.raises(ValueError, match="min 64 is above max 4"):
        parse_profile("log-uniform-64-4", paper_rank_types())
    with pytest.raises(ValueError, match="unknown profile 'log-normal-4-64'"):
        parse_profile("log-normal-4-64", paper_rank_types())
    assert load_config(None, ["resources.profile=log-uniform-8-200"]).resources.profile == "log-uniform-8-200"


def test_uniform_and_discrete_distributions_follow_their_probabilities():
    ranks = attention_ranks(drawn({"distribution": "uniform", "min": 4, "max": 64}))
    assert min(ranks) == 4 and max(ranks) == 64
    assert within_binomial(sum(r < 16 for r in ranks), len(ranks), 12 / 61)
    assert set(ranks) == set(range(4, 65))

    types_ = drawn({"distribution": "discrete", "ranks": [4, {"attention": 16, "mlp": 64}, 128], "probs": [0.5, 0.3, 0.2]})
    pairs = [(t.rank_for("q_proj"), t.rank_for("down_proj")) for t in types_]
    assert set(pairs) == {(4, 4), (16, 64), (128, 128)}
    for pair, p in {(4, 4): 0.5, (16, 64): 0.3, (128, 128): 0.2}.items():
        assert within_binomial(pairs.count(pair), len(pairs), p), pair
    assert {t.name for t in types_} == {"r4", "a16-m64", "r128"}


def test_per_kind_ranges_share_one_quantile_per_client():
    profile = {"distribution": "log-uniform", "attention": {"min": 4, "max": 16}, "mlp": {"min": 16, "max": 128}}
    types_ = drawn(profile)
    att = [t.rank_for("self_attn.o_proj") for t in types_]
    mlp = [t.rank_for("mlp.gate_proj") for t in types_]
    assert min(att) == 4 and max(att) == 16 and min(mlp) == 16 and max(mlp) == 128
    assert within_binomial(sum(r < 8 for r in att), len(att), math.log(2) / math.log(17 / 4))
    assert within_binomial(sum(r < 45 for r in mlp), len(mlp), math.log(45 / 16) / math.log(129 / 16))
    # One quantile per client: a higher attention rank never comes with a lower MLP rank.
    order = sorted(range(len(att)), key=lambda i: (att[i], mlp[i]))
    assert all(mlp[a] <= mlp[b] for a, b in zip(order, order[1:]))
    # Capped per module at min(d_out, d_in), as for the paper's types.
    big = next(t for t in types_ if t.rank_for("q_proj") > 8 and t.rank_for("up_proj") > 64)
    ranks = module_ranks(big, SHAPES)
    assert ranks["l.0.self_attn.k_proj"] == min(big.rank_for("q_proj"), 32)
    assert ranks["l.0.mlp.up_proj"] == ranks["l.0.mlp.down_proj"] == 64


def test_presets_draw_exactly_as_before():
    # The rule the paper's profiles have always used (golden runs depend on it).
    for name, probs in PROFILES.items():
        rng = random.Random("rank-types-7")
        before = {cid: rng.choices(list(probs), weights=list(probs.values()))[0] for cid in IDS[:50]}
        assert client_rank_types(IDS[:50], name, 7, paper_rank_types())[0] == before


def test_explicit_lists_take_type_names_ranks_and_per_kind_ranks():
    names, types_ = client_rank_types(["a", "b", "c"], ["T3", 64, {"attention": 16, "mlp": 48}], 0, paper_rank_types())
    assert names == {"a": "T3", "b": "r64", "c": "a16-m48"}
    assert module_ranks(types_["a16-m48"], SHAPES) == {
        "l.0.self_attn.q_proj": 16,
        "l.0.self_attn.k_proj": 16,
        "l.0.mlp.up_proj": 48,
        "l.0.mlp.down_proj": 48,
    }
    assert module_ranks(types_["r64"], SHAPES)["l.0.self_attn.k_proj"] == 32
    with pytest.raises(ValueError, match=r"^clients has 3 entries for 2 clients$"):
        client_rank_types(["a", "b"], ["T1", 4, 8], 0, paper_rank_types())


def test_custom_types_per_module_kind_drawn_by_probabilities():
    profile = {"types": {"T5": {"attention": 16, "mlp": 64}, "T1": 4}, "probs": {"T1": 0.5, "T5": 0.5}}
    names, types_ = client_rank_types(IDS, profile, 0, paper_rank_types())
    assert set(names.values()) == {"T1", "T5"}
    assert within_binomial(sum(n == "T5" for n in names.values()), len(IDS), 0.5)
    assert types_["T1"].rank_for("q_proj") == 4  # redefined
    assert (types_["T5"].rank_for("v_proj"), types_["T5"].rank_for("gate_proj")) == (16, 64)
    # A preset's probabilities over redefined types.
    names, types_ = client_rank_types(IDS[:20], {"probs": "uniform", "types": {"T2": 12}}, 3, paper_rank_types())
    assert names == client_rank_types(IDS[:20], "uniform", 3, paper_rank_types())[0] and types_["T2"].default == 12


def test_clients_files_in_json_and_yaml_by_id_or_in_order(tmp_path):
    by_id = tmp_path / "ranks.json"
    by_id.write_text(json.dumps({"b": {"attention": 8, "mlp": 32}, "a": "T4", "c": 12}))
    assert client_rank_types(["a", "b", "c"], str(by_id), 0, paper_rank_types())[0] == {"a": "T4", "b": "a8-m32", "c": "r12"}
    in_order = tmp_path / "ranks.yaml"
    in_order.write_text("- T1\n- 24\n- {attention: 4, mlp: 16}\n")
    names, _ = client_rank_types(["a", "b", "c"], {"clients": str(in_order)}, 0, paper_rank_types())
    assert names == {"a": "T1", "b": "r24", "c": "a4-m16"}
    # A YAML mapping with numeric ids (NI's client folders are numbers).
    numeric = tmp_path / "numeric.yml"
    numeric.write_text("17: T2\n3: 64\n")
    assert client_rank_types(["3", "17"], str(numeric), 0, paper_rank_types())[0] == {"3": "r64", "17": "T2"}

    with pytest.raises(ValueError, match=rf"^clients file {by_id}: unknown client id 'c' \(1 unknown in all\)$"):
        client_rank_types(["a", "b", "x"], str(by_id), 0, paper_rank_types())
    with pytest.raises(ValueError, match=rf"^clients file {by_id}: no entry for client 'd'"):
        client_rank_types(["a", "b", "c", "d"], str(by_id), 0, paper_rank_types())
    with pytest.raises(ValueError, match=rf"^clients file {in_order} has 3 entries for 4 clients$"):
        client_rank_types(["a", "b", "c", "d"], str(in_order), 0, paper_rank_types())


@pytest.mark.parametrize(
    "profile, message",
    [
        ("lopsided", "unknown profile 'lopsided'"),
        ("[T1, T9]", "clients[1]: unknown rank type 'T9'"),
        ("[T1, 0]", "clients[1]: a LoRA rank must be an integer >= 1, got 0"),
        ("[{attention: 8}]", "clients[0]: ranks by module kind need exactly the keys attention and mlp"),
        ("{distribution: log-uniform, min: 64, max: 4}", "log-uniform: min 64 is above max 4"),
        ("{distribution: log-uniform, min: 0, max: 4}", "log-uniform.min: a LoRA rank must be an integer >= 1, got 0"),
        ("{distribution: normal, min: 4, max: 64}", "distribution: unknown 'normal'"),
        ("{distribution: uniform, min: 4}", "distribution uniform: needs both min and max, max is missing"),
        ("{distribution: uniform, min: 4, max: 8, mean: 6}", "distribution uniform takes min and max"),
        ("{distribution: discrete, ranks: [4, 8], probs: [0.5, 0.6]}", "probs: must add up to 1, got 1.1"),
        ("{distribution: discrete, ranks: [4, 8], probs: [1.0]}", "probs: expected a list of 2 probabilities"),
        ("{probs: {T1: 0.5, T7: 0.5}}", "probs: unknown rank type 'T7'"),
        ("{types: {r8: 4}, probs: {r8: 1.0}}", "types.r8: names like r8 and a8-m64 are kept"),
        ("{distribution: uniform, min: 4, max: 8, clients: [T1]}", "clients: not with a distribution"),
        ("{probs: uniform, clients: [T1]}", "a profile mapping needs exactly one of"),
        ("{clients: [T1], extra: 1}", "unknown profile key 'extra' beside clients"),
        ("missing.json", "clients file missing.json not found"),
    ],
)
def test_bad_profiles_are_one_line_config_errors_naming_the_key(profile, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"resources.profile={profile}"])
    text = str(e.value)
    assert text.startswith("resources.profile: ") and message in text and "\n" not in text, text


def test_a_clients_file_that_does_not_fit_the_clients_fails_when_the_server_knows_them(tmp_path):
    from flexlora.server import FederatedServer

    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"a": 8, "zz": 16}))
    cfg = load_config(overrides=[f"resources.profile={ranks}"])  # its entries are valid
    with pytest.raises(ConfigError, match=rf"^resources.profile: clients file {ranks}: unknown client id 'zz'"):
        FederatedServer(cfg, ["a", "b"], SHAPES)


def test_clients_json_records_what_each_client_drew_and_trains_at():
    types_ = paper_rank_types()
    t3 = client_record(types_["T3"], "T3", module_ranks(types_["T3"], SHAPES))
    assert t3 == {
        "rank_type": "T3",
        "max_rank": 64,
        "drawn": {"attention": 30, "mlp": 200},
        "ranks": {"attention": 30, "mlp": 64},
    }
    t4 = client_record(types_["T4"], "T4", module_ranks(types_["T4"], SHAPES))
    assert t4["ranks"] == {"attention": [32, 64], "mlp": 64}  # k_proj is capped at 32
    assert profile_label({"distribution": "log-uniform", "min": 4, "max": 64}) == "log-uniform-4-64"
    assert profile_label("configs/ranks.yaml") == "file-ranks" and profile_label(["T1"]) == "explicit"
    assert parse_profile("heavy-tail-light", types_).probs == PROFILES["heavy-tail-light"]


def test_every_client_trains_at_exactly_its_drawn_ranks(monkeypatch):
    """As tests/test_client_ranks.py, for ranks drawn per module kind from a distribution."""
    from flexlora import lora
    from flexlora.client import train_client
    from flexlora.data.synthetic import make_federation
    from flexlora.models import TINY, default_target_modules, load_model
    from flexlora.server import FederatedServer

    profile = "{distribution: log-uniform, attention: {min: 2, max: 12}, mlp: {min: 12, max: 300}}"
    cfg = load_config(
        overrides=[
            "model=tiny-llama",
            f"resources.profile={profile}",
            "federation.clients_per_round=3",
            "train.steps=1",
            "train.batch_size=1",
            "data.cutoff_len=512",
            "seed=3",
        ]
    )
    model, tokenizer = load_model(TINY, "cpu")
    targets = default_target_modules(model)
    shapes = lora.module_shapes(model, targets)
    data = make_federation(num_clients=3, train_per_client=2, test_per_client=1, seed=0)
    ids = [c.client_id for c in data.clients]
    server = FederatedServer(cfg, ids, shapes)
    types_ = {cid: server.rank_types[server.client_types[cid]] for cid in ids}
    assert types_ == dict(zip(ids, drawn(cfg.resources.profile, seed=3, ids=ids)))
    # The seed's draws differ between clients on both kinds (else this test shows little).
    assert (
        len({t.rank_for("q_proj") for t in types_.values()}) == 3 and len({t.rank_for("up_proj") for t in types_.values()}) == 3
    )

    seen = {}
    real_get_factors = lora.get_factors

    def spy(peft_model):
        seen[current] = {name: layer.r["default"] for name, layer in lora._lora_layers(peft_model)}
        return real_get_factors(peft_model)

    monkeypatch.setattr(lora, "get_factors", spy)
    for task in server.configure(1, ids):
        current = task.client_id
        client = next(c for c in data.clients if c.client_id == current)
        update = train_client(model, tokenizer, client, task, cfg, targets)
        for name, (m, n) in shapes.items():
            want = min(types_[current].rank_for(name), m, n)
            assert seen[current][name] == want, (current, name)
            assert update.factors[name][0].shape == (want, n) and update.factors[name][1].shape == (m, want)
    assert len(seen) == 3 and all(len(s) == len(shapes) for s in seen.values())
