"""flexlora.Aggregator on real PEFT adapters: two clients of a tiny LLaMA at ranks 4 and 16
train with PEFT, their adapters go through the API, each client loads its result at its own
rank, and the global update equals the method's formula computed by hand."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from flexlora import Aggregator
from flexlora.api import ranks_of
from flexlora.methods import make_method
from flexlora.protocol import ClientUpdate

ALPHA = 16
RANKS = (4, 16)
SIZES = (30, 10)  # examples: p = 0.75, 0.25
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=120)
    return LlamaForCausalLM(config).eval()


def peft_client(base, rank: int, seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=TARGETS))


def trained_adapter(base, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A client's adapter after a few AdamW steps on its own random tokens (B moves off zero)."""
    model = peft_client(base, rank, seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(seed))
    for _ in range(3):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture(scope="module")
def adapters(base):
    return [trained_adapter(base, r, seed) for seed, r in enumerate(RANKS, start=1)]


def modules(state_dict) -> list[str]:
    return sorted(k[: -len(".lora_A.weight")] for k in state_dict if k.endswith(".lora_A.weight"))


def delta(state_dict, module: str) -> torch.Tensor:
    """s · B @ A of one module of an adapter, s = α / r, in float64."""
    A = state_dict[f"{module}.lora_A.weight"].double()
    B = state_dict[f"{module}.lora_B.weight"].double()
    return (ALPHA / A.shape[0]) * B @ A


def weights() -> list[float]:
    return [n / sum(SIZES) for n in SIZES]


def aggregated(method: str, adapters, **method_args) -> Aggregator:
    agg = Aggregator(method, lora_alpha=ALPHA, **method_args)
    for i, (adapter, n) in enumerate(zip(adapters, SIZES)):
        agg.add(adapter, num_examples=n, client_id=f"c{i}")
    agg.aggregate()
    return agg


def test_flexlora_clients_load_their_rank_and_the_global_update_is_the_formula(base, adapters):
    agg = aggregated("flexlora", adapters)
    p = weights()
    for module in modules(adapters[0]):
        exact = sum(pk * delta(a, module) for pk, a in zip(p, adapters))  # ΔW = Σ p_k s_k B_k A_k
        global_adapter, ranks = agg.global_adapter()
        assert ranks[module] == sum(RANKS)  # ΔW kept exactly: rank Σ r_k
        torch.testing.assert_close(delta(global_adapter, module), exact, rtol=1e-5, atol=1e-8)
        U, S, Vh = torch.linalg.svd(exact)
        for r in RANKS:  # a rank-r client's s_r B A is the best rank-r approximation of ΔW
            best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
            torch.testing.assert_close(delta(agg.client_adapter(r), module), best, rtol=1e-4, atol=1e-7)

    tokens = torch.randint(0, 120, (1, 10), generator=torch.Generator().manual_seed(9))
    for r in RANKS:
        model = peft_client(base, r)
        before = model(input_ids=tokens).logits
        mine = agg.client_adapter(r)
        assert ranks_of(mine) == dict.fromkeys(modules(adapters[0]), r)
        result = set_peft_model_state_dict(model, mine)
        assert not result.unexpected_keys
        loaded = get_peft_model_state_dict(model)
        for key, tensor in mine.items():
            assert torch.equal(loaded[key], tensor)
        assert not torch.allclose(model(input_ids=tokens).logits, before)


