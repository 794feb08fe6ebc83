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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LLMPRESS_FSYNC", "0")  # outputs are still atomic; only a power cut could tell (test_kill_points syncs)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

DATA = Path(__file__).parent / "data"
# the tiny tokenizer's training text: a frozen copy of ARCHITECTURE.md (the project's own prose)
TOKENIZER_TEXT = DATA / "tokenizer-text.md"
TINY_VOCAB = 512
# SmolLM2's special tokens, at SmolLM2's ids (0, 1, 2)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
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


def tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A GPT-2-style byte-level BPE of ``vocab_size`` tokens, trained on TOKENIZER_TEXT: every byte
    has a token (any text encodes), SmolLM2's special tokens at its ids, no BOS/EOS added around a
    text (as SmolLM2), a chat template. Deterministic: the same text and trainer give the same merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    paragraphs = TOKENIZER_TEXT.read_text(encoding="utf-8").split("\n\n")
    tk.train_from_iterator(paragraphs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2], pad_token=SPECIALS[0], chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and the tiny tokenizer (:func:`tiny_tokenizer`), saved as an
    HF folder (safetensors, tokenizer.json, tokenizer_config.json). For tests that need *a* small
    model; those that mean SmolLM2 itself take ``smollm_dir`` (and are slow)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
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
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
