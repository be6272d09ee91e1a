"""Memory-lean clients: a 16-bit or 4-bit (NF4) base with float32 LoRA factors, gradient
checkpointing, and what evaluation and export do with them (docs/memory.md)."""

import json
import subprocess
import sys

import pytest
import torch

from flexlora import lora
from flexlora.client import ClientTask, autocast_dtype, train_client
from flexlora.config import ConfigError, load_config
from flexlora.data.prompts import collate, tokenize_for_training
from flexlora.data.synthetic import make_federation
from flexlora.evaluation import adapter
from flexlora.models import TINY, default_target_modules, is_checkpointing, load_model

BASE = ["model=tiny-llama", "device=cpu", "train.steps=2", "train.batch_size=2", "data.cutoff_len=512"]


def _bnb_cpu_reason() -> str | None:
    """Why the 4-bit path cannot run on this CPU (None: it can)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        return f"bitsandbytes is not installed ({e})"
    try:
        layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
        x = torch.randn(2, 64, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    except Exception as e:  # noqa: BLE001 - any failure means: no CPU backend here
        return f"bitsandbytes {bnb.__version__} has no working CPU 4-bit backend here: {type(e).__name__}: {e}"
    return None


BNB_REASON = _bnb_cpu_reason()
needs_bnb = pytest.mark.skipif(BNB_REASON is not None, reason=BNB_REASON or "")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine (CUDA paths not run)")


def _client(cfg, model, tokenizer, seed=0, factors=None):
    targets = default_target_modules(model)
    shapes = lora.module_shapes(model, targets)
    data = make_federation(num_clients=1, train_per_client=4, test_per_client=1, seed=seed).clients[0]
    task = ClientTask(data.client_id, 1, "T1", {name: 4 for name in shapes}, factors, seed)
    return data, task, targets


def _batch(tokenizer, n=2):
    data = make_federation(num_clients=1, train_per_client=n, test_per_client=1, seed=3).clients[0]
    features = [tokenize_for_training(ex, tokenizer, "alpaca", 512, False) for ex in data.train]
    return collate(features, tokenizer.pad_token_id)


def _random_factors(model, targets, rank=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(rank, n, generator=gen) * 0.05, torch.randn(m, rank, generator=gen) * 0.05)
        for name, (m, n) in lora.module_shapes(model, targets).items()
    }


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, message",
    [
        ("model_dtype=float8", "model_dtype: must be float32, bfloat16 or float16"),
        ("quantization=int8", "quantization: must be nf4 or null"),
        ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing: expected true or false"),
    ],
)
def test_bad_memory_options_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[*BASE, override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["flora", "slora"])
def test_methods_that_change_the_base_need_a_float32_unquantized_base(method):
    with pytest.raises(ConfigError, match=f"quantization: nf4 cannot be used with method={method}"):
        load_config(overrides=[*BASE, f"method={method}", "quantization=nf4", "model_dtype=bfloat16"])
    with pytest.raises(ConfigError, match=f"model_dtype: method={method} changes the base weights"):
        load_config(overrides=[*BASE, f"method={method}", "model_dtype=bfloat16"])


def test_options_parse_and_default_to_todays_client():
    cfg = load_config(overrides=BASE)
    assert (cfg.model, cfg.model_dtype, cfg.quantization, cfg.train.gradient_checkpointing) == (TINY, "float32", None, False)
    cfg = load_config(overrides=[*BASE, "model_dtype=bfloat16", "quantization=nf4", "train.gradient_checkpointing=true"])
    assert (cfg.model, cfg.model_dtype, cfg.quantization, cfg.train.gradient_checkpointing) == (TINY, "bfloat16", "nf4", True)
    assert autocast_dtype(cfg, torch.device("cpu")) is None  # no autocast on CPU
    assert autocast_dtype(cfg, torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype(load_config(overrides=BASE), torch.device("cuda")) is None  # float32: none


# ---------------------------------------------------------------- 16-bit base


def test_bfloat16_base_trains_float32_lora_and_sends_float32(monkeypatch):
    import flexlora.client as client_module

    cfg = load_config(overrides=[*BASE, "model_dtype=bfloat16"])
    model, tokenizer = load_model(TINY, "cpu", dtype="bfloat16")
    seen = {}
    real_make_optimizer = client_module.make_optimizer

    def spy(params, cfg_, lr=None):
        seen["params"] = list(params)
        seen["optimizer"] = real_make_optimizer(seen["params"], cfg_, lr)
        return seen["optimizer"]

    monkeypatch.setattr(client_module, "make_optimizer", spy)
    data, task, targets = _client(cfg, model, tokenizer)
    update = train_client(model, tokenizer, data, task, cfg, targets)

    # The frozen base is bfloat16; everything trained, optimised and sent is float32.
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert {p.dtype for p in seen["params"]} == {torch.float32}
    state = [t for s in seen["optimizer"].state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert state and {t.dtype for t in state} == {torch.float32}
    assert {t.dtype for ab in update.factors.values() for t in ab} == {torch.float32}
    assert update.metrics["base_dtype"] == "bfloat16"
    assert all(b.abs().sum() > 0 for _, b in update.factors.values())  # B (zero at init) trained
    assert update.metrics["train_loss_last"] < update.metrics["train_loss_first"] + 1.0
    assert not any("lora" in n for n, _ in model.named_parameters())  # shared model left clean


def test_bfloat16_evaluation_runs_unmerged_and_matches_peft():
    """Merging into bfloat16 weights would round a small update away: evaluation runs the
    adapter unmerged, its logits are the PEFT model's, and the base weights are untouched."""
    model, tokenizer = load_model(TINY, "cpu", dtype="bfloat16")
    targets = default_target_modules(model)
    factors = _random_factors(model, targets)
    ranks = {name: 4 for name in factors}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _batch(tokenizer)
    with torch.no_grad():
        with adapter(model, factors, ranks, 16.0, targets) as m:
            m.eval()
            assert not any(layer.merged for _, layer in lora._lora_layers(m))
            ours = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        peft_model = lora.attach(model, ranks, 16.0, 0.0, targets, factors)
        peft_model.eval()
        reference = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lora.detach(peft_model)
        bare = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, bare)  # the adapter did something
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------- gradient checkpointing


