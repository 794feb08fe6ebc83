"""Shared fixtures: small in-process models for most tests, the real packaged ones for a few.

Every test that loads the real SmolLM2 (``smollm_dir``, directly or through another fixture) is
marked ``slow`` at collection, so ``make test-fast`` (``-m "not slow"``) never resolves it: the tiny
model has a tokenizer of its own, trained here.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import tinytok

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LLMPRESS_FSYNC", "0")  # outputs are still atomic; only a power cut could tell (test_kill_points syncs)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

# fixtures that resolve the real SmolLM2: a test whose fixture closure holds one is slow
REAL_MODEL_FIXTURES = {"smollm_dir"}


def pytest_collection_modifyitems(config, items) -> None:
    """Mark ``slow`` every test that needs the real SmolLM2, whichever fixture brings it in."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The real SmolLM2-135M (dequantized from the packaged GGUF once, then cached)."""
    from llmpress.models import resolve

    return resolve("smollm2-135m").path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from llmpress.models import resolve

    return resolve("minilm-l6").path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """The tests' own byte-level BPE (:mod:`tinytok`, 512 tokens) as an HF tokenizer folder."""
    return tinytok.save(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="session")
def family_tokenizer_dir(tmp_path_factory) -> Path:
    """The same tokenizer trained to the family matrix's vocabulary (``families.VOCAB``)."""
    from families import VOCAB

    return tinytok.save(tmp_path_factory.mktemp("family-tokenizer"), VOCAB)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer Llama with random weights and the tests' own tokenizer (:mod:`tinytok`), saved as an
    HF folder (safetensors, tokenizer.json, tokenizer_config.json). For tests that need *a* small
    model; those that mean SmolLM2 itself take ``smollm_dir`` (and are slow)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
