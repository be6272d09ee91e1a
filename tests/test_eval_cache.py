"""The cached evaluation path (eval.kv_cache=true: one prefill per example for both scores,
each client's shared prompt prefix once) gives the results of the two-prefill path, and
returns per-example scores."""

import pytest
import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from flexlora.data.types import ClientData, Example
from flexlora.evaluation import evaluate, score_examples
from flexlora.evaluation.cached import _items, _rows, common_prefix_len
from flexlora.models import TINY, load_model

INSTR = "Answer the question about the animal in one word. Think about where it lives."


def _clients():
    return [
        ClientData(
            "a",
            "Animals 1.json",
            [],
            test=[
                Example(INSTR, f"Where does a {x} live?", y)
                for x, y in [("fish", "water"), ("bird", "nest"), ("cow", "farm"), ("ant", "hill"), ("bee", "hive")]
            ],
        ),
        ClientData("b", "Words 2.json", [], test=[Example("Reverse the word.", "abc", "cba")]),  # a single example
        # The second prompt is too long for the cutoff: generation and teacher forcing shorten it differently.
        ClientData(
            "c", "Count 3.json", [], test=[Example("Count to five.", "", "1 2 3 4 5"), Example("Spell it", "dog " * 80, "d o g")]
        ),
    ]


def _model(init: float, stop_scale: float):
    """A small random LLaMA (grouped-query attention) whose greedy outputs vary, and whose
    tokenizer decodes every id to visible text, so generations are real strings; EOS and
    newline logits scaled so that rows stop at different steps."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=384,
        initializer_range=init,
        eos_token_id=1,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    tok = ByT5Tokenizer(extra_ids=0)
    tok.add_tokens([f"<x{i}>" for i in range(125)])  # ids 259..383, not special: decoded, not skipped
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= stop_scale
        model.lm_head.weight[tok("\n", add_special_tokens=False)["input_ids"][0]] *= stop_scale
    return model, tok


def _work(clients):
    return [(c, ex) for c in clients for ex in c.test]


def _assert_same(old, new):
    assert len(old) == len(new)
    for (l1, t1, tf1, g1), (l2, t2, tf2, g2) in zip(old, new):
        assert g1 == g2  # generations identical
        assert tf1 == tf2  # teacher-forced argmax answers identical
        assert t1 == t2 > 0
        assert l2 == pytest.approx(l1, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("init, stop_scale", [(0.3, 1.0), (0.1, 2.0)])
@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_cached_path_equals_two_prefill_path(init, stop_scale, batch_size):
    model, tok = _model(init, stop_scale)
    work = _work(_clients())
    items = _items([ex for _, ex in work], tok, "alpaca", 512, 12)
    assert not items[-1].shared and all(it.shared for it in items[:-1])  # both prompt kinds are covered
    old = score_examples(model, tok, work, "alpaca", 512, 12, batch_size, kv_cache=False)
    new = score_examples(model, tok, work, "alpaca", 512, 12, batch_size, kv_cache=True)
    _assert_same(old, new)
    if stop_scale > 1:  # some rows stopped early, others ran to max_new_tokens
        lengths = {len(g) for *_, g in new}
        assert 0 in lengths and max(lengths) > 5


def test_prompts_sharing_no_prefix():
    model, tok = _model(0.3, 1.0)
    tok.chat_template = "{{ messages[0]['content'] }}"  # the prompt is the bare instruction
    clients = [ClientData("x", "X 1.json", [], test=[Example("Apples are red?", "", "yes"), Example("Bananas?", "", "yellow")])]
    work = _work(clients)
    (rows,) = _rows(_items([ex for _, ex in work], tok, "chat", 128, 8))
    assert common_prefix_len(rows) == 0
    _assert_same(
        score_examples(model, tok, work, "chat", 128, 8, 4, kv_cache=False),
        score_examples(model, tok, work, "chat", 128, 8, 4, kv_cache=True),
    )


def test_shared_prefix_covers_the_instruction():
    _, tok = _model(0.3, 1.0)
    items = _items(_clients()[0].test, tok, "alpaca", 512, 12)
    (rows,) = _rows(items)  # every generation prompt is its teacher-forcing prompt: one group
    n = common_prefix_len(rows)
    prompt = tok.decode(items[0].full[:n])
    assert prompt.endswith("### Input:\nWhere does a ") and INSTR in prompt
    # A single example: everything but its prompt's last token.
    one = _items(_clients()[1].test, tok, "alpaca", 512, 12)
    assert common_prefix_len(_rows(one)[0]) == one[0].prompt_len - 1
    # Generation prompts shortened differently from the teacher-forcing ones get their own group.
    two = _rows(_items(_clients()[2].test, tok, "alpaca", 512, 12))
    assert [len(g) for g in two] == [2, 1] and not two[1][0].score and two[1][0].generate


def test_cached_path_runs_each_shared_prompt_token_once():
    """Counts the tokens the model embeds: the two-prefill path embeds every prompt twice."""
    model, tok = _model(0.3, 1.0)
    work = _work(_clients()[:1])
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(args[0].numel()))
    try:
        score_examples(model, tok, work, "alpaca", 512, 1, 8, kv_cache=False)
        old = sum(seen)
        seen.clear()
        score_examples(model, tok, work, "alpaca", 512, 1, 8, kv_cache=True)
        new = sum(seen)
    finally:
        hook.remove()
    items = _items([ex for _, ex in work], tok, "alpaca", 512, 1)
    prompt_tokens = sum(it.prompt_len for it in items)
    assert old >= 2 * prompt_tokens
    assert new < 0.4 * prompt_tokens  # the instruction once, then only each example's rest


def test_evaluate_returns_per_example_scores_and_same_metrics_both_ways():
    model, tok = load_model(TINY, "cpu")
    clients = _clients()
    kwargs = dict(
        factors=None, ranks=None, alpha=16.0, target_modules=[], template="alpaca", cutoff_len=512, max_new_tokens=4, batch_size=3
    )
    old = evaluate(model, tok, clients, kv_cache=False, **kwargs)
    new = evaluate(model, tok, clients, **kwargs)
    rows = new["per_example"]
    assert [(r["client"], r["index"]) for r in rows] == [(c.client_id, i) for c in clients for i in range(len(c.test))]
    assert set(rows[0]) == {"client", "index", "rougeL_generated", "rougeL_teacher_forced", "loss", "tokens"}
    assert sum(r["loss"] for r in rows) / sum(r["tokens"] for r in rows) == pytest.approx(new["eval_loss"])
    assert sum(r["rougeL_generated"] for r in rows) / len(rows) == pytest.approx(new["rougeL_generated"])
    for r in rows:
        pc = new["per_client"][r["client"]]
        assert pc["n"] == len([x for x in rows if x["client"] == r["client"]])
    for key in ("rougeL_generated", "rougeL_teacher_forced", "num_examples"):
        assert new[key] == old[key]
    assert new["eval_loss"] == pytest.approx(old["eval_loss"], rel=1e-5)
    for a, b in zip(old["per_example"], new["per_example"]):
        assert (a["client"], a["index"], a["tokens"]) == (b["client"], b["index"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_bench_eval_reports_both_paths_and_their_agreement():
    from flexlora.bench.eval import run_eval_benchmark
    from flexlora.config import load_config

    cfg = load_config(
        None,
        [
            "model=tiny-llama",
            "device=cpu",
            "data.num_clients=6",
            "data.test_per_client=2",
            "data.cutoff_len=512",
            "eval.max_new_tokens=3",
        ],
    )
    lines = []
    result = run_eval_benchmark(cfg, num_clients=2, echo=lines.append)
    n = result["examples"]
    assert n == 4 and result["identical_generations"] == result["identical_teacher_forced"] == n
    assert result["max_rel_loss_diff"] < 1e-5 and result["speedup"] > 0
    assert any("eval.kv_cache=false" in line for line in lines)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_reference_draft_tokens_are_accepted_and_change_nothing(monkeypatch, batch_size):
    """When the reference answer is what the model would generate, the cached path takes the
    teacher-forced argmax as greedy output without decoding steps; results stay identical."""
    import dataclasses

    import flexlora.evaluation.cached as ev

    model, tok = _model(0.3, 1.0)
    with torch.no_grad():  # greedy picks the added <xN> tokens, whose text tokenizes back to the same ids
        model.lm_head.weight[:259] *= 0.01
    work = _work(_clients())
    greedy = score_examples(model, tok, work, "alpaca", 512, 12, batch_size, kv_cache=False)
    # References = the model's own greedy outputs (half of them cut short: a partial draft).
    work = [
        (c, dataclasses.replace(ex, output=g if k % 2 else g[: len(g) // 2] or "z"))
        for k, ((c, ex), (*_, g)) in enumerate(zip(work, greedy))
    ]
    accepted = []
    real_decode = ev._decode
    monkeypatch.setattr(
        ev, "_decode", lambda m, t, p, n: (accepted.extend(len(a) for a in p.accepted), real_decode(m, t, p, n))[1]
    )
    old = score_examples(model, tok, work, "alpaca", 512, 12, batch_size, kv_cache=False)
    new = score_examples(model, tok, work, "alpaca", 512, 12, batch_size, kv_cache=True)
    _assert_same(old, new)
    assert sum(accepted) >= 10 and max(accepted) <= 11  # drafts taken, never past max_new_tokens