def _loss_and_grads(model, tokenizer, factors, targets):
    peft_model = lora.attach(model, {n: 4 for n in factors}, 16.0, 0.0, targets, factors)
    peft_model.train()
    calls = []
    layer = model.model.layers[1]
    hook = layer.mlp.register_forward_pre_hook(lambda mod, args: calls.append((layer.gradient_checkpointing, mod.training)))
    try:
        loss = peft_model(**_batch(tokenizer)).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        checkpointing = peft_model.base_model.model.is_activation_checkpointing
    finally:
        hook.remove()
        lora.detach(peft_model)
    return loss.item(), grads, calls, checkpointing


def test_gradient_checkpointing_is_on_in_training_and_gives_the_same_gradients():
    plain, tokenizer = load_model(TINY, "cpu")
    ckpt, _ = load_model(TINY, "cpu", gradient_checkpointing=True)
    targets = default_target_modules(plain)
    factors = _random_factors(plain, targets)
    loss0, grads0, calls0, on0 = _loss_and_grads(plain, tokenizer, factors, targets)
    loss1, grads1, calls1, on1 = _loss_and_grads(ckpt, tokenizer, factors, targets)
    assert (on0, on1) == (False, True)
    assert is_checkpointing(ckpt) and not is_checkpointing(plain)
    # Checkpointed: the layer's MLP runs twice (forward, then recomputed in backward), in train mode.
    assert calls0 == [(False, True)]
    assert calls1 == [(True, True), (True, True)]
    assert abs(loss0 - loss1) < 1e-6
    assert grads0.keys() == grads1.keys() and len(grads0) == 2 * 4 * 7
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7)
        assert grads0[name].abs().sum() > 0 or "lora_B" in name