def test_hetlora_is_the_padded_average_of_the_scaled_factors(adapters):
    agg = aggregated("hetlora", adapters)
    p, R = weights(), max(RANKS)
    global_adapter, ranks = agg.global_adapter()
    for module in modules(adapters[0]):
        A = torch.zeros(R, adapters[0][f"{module}.lora_A.weight"].shape[1], dtype=torch.float64)
        B = torch.zeros(adapters[0][f"{module}.lora_B.weight"].shape[0], R, dtype=torch.float64)
        for pk, a, r in zip(p, adapters, RANKS):
            A[:r] += pk * a[f"{module}.lora_A.weight"].double()
            B[:, :r] += pk * (ALPHA / r) * a[f"{module}.lora_B.weight"].double()
        assert ranks[module] == R
        torch.testing.assert_close(delta(global_adapter, module), B @ A, rtol=1e-5, atol=1e-8)
        small = agg.client_adapter(4)  # the first 4 rows of A and columns of s·B, over s_4
        torch.testing.assert_close(small[f"{module}.lora_A.weight"].double(), A[:4], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(small[f"{module}.lora_B.weight"].double(), B[:, :4] / (ALPHA / 4), rtol=1e-6, atol=1e-8)


def test_fedex_global_model_is_the_exact_weighted_sum(adapters):
    agg = aggregated("fedex", adapters)
    p = weights()
    global_adapter, _ = agg.global_adapter()
    offset = agg.base_offset()
    for module in modules(adapters[0]):
        exact = sum(pk * delta(a, module) for pk, a in zip(p, adapters))
        # the adapter part is FedIT's (padded) average B̄ Ā; the residual goes into the base offset
        torch.testing.assert_close(delta(global_adapter, module) + offset[module].double(), exact, rtol=1e-5, atol=1e-7)
        assert offset[module].abs().max() > 0


@pytest.mark.parametrize("method", ["flexlora", "hetlora", "fedex", "fedit", "florist", "raflora", "flora"])
def test_streaming_equals_the_methods_own_aggregate(method, adapters, base):
    """Updates added one at a time give the bits of the method's aggregate over the round."""
    ins = adapters if method != "fedit" else [trained_adapter(base, 4, seed) for seed in (1, 2)]
    agg = Aggregator(method, lora_alpha=ALPHA)
    for i, (a, n) in enumerate(zip(ins, SIZES)):
        agg.add(a, num_examples=n, client_id=f"c{i}")
    state = agg.aggregate()
    rule = make_method(method)
    shapes = agg.shapes
    updates = [
        ClientUpdate(f"c{i}", n, ALPHA, {m: (a[f"{m}.lora_A.weight"], a[f"{m}.lora_B.weight"]) for m in shapes})
        for i, (a, n) in enumerate(zip(ins, SIZES))
    ]
    expected = rule.aggregate(updates, rule.init_state(shapes))
    assert state.keys() == expected.keys()
    for key in expected:
        assert torch.equal(state[key], expected[key]), key


def test_a_second_round_starts_from_the_first(adapters):
    agg = aggregated("flexlora", adapters)
    first = agg.client_adapter(4)
    agg.add(first, num_examples=5)  # a client that did not move: ΔW becomes its slice
    agg.aggregate()
    assert agg.round == 2
    module = modules(first)[0]
    torch.testing.assert_close(delta(agg.client_adapter(4), module), delta(first, module), rtol=1e-5, atol=1e-8)


def test_round_one_clients_share_the_initial_adapter(adapters):
    agg = Aggregator("flexlora", lora_alpha=ALPHA, template=adapters[0])
    small, large = agg.client_adapter(4), agg.client_adapter(16)
    for module in modules(adapters[0]):
        A4, A16 = small[f"{module}.lora_A.weight"], large[f"{module}.lora_A.weight"]
        assert torch.equal(A16[:4], A4)  # nested: one seeded draw per module
        assert not large[f"{module}.lora_B.weight"].any()  # B = 0: the model starts unchanged


def test_alpha_from_adapter_config(tmp_path, adapters):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 32, "r": 4}))
    agg = Aggregator("flexlora")
    agg.add(adapters[0], num_examples=3, adapter_config=tmp_path)
    assert agg.lora_alpha == 32
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 16, "use_rslora": True}))
    with pytest.raises(ValueError, match="use_rslora"):
        agg.add(adapters[1], num_examples=3, adapter_config=tmp_path)
    # PEFT's own config object, as the client's model holds it
    from_model = Aggregator("flexlora")
    from_model.add(adapters[0], num_examples=3, adapter_config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    assert from_model.lora_alpha == 8


def bad(adapter, key, value=None):
    out = dict(adapter)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing", r"client 'c1': key '.*layers\.1\.mlp\.down_proj\.lora_A\.weight' is missing"),
        ("not_factor", r"client 'c1': key 'base_model\.model\.lm_head\.weight' is not a LoRA factor"),
        ("rank", r"client 'c1': key '.*lora_A\.weight': rank 80 is outside 1\.\.64"),
        ("alpha", r"client 'c1': lora_alpha 8 differs from the federation's 16"),
        ("nan", r"client 'c1': key '.*q_proj\.lora_B\.weight' contains NaN"),
    ],
)
def test_bad_input_is_one_line_naming_the_key_and_leaves_the_round(case, pattern, adapters):
    agg = Aggregator("flexlora", lora_alpha=ALPHA)
    agg.add(adapters[0], num_examples=30, client_id="c0")
    good = adapters[1]
    a_key = [k for k in good if k.endswith("layers.1.mlp.down_proj.lora_A.weight")][0]
    q_b = [k for k in good if k.endswith("q_proj.lora_B.weight")][0]
    q_a = q_b.replace("lora_B", "lora_A")
    kwargs = {}
    if case == "missing":
        broken = bad(good, a_key)
    elif case == "not_factor":
        broken = bad(good, "base_model.model.lm_head.weight", torch.zeros(120, 64))
    elif case == "rank":
        broken = bad(bad(good, q_a, torch.zeros(80, 64)), q_b, torch.zeros(64, 80))
    elif case == "alpha":
        broken, kwargs = good, {"lora_alpha": 8}
    else:
        broken = bad(good, q_b, torch.full_like(good[q_b], float("nan")))
    with pytest.raises(ValueError, match=pattern) as info:
        agg.add(broken, num_examples=10, client_id="c1", **kwargs)
    assert "\n" not in str(info.value)
    state = agg.aggregate()  # the round holds only the good client
    only = aggregated("flexlora", adapters[:1]).state
    for key in only:
        assert torch.equal(state[key], only[key])


