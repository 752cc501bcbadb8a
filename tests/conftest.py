"""Shared fixtures: tiny random causal LMs built offline from configs (no hub)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128, tie: bool = False):
    """A seeded random LlamaForCausalLM small enough for unit tests (fp32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def make_tiny_qwen2(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128):
    """A seeded random Qwen2ForCausalLM (has q/k/v biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
    )
    return Qwen2ForCausalLM(cfg).eval()


def save_tiny(model, path) -> str:
    """Save a tiny model as a safetensors HF directory and return its path."""
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_llama_dir(tmp_path):
    return save_tiny(make_tiny_llama(), tmp_path / "tiny-llama")


@pytest.fixture
def tiny_qwen2():
    return make_tiny_qwen2()


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (for a private Ray head in the slow tests)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
