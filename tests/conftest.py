"""Shared fixtures: tiny random Llama / Qwen2 / Mistral models and the real embedded model.

The tiny models borrow the embedded model's tokenizer (and its chat template), so every engine
path (templates, roles, multi-turn) runs on them exactly as on a real model.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_tiny(arch: str, tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from engine.model import LoadedModel, ModelIdentity

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  tie_word_embeddings=True, attn_implementation="sdpa")
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**common)).eval()
    model.requires_grad_(False)
    ident = ModelIdentity(name=f"tiny-{arch}", source="random", weights_hash=f"random-{seed}", dtype="float32",
                          quantization=None, device="cpu", n_layers=4, architecture=cls[1].__name__)
    return LoadedModel(model, tokenizer, ident, 0.0)


@pytest.fixture(scope="session")
def embedded():
    from engine.model import load_model

    return load_model(verbose=False)


@pytest.fixture(scope="session")
def tokenizer(embedded):
    return embedded.tokenizer


@pytest.fixture(scope="session", params=["llama", "qwen2", "mistral"])
def tiny(request, tokenizer):
    return make_tiny(request.param, tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return make_tiny("llama", tokenizer)