def test_fedit_needs_one_rank(adapters):
    agg = Aggregator("fedit", lora_alpha=ALPHA)
    agg.add(adapters[0], num_examples=3)
    with pytest.raises(ValueError, match="fedit needs every client at rank 4"):
        agg.add(adapters[1], num_examples=3)


def test_methods_whose_clients_do_not_send_an_adapter_are_refused_with_their_reason():
    with pytest.raises(ValueError, match="'slora' has clients train the base weights"):
        Aggregator("slora")
    with pytest.raises(ValueError, match="'lora_a2' has clients send the change of their chosen components, not an adapter"):
        Aggregator("lora_a2")
    with pytest.raises(ValueError, match="unknown aggregation method 'nope'"):
        Aggregator("nope")


def test_save_and_load_resume_the_next_round(tmp_path, adapters):
    agg = aggregated("flexlora", adapters, server_opt={"name": "fedadam", "lr": 0.1})
    agg.save(tmp_path / "server.safetensors")
    again = Aggregator("flexlora", lora_alpha=ALPHA, server_opt={"name": "fedadam", "lr": 0.1})
    again.load(tmp_path / "server.safetensors")
    assert again.round == 1 and again.keys == agg.keys
    for a in (agg, again):  # both run round 2 on the same update
        a.add(adapters[0], num_examples=3)
        a.aggregate()
    for key, tensor in agg.client_adapter(16).items():
        assert torch.equal(again.client_adapter(16)[key], tensor)
    with pytest.raises(ValueError, match="saved by method 'flexlora', this Aggregator runs 'hetlora'"):
        Aggregator("hetlora").load(tmp_path / "server.safetensors")


@pytest.mark.parametrize(
    "content, metadata",
    [(b"garbage", None), (b"", None), (None, None), (None, {"flexlora": '{"method": "flexlora"}'})],
    ids=["not-safetensors", "empty", "no-flexlora-metadata", "partial-metadata"],
)
def test_load_of_a_broken_file_is_one_line_and_leaves_the_aggregator(tmp_path, adapters, content, metadata):
    path = tmp_path / "server.safetensors"
    if content is None:
        save_file({"x": torch.zeros(1)}, path, metadata=metadata)
    else:
        path.write_bytes(content)
    agg = aggregated("flexlora", adapters)
    before = agg.client_adapter(16)
    with pytest.raises(ValueError, match=r"server\.safetensors: not an Aggregator file") as caught:
        agg.load(path)
    assert "\n" not in str(caught.value) and agg.round == 1
    for key, tensor in agg.client_adapter(16).items():
        assert torch.equal(before[key], tensor)


def test_a_module_missing_from_one_client(adapters):
    agg = Aggregator("flexlora", lora_alpha=ALPHA)
    agg.add(adapters[0], num_examples=3)
    module = modules(adapters[1])[-1]
    partial = {k: v for k, v in adapters[1].items() if not k.startswith(module + ".")}
    with pytest.raises(ValueError, match=rf"key '{module}\.lora_A\.weight' is missing \(the federation's adapters have it\)"):
        agg.add(partial, num_examples=3)
