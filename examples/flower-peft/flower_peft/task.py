"""flower-peft: the model, the data and the local training, shared by the ServerApp and the
ClientApp. Nothing here knows flexlora: it is plain PyTorch, transformers and PEFT.

By default the model is a tiny random LLaMA (the same weights on every machine, from a fixed
seed) fed UTF-8 bytes as tokens, so the app runs offline in seconds; run config `model-path`
names a real Hugging Face causal LM (a local folder or a hub id) and its tokenizer."""

from __future__ import annotations

import random

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

TINY_LLAMA = LlamaConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=96,
    vocab_size=256,
    max_position_embeddings=256,
)


def get_model(cfg: dict, rank: int):
    """The base model with a LoRA adapter of this rank on run config `target-modules`."""
    if cfg["model-path"]:
        base = AutoModelForCausalLM.from_pretrained(cfg["model-path"])
    else:
        with torch.random.fork_rng():  # the same random base on every node and on the server
            torch.manual_seed(0)
            base = LlamaForCausalLM(TINY_LLAMA)
    lora = LoraConfig(
        r=rank,
        lora_alpha=cfg["lora-alpha"],
        lora_dropout=0.0,
        target_modules=cfg["target-modules"].split(","),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def add_base_offset(model, offset: dict[str, torch.Tensor]) -> None:
    """Add {module: tensor} to each LoRA module's base weight (FedEx-LoRA's and FLoRIST's global
    model is base + offset + adapter). The offset is the sum over all rounds so far, so it goes
    onto freshly loaded base weights, as get_model gives."""
    with torch.no_grad():
        for module, delta in offset.items():
            weight = model.get_submodule(module).get_base_layer().weight
            weight += delta.to(weight.dtype)


def load_data(partition_id: int, cfg: dict) -> list[str]:
    """This node's training texts: a small string task of its own (reverse or upper-case words),
    `examples-per-node` x (partition id + 1) examples, so that nodes weigh differently."""
    rng = random.Random(partition_id)
    task = ("Reverse", lambda w: w[::-1]) if partition_id % 2 == 0 else ("Upper-case", str.upper)
    texts = []
    for _ in range(cfg["examples-per-node"] * (partition_id + 1)):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 6)))
        texts.append(f"{task[0]}: {word}\nAnswer: {task[1](word)}")
    return texts


def tokenize(texts: list[str], cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of a batch, right-padded, at most `seq-length` tokens."""
    length = cfg["seq-length"]
    if cfg["model-path"]:
        tokenizer = AutoTokenizer.from_pretrained(cfg["model-path"])
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=length)
        return batch["input_ids"], batch["attention_mask"]
    rows = [list(text.encode())[:length] for text in texts]
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return ids, mask


def train(model, texts: list[str], cfg: dict, seed: int) -> float:
    """`train-steps` AdamW steps of next-token loss on batches of `batch-size`; the last loss."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["learning-rate"])
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(cfg["train-steps"]):
        ids, mask = tokenize(rng.sample(texts, min(cfg["batch-size"], len(texts))), cfg)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss.detach())