def test_client_reports_checkpointing_during_training():
    cfg = load_config(overrides=[*BASE, "model_dtype=bfloat16", "train.gradient_checkpointing=true"])
    model, tokenizer = load_model(TINY, "cpu", dtype="bfloat16", gradient_checkpointing=True)
    data, task, targets = _client(cfg, model, tokenizer)
    update = train_client(model, tokenizer, data, task, cfg, targets)
    assert update.metrics["gradient_checkpointing"] is True
    assert {t.dtype for ab in update.factors.values() for t in ab} == {torch.float32}
    assert not model.training  # the client leaves the shared model in eval mode (no checkpointing there)


# ---------------------------------------------------------------- 4-bit (NF4) base


@needs_bnb
def test_nf4_base_is_linear4bit_and_evaluation_runs_unmerged_like_the_exported_adapter(tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    model, tokenizer = load_model(TINY, "cpu", dtype="bfloat16", quantization="nf4")
    targets = default_target_modules(model)
    for name in lora.module_shapes(model, targets):
        layer = dict(model.named_modules())[name]
        assert isinstance(layer, bnb.nn.Linear4bit), name
        assert layer.weight.quant_type == "nf4"
    factors = _random_factors(model, targets)
    ranks = {name: 4 for name in factors}
    packed = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _batch(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        with adapter(model, factors, ranks, 16.0, targets) as m:
            m.eval()
            assert not any(layer.merged for _, layer in lora._lora_layers(m))
            ours = m(**inputs).logits
        # The export stays a PEFT adapter; loaded on the 4-bit base it gives the same logits.
        folder = lora.save_adapter(model, factors, ranks, 16.0, targets, tmp_path / "adapter")
        assert (folder / "adapter_model.safetensors").is_file()
        exported = PeftModel.from_pretrained(model, str(folder))
        exported.eval()
        reference = exported(**inputs).logits
        exported.unload()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters())  # 4-bit weights untouched


@needs_bnb
def test_nf4_client_trains_float32_lora_and_training_after_evaluation_is_unchanged():
    """bitsandbytes' CPU inference kernel (repacked weights, no autograd) must not be used:
    gradients after an evaluation pass equal those before it."""
    cfg = load_config(overrides=[*BASE, "model_dtype=bfloat16", "quantization=nf4", "train.gradient_checkpointing=true"])
    model, tokenizer = load_model(TINY, "cpu", dtype="bfloat16", quantization="nf4", gradient_checkpointing=True)
    targets = default_target_modules(model)
    factors = _random_factors(model, targets)
    _, grads_before, _, on = _loss_and_grads(model, tokenizer, factors, targets)
    assert on
    with torch.no_grad(), adapter(model, factors, {n: 4 for n in factors}, 16.0, targets) as m:
        m.eval()
        m(**{k: v for k, v in _batch(tokenizer).items() if k != "labels"})
    _, grads_after, _, _ = _loss_and_grads(model, tokenizer, factors, targets)
    for name in grads_before:
        torch.testing.assert_close(grads_after[name], grads_before[name], rtol=1e-4, atol=1e-6)

    data, task, _ = _client(cfg, model, tokenizer, factors=factors)
    update = train_client(model, tokenizer, data, task, cfg, targets)
    assert {t.dtype for ab in update.factors.values() for t in ab} == {torch.float32}
    assert update.metrics["base_dtype"] == "nf4/bfloat16" and update.metrics["gradient_checkpointing"] is True
    assert any(not torch.equal(update.factors[n][1], factors[n][1]) for n in factors)  # trained


@needs_bnb
def test_nf4_bfloat16_checkpointed_run_end_to_end(tiny_overrides, tmp_path):
    from flexlora.engines import run_experiment

    cfg = load_config(
        overrides=[
            *tiny_overrides,
            "model_dtype=bfloat16",
            "quantization=nf4",
            "train.gradient_checkpointing=true",
            "federation.rounds=1",
        ]
    )
    summary = run_experiment(cfg, echo=lambda *a, **k: None)
    run_dir = tmp_path / "runs" / "test"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    clients = records[1]["clients"]
    assert clients and all(c["base_dtype"] == "nf4/bfloat16" and c["gradient_checkpointing"] for c in clients.values())
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert summary is not None


# ---------------------------------------------------------------- CUDA (run only where a GPU is lent)


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_16bit_client_autocasts_and_sends_float32(dtype):
    cfg = load_config(overrides=[*BASE, "device=cuda", f"model_dtype={dtype}", "train.gradient_checkpointing=true"])
    model, tokenizer = load_model(TINY, "cuda", dtype=dtype, gradient_checkpointing=True)
    data, task, targets = _client(cfg, model, tokenizer)
    update = train_client(model, tokenizer, data, task, cfg, targets)
    assert next(model.parameters()).device.type == "cuda"
    assert model.model.layers[0].mlp.up_proj.weight.dtype == getattr(torch, dtype)
    assert {(t.dtype, t.device.type) for ab in update.factors.values() for t in ab} == {(torch.float32, "cpu")}
    assert all(torch.isfinite(t).all() for ab in update.factors.values() for t in ab)


@needs_cuda
def test_cuda_nf4_client_and_unmerged_evaluation():
    import bitsandbytes as bnb

    cfg = load_config(overrides=[*BASE, "device=cuda", "model_dtype=bfloat16", "quantization=nf4"])
    model, tokenizer = load_model(TINY, "cuda", dtype="bfloat16", quantization="nf4")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    data, task, targets = _client(cfg, model, tokenizer)
    update = train_client(model, tokenizer, data, task, cfg, targets)
    assert {t.dtype for ab in update.factors.values() for t in ab} == {torch.float32}
    ranks = {n: 4 for n in update.factors}
    batch = {k: v.cuda() for k, v in _batch(tokenizer).items() if k != "labels"}
    with torch.no_grad():
        with adapter(model, update.factors, ranks, 16.0, targets) as m:
            m.eval()
            ours = m(**batch).logits
        peft_model = lora.attach(model, ranks, 16.0, 0.0, targets, update.factors)
        peft_model.eval()
        reference = peft_model(**batch).logits
        lora.detach(peft_model)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- the bench


def test_bench_client_prints_the_table(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flexlora.cli",
            "bench",
            "client",
            "--models",
            "tiny-llama",
            "--options",
            "float32,bfloat16+ckpt",
            "--reference",
            "float32",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--batch",
            "1",
            "--seq",
            "32",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| model | option | client | tokens/s | peak RSS (MB) |" in proc.stdout
    assert "bfloat16+ckpt peak memory <= 0.5 x float32's" in proc.stdout
    assert "float32: tokens/s within 10% of a bare PEFT loop" in proc.stdout
    rows = json.loads(out.read_text())
    assert [(r["option"], r["impl"]) for r in rows] == [("float32", "ours"), ("float32", "peft"), ("bfloat16+ckpt", "ours")]
    ours_lean = rows[2]
    assert ours_lean["base_weight_dtype"] == "torch.bfloat16" and ours_lean["gradient_checkpointing"] is True
    assert ours_lean["factor_dtypes"] == ["torch.float32"] and ours_lean["seq_tokens"] == [32]
    assert all(r["peak_rss_mb"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_bench_client_bad_option_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "flexlora.cli", "bench", "client", "--models", "tiny-llama", "--options", "int3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown option 'int3'" in proc.stderr and proc.stderr.count("\n") == 1
