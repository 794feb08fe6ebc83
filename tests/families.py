"""The architecture matrix: real Hugging Face configs of representative checkpoints, shrunk.

Each entry holds the ``config.json`` values of one hub checkpoint as published (written here,
nothing is downloaded) and a shrink rule: the sizes that make it tiny (2 layers, hidden 64–128,
sliding windows shorter than the test windows so they act). Every structural trait stays: GQA
ratio, explicit head_dim, biases, tied heads, RoPE scaling, norm offsets, soft-capping, layer
types, fused projections, Conv1D, learned positions. ``build`` writes a real HF folder: the
config, a seeded random ``from_config`` init in model.safetensors, and a byte-level BPE of ``VOCAB``
tokens (the tests' own, :mod:`tinytok`, as conftest's ``family_tokenizer_dir`` saves it; a larger
one is cut to its first ``VOCAB`` tokens and the merges among them), the vocabulary and
special-token ids sized to it: a real BPE that loads in milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Family:
    hub: str                       # the checkpoint whose config.json this is
    config: dict[str, Any]         # its config.json (the values that shape the model)
    shrink: dict[str, Any]         # overrides that make it tiny, traits kept
    awq_folded: tuple[str, ...] = field(default=())  # block linears whose AWQ scale must fold (no in_scale)
    gguf: bool = True              # llama.cpp has the architecture (the GGUF export table knows it)
    ct: bool = True                # compressed-tensors holds its linears (nn.Linear, not Conv1D)


_LLAMA_FOLDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

FAMILIES: dict[str, Family] = {
    "llama3": Family(
        "meta-llama/Llama-3.2-1B",
        dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, attention_dropout=0.0,
             bos_token_id=128000, eos_token_id=128001, head_dim=64, hidden_act="silu", hidden_size=2048,
             initializer_range=0.02, intermediate_size=8192, max_position_embeddings=131072, mlp_bias=False,
             num_attention_heads=32, num_hidden_layers=16, num_key_value_heads=8, pretraining_tp=1,
             rms_norm_eps=1e-05, rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                                   original_max_position_embeddings=8192, rope_type="llama3"),
             rope_theta=500000.0, tie_word_embeddings=True, torch_dtype="bfloat16", use_cache=True,
             vocab_size=128256),
        dict(hidden_size=64, head_dim=16, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1),
        awq_folded=_LLAMA_FOLDS,
    ),
    "qwen2.5": Family(
        "Qwen/Qwen2.5-0.5B",
        dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_dropout=0.0, bos_token_id=151643,
             eos_token_id=151643, hidden_act="silu", hidden_size=896, initializer_range=0.02,
             intermediate_size=4864, max_position_embeddings=32768, max_window_layers=24, num_attention_heads=14,
             num_hidden_layers=24, num_key_value_heads=2, rms_norm_eps=1e-06, rope_theta=1000000.0,
             sliding_window=32768, tie_word_embeddings=True, torch_dtype="bfloat16", use_cache=True,
             use_sliding_window=False, vocab_size=151936),
        # 7 query heads per kv head, as the original; head_dim 32 (given, 7 × 32 ≠ 64) keeps every width a
        # multiple of 32 (GGUF blocks)
        dict(hidden_size=64, head_dim=32, intermediate_size=256, num_hidden_layers=2, num_attention_heads=7,
             num_key_value_heads=1, max_window_layers=2),
        awq_folded=_LLAMA_FOLDS,
    ),
    "mistral": Family(
        "mistralai/Mistral-7B-v0.1",
        dict(architectures=["MistralForCausalLM"], model_type="mistral", bos_token_id=1, eos_token_id=2,
             hidden_act="silu", hidden_size=4096, initializer_range=0.02, intermediate_size=14336,
             max_position_embeddings=32768, num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8,
             rms_norm_eps=1e-05, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
             torch_dtype="bfloat16", use_cache=True, vocab_size=32000),
        dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, sliding_window=16),
        awq_folded=_LLAMA_FOLDS,
    ),
    "qwen3": Family(
        "Qwen/Qwen3-0.6B",
        dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False, attention_dropout=0.0,
             bos_token_id=151643, eos_token_id=151645, head_dim=128, hidden_act="silu", hidden_size=1024,
             initializer_range=0.02, intermediate_size=3072, max_position_embeddings=40960, max_window_layers=28,
             num_attention_heads=16, num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-06,
             rope_scaling=None, rope_theta=1000000, sliding_window=None, tie_word_embeddings=True,
             torch_dtype="bfloat16", use_cache=True, use_sliding_window=False, vocab_size=151936),
        # head_dim 32 ≠ hidden / heads = 16, as 128 ≠ 64 in the original
        dict(hidden_size=64, head_dim=32, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_window_layers=2),
        awq_folded=_LLAMA_FOLDS,
    ),
    "phi3": Family(
        "microsoft/Phi-3-mini-4k-instruct",
        dict(architectures=["Phi3ForCausalLM"], model_type="phi3", attention_bias=False, attention_dropout=0.0,
             bos_token_id=1, embd_pdrop=0.0, eos_token_id=32000, hidden_act="silu", hidden_size=3072,
             initializer_range=0.02, intermediate_size=8192, max_position_embeddings=4096,
             num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=32,
             original_max_position_embeddings=4096, pad_token_id=32000, resid_pdrop=0.0, rms_norm_eps=1e-05,
             rope_scaling=None, rope_theta=10000.0, sliding_window=2047, tie_word_embeddings=False,
             torch_dtype="bfloat16", use_cache=True, vocab_size=32064),
        dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, sliding_window=16),
        awq_folded=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    ),
    "gpt2": Family(
        "openai-community/gpt2",
        dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", activation_function="gelu_new", attn_pdrop=0.1,
             bos_token_id=50256, embd_pdrop=0.1, eos_token_id=50256, initializer_range=0.02,
             layer_norm_epsilon=1e-05, n_ctx=1024, n_embd=768, n_head=12, n_layer=12, n_positions=1024,
             resid_pdrop=0.1, summary_activation=None, summary_first_dropout=0.1, summary_proj_to_labels=True,
             summary_type="cls_index", summary_use_proj=True, vocab_size=50257),
        dict(n_embd=64, n_head=4, n_layer=2, n_positions=128, n_ctx=128),
        awq_folded=("attn.c_attn", "mlp.c_fc"),
        ct=False,
    ),
    "opt": Family(
        "facebook/opt-125m",
        dict(architectures=["OPTForCausalLM"], model_type="opt", _remove_final_layer_norm=False,
             activation_dropout=0.0, activation_function="relu", attention_dropout=0.0, bos_token_id=2,
             do_layer_norm_before=True, dropout=0.1, enable_bias=True, eos_token_id=2, ffn_dim=3072,
             hidden_size=768, init_std=0.02, layer_norm_elementwise_affine=True, layerdrop=0.0,
             max_position_embeddings=2048, num_attention_heads=12, num_hidden_layers=12, pad_token_id=1,
             prefix="</s>", torch_dtype="float16", use_cache=True, vocab_size=50272, word_embed_proj_dim=768),
        dict(hidden_size=64, ffn_dim=256, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=128,
             word_embed_proj_dim=64),
        awq_folded=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
        gguf=False,
    ),
    "gemma2": Family(
        "google/gemma-2-2b",
        dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", attention_bias=False, attention_dropout=0.0,
             attn_logit_softcapping=50.0, bos_token_id=2, cache_implementation="hybrid", eos_token_id=1,
             final_logit_softcapping=30.0, head_dim=256, hidden_act="gelu_pytorch_tanh",
             hidden_activation="gelu_pytorch_tanh", hidden_size=2304, initializer_range=0.02,
             intermediate_size=9216, max_position_embeddings=8192, num_attention_heads=8, num_hidden_layers=26,
             num_key_value_heads=4, pad_token_id=0, query_pre_attn_scalar=256, rms_norm_eps=1e-06,
             rope_theta=10000.0, sliding_window=4096, torch_dtype="float32", use_cache=True, vocab_size=256000),
        # head_dim 32 with 4 heads ≠ hidden 64, as 8 × 256 ≠ 2304; one sliding and one global layer
        dict(hidden_size=64, head_dim=32, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, query_pre_attn_scalar=32, sliding_window=16),
        awq_folded=_LLAMA_FOLDS,
        gguf=False,
    ),
    "gemma3": Family(
        "google/gemma-3-1b-pt",
        dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", attention_bias=False,
             attention_dropout=0.0, attn_logit_softcapping=None, bos_token_id=2, cache_implementation="hybrid",
             eos_token_id=1, final_logit_softcapping=None, head_dim=256, hidden_activation="gelu_pytorch_tanh",
             hidden_size=1152, initializer_range=0.02, intermediate_size=6912, max_position_embeddings=32768,
             num_attention_heads=4, num_hidden_layers=26, num_key_value_heads=1, pad_token_id=0,
             query_pre_attn_scalar=256, rms_norm_eps=1e-06, rope_local_base_freq=10000, rope_scaling=None,
             rope_theta=1000000, sliding_window=512, sliding_window_pattern=6, torch_dtype="bfloat16",
             use_cache=True, vocab_size=262144),
        # the 5:1 local/global pattern shrunk to one of each (local and global RoPE both run)
        dict(hidden_size=64, head_dim=32, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, query_pre_attn_scalar=32, sliding_window=16, sliding_window_pattern=2,
             layer_types=["sliding_attention", "full_attention"]),
        awq_folded=_LLAMA_FOLDS,
        gguf=False,
    ),
}


VOCAB = 2048


def small_tokenizer(tokenizer_dir: Path, out: Path, vocab: int = VOCAB) -> Path:
    """The byte-level BPE in ``tokenizer_dir`` with the tokens of id < ``vocab`` and the merges among them, saved to ``out``."""
    import json
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and f.is_file():
            shutil.copy(f, out / f.name)
    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    model = tj["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < vocab}
    merges = [m if isinstance(m, list) else m.split(" ") for m in model["merges"]]
    model["merges"] = [m for m in merges if m[0] in model["vocab"] and m[1] in model["vocab"]
                       and m[0] + m[1] in model["vocab"]]
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    for name in ("vocab.json", "merges.txt"):  # the slow tokenizer's copies, if any: not needed
        (out / name).unlink(missing_ok=True)
    return out


def shrunk_config(name: str, vocab_size: int, bos: int, eos: int, pad: int | None):
    """The family's transformers config, shrunk, with the tokenizer's vocabulary and ids."""
    from transformers import AutoConfig

    fam = FAMILIES[name]
    values = {**fam.config, **fam.shrink, "vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos}
    if "pad_token_id" in values:
        values["pad_token_id"] = pad
    values.pop("torch_dtype", None)  # written float32: the tests compare logits in float32
    mt = values.pop("model_type")
    return AutoConfig.for_model(mt, **values)


def build(name: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write the shrunk ``name`` model as an HF folder (config, seeded random weights, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_tokenizer(tokenizer_dir, out)))
    assert len(tok) == VOCAB
    ids = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    cfg = shrunk_config(name, len(tok), ids["bos"], ids["eos"], ids["pad"] if ids["pad"] is not None else ids["eos"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at their identity; give them spread so folds are tested
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in n or "ln_" in n or "layer_norm" in n):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return out
