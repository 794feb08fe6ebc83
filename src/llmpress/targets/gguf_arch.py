"""What llama.cpp expects of each architecture: its GGUF name, hyperparameter keys, tensor names.

One :class:`Arch` per Hugging Face ``model_type``, all data: a table of tensor names (checkpoint
name → GGUF name; ``{bid}`` is the block number), the rows llama.cpp wants permuted, and the
hyperparameters written as GGUF keys. The names follow llama.cpp's converter
(``convert_hf_to_gguf.py``) and gguf-py's ``MODEL_TENSORS`` table, which the tests check every
written name against.

Llama's q/k permutation: Hugging Face checkpoints order each attention head's rotary dimensions
as two halves (x₀..x_{d/2−1} paired with x_{d/2}..), llama.cpp's ``llama`` architecture (rope mode
"normal") pairs neighbours (x₀, x₁). The converter therefore reorders the *output rows* of q_proj
and k_proj within each head: row 2i ← i, row 2i+1 ← d/2 + i. A row permutation moves whole rows,
so quantized blocks (which lie along rows) move with their parameters and stay exact.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import InputError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- tensor names
_LLAMA_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_BIASES = {  # attention_bias / mlp_bias (Llama options; Qwen2 always has q/k/v biases)
    k.replace(".weight", ".bias"): v.replace(".weight", ".bias")
    for k, v in _LLAMA_BLOCK.items() if k.startswith(("self_attn.", "mlp."))
}
_QK_NORM = {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
_LLAMA_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GPT2_BLOCK = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias",
}
_GPT2_GLOBAL = {
    "transformer.wte.weight": "token_embd.weight",
    "transformer.wpe.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight",
    "transformer.ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
_PHI3_BLOCK = {  # fused projections: qkv in one, gate and up stacked in ffn_up (llama.cpp splits them)
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# checkpoint tensors llama.cpp does not read (recomputed buffers)
_SKIP = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


# --------------------------------------------------------------------------- hyperparameters
def rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "full_attention" in rp:  # per layer type; the full-attention one
        rp = rp["full_attention"]
    if not isinstance(rp, dict):
        rp = {**(cfg.get("rope_scaling") or {})}
        if cfg.get("rope_theta") is not None:
            rp["rope_theta"] = cfg["rope_theta"]
    return rp


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _rope_scaling(rp: dict[str, Any]) -> dict[str, Any]:
    kind = (rp.get("rope_type") or rp.get("type") or "default").lower()
    if kind in ("default", "llama3"):  # llama3: rope_freqs tensor (llama3_rope_factors)
        return {}
    if kind == "linear":
        return {"add_rope_scaling_type": "linear", "add_rope_scaling_factor": float(rp["factor"])}
    if kind == "yarn":
        out = {"add_rope_scaling_type": "yarn", "add_rope_scaling_factor": float(rp["factor"])}
        if rp.get("original_max_position_embeddings"):
            out["add_rope_scaling_orig_ctx_len"] = int(rp["original_max_position_embeddings"])
        return out
    raise InputError(f"rope scaling {kind!r} is not supported by the GGUF export")


def decoder_hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    """GGUFWriter method → value, for the Llama-like decoders (llama, mistral, qwen2, qwen3)."""
    rp = rope_params(cfg)
    kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    out: dict[str, Any] = {
        "add_vocab_size": int(cfg["vocab_size"]),
        "add_block_count": int(cfg["num_hidden_layers"]),
        "add_context_length": int(cfg.get("max_position_embeddings") or 2048),
        "add_embedding_length": int(cfg["hidden_size"]),
        "add_feed_forward_length": int(cfg["intermediate_size"]),
        "add_head_count": int(cfg["num_attention_heads"]),
        "add_head_count_kv": int(kv),
        "add_rope_dimension_count": head_dim(cfg),
        "add_layer_norm_rms_eps": float(cfg.get("rms_norm_eps", 1e-6)),
    }
    if rp.get("rope_theta") is not None:
        out["add_rope_freq_base"] = float(rp["rope_theta"])
    if cfg.get("head_dim") is not None:
        out["add_key_length"] = out["add_value_length"] = int(cfg["head_dim"])
    out.update(_rope_scaling(rp))
    return out


def moe_hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    """A Llama-like decoder's, plus the experts' (count, used per token, widths where they differ)."""
    out = decoder_hparams(cfg)
    out["add_expert_count"] = int(cfg.get("num_local_experts") or cfg["num_experts"])
    out["add_expert_used_count"] = int(cfg["num_experts_per_tok"])
    if cfg.get("moe_intermediate_size"):
        out["add_expert_feed_forward_length"] = int(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):
        out["add_expert_shared_feed_forward_length"] = int(cfg["shared_expert_intermediate_size"])
    return out


def gpt2_hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "add_vocab_size": int(cfg["vocab_size"]),
        "add_block_count": int(cfg["n_layer"]),
        "add_context_length": int(cfg["n_ctx"] if "n_ctx" in cfg else cfg["n_positions"]),
        "add_embedding_length": int(cfg["n_embd"]),
        "add_feed_forward_length": int(cfg.get("n_inner") or 4 * cfg["n_embd"]),
        "add_head_count": int(cfg["n_head"]),
        "add_layer_norm_eps": float(cfg.get("layer_norm_epsilon", 1e-5)),
    }


def _phi3_rope(cfg: dict[str, Any]) -> tuple[dict[str, Any], int, int, int]:
    rp = rope_params(cfg)
    n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    dims = int(float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) * n_embd) // n_head
    ctx = int(cfg["max_position_embeddings"])
    orig = int(rp.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or ctx)
    return rp, dims, ctx, orig


def phi3_hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    """Phi-3 / Phi-4 as llama.cpp's ``phi3`` architecture; long-context models (``longrope``)
    also carry an attention factor and two tensors of rotary factors (:func:`phi3_rope_factors`)."""
    rp, dims, ctx, orig = _phi3_rope(cfg)
    out = {
        "add_vocab_size": int(cfg["vocab_size"]),
        "add_context_length": ctx,
        "add_rope_scaling_orig_ctx_len": orig,
        "add_embedding_length": int(cfg["hidden_size"]),
        "add_feed_forward_length": int(cfg["intermediate_size"]),
        "add_block_count": int(cfg["num_hidden_layers"]),
        "add_head_count": int(cfg["num_attention_heads"]),
        "add_head_count_kv": int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        "add_layer_norm_rms_eps": float(cfg.get("rms_norm_eps", 1e-5)),
        "add_rope_dimension_count": dims,
        "add_rope_freq_base": float(rp.get("rope_theta", 10000.0)),
        "add_sliding_window": int(cfg.get("sliding_window") or 0),
    }
    if rp.get("long_factor"):
        kind = (rp.get("rope_type") or rp.get("type") or "").lower()
        scale = ctx / orig
        if kind in ("su", "longrope"):
            attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        elif kind == "yarn":
            attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        else:
            raise InputError(f"phi3 rope scaling {kind!r} is not supported by the GGUF export")
        out["add_rope_scaling_attn_factors"] = attn
    return out


def phi3_rope_factors(cfg: dict[str, Any]) -> dict[str, Tensor]:
    rp, dims, _, _ = _phi3_rope(cfg)
    long, short = rp.get("long_factor"), rp.get("short_factor")
    if not long:
        return {}
    if not short or len(long) != len(short) or len(long) != dims // 2:
        raise InputError(f"phi3: rope long/short factors must both have {dims // 2} entries")
    return {"rope_factors_long.weight": torch.tensor(long, dtype=torch.float32),
            "rope_factors_short.weight": torch.tensor(short, dtype=torch.float32)}


def llama3_rope_factors(cfg: dict[str, Any]) -> Tensor | None:
    """Llama 3.1's frequency-dependent RoPE scaling as llama.cpp takes it: one factor per
    rotary frequency (``rope_freqs.weight``), 1 for short wavelengths, ``factor`` for long ones,
    interpolated between. None when the model does not use it."""
    rp = rope_params(cfg)
    if (rp.get("rope_type") or rp.get("type") or "").lower() != "llama3":
        return None
    dim, base = head_dim(cfg), float(rp.get("rope_theta", 10000.0))
    factor = float(rp.get("factor", 8.0))
    lo_f, hi_f = float(rp.get("low_freq_factor", 1.0)), float(rp.get("high_freq_factor", 4.0))
    old = float(rp.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi_f:
            out.append(1.0)
        elif wavelen > old / lo_f:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo_f) / (hi_f - lo_f)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Arch:
    gguf: str  # llama.cpp's architecture name
    block_prefix: str  # checkpoint prefix of block {bid}
    block: dict[str, str]  # suffix within a block → GGUF suffix
    globals: dict[str, str]  # checkpoint name → GGUF name
    hparams: Callable[[dict[str, Any]], dict[str, Any]]
    permute_qk: bool = False  # Llama's rotary row order (see the module docstring)
    extra: Callable[[dict[str, Any]], dict[str, Tensor]] = field(default=lambda cfg: {})
    alt_prefix: str = ""  # checkpoints saved without the base model's prefix (GPT-2's "h.0...")
    # a mixture of experts: block suffix regex (group 1: the expert) → the GGUF suffix of the
    # (E, out, in) tensor llama.cpp reads all of a layer's experts from (``ffn_*_exps``)
    stacked: dict[str, str] = field(default_factory=dict)
    # llama.cpp's builder for this architecture sizes q and o as hidden × hidden: a model whose
    # heads × head_dim differs is written as this ARCHS entry instead (one that takes head_dim)
    square_heads_else: str | None = None

    def gguf_name(self, name: str) -> str | None:
        """The GGUF name of a checkpoint tensor; None for one llama.cpp does not read."""
        if _SKIP.search(name):
            return None
        block = re.escape(self.block_prefix).replace(r"\{bid\}", r"(\d+)") + r"(.+)"
        for n in dict.fromkeys((name, self.alt_prefix + name)):
            if n in self.globals:
                return self.globals[n]
            m = re.fullmatch(block, n)
            if m and m.group(2) in self.block:
                return f"blk.{m.group(1)}.{self.block[m.group(2)]}"
            for pat, g in self.stacked.items():
                if m and re.fullmatch(pat, m.group(2)):
                    return f"blk.{m.group(1)}.{g}"
        raise InputError(f"no GGUF name for tensor {name!r} of architecture {self.gguf!r}")

    def expert_of(self, name: str) -> int | None:
        """The expert number of a checkpoint tensor that goes into a stacked GGUF tensor, or None."""
        for pat in self.stacked:
            m = re.search(r"\.(?:" + pat + r")$", name)
            if m:
                return int(m.group(1))
        return None

    def row_perm(self, gguf_name: str, cfg: dict[str, Any]) -> Tensor | None:
        """The output-row order llama.cpp wants for this tensor (rows[perm]), or None."""
        if not self.permute_qk:
            return None
        heads = int(cfg["num_attention_heads"])
        if re.search(r"\.attn_q\.(weight|bias)$", gguf_name):
            return rotary_row_perm(heads, head_dim(cfg))
        if re.search(r"\.attn_k\.(weight|bias)$", gguf_name):
            return rotary_row_perm(int(cfg.get("num_key_value_heads") or heads), head_dim(cfg))
        return None


def rotary_row_perm(n_head: int, dim: int) -> Tensor:
    """Rows of n_head heads of ``dim`` each: new row h·dim + 2i + j ← old row h·dim + j·dim/2 + i."""
    return torch.arange(n_head * dim).reshape(n_head, 2, dim // 2).transpose(1, 2).reshape(-1)


def _llama_extra(cfg: dict[str, Any]) -> dict[str, Tensor]:
    f = llama3_rope_factors(cfg)
    return {} if f is None else {"rope_freqs.weight": f}


_LLAMA = Arch("llama", "model.layers.{bid}.", {**_LLAMA_BLOCK, **_BIASES}, _LLAMA_GLOBAL, decoder_hparams,
              permute_qk=True, extra=_llama_extra)
_ROUTER = {"mlp.gate.weight": "ffn_gate_inp.weight"}
_MOE_BLOCK = {k: v for k, v in {**_LLAMA_BLOCK, **_BIASES}.items() if not k.startswith("mlp.")}  # + experts
_QWEN_SHARED = {
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
}


def _experts(gate: str, up: str, down: str) -> dict[str, str]:
    """llmpress's per-expert linears (``mlp.experts.N.<name>``, see ``llmpress.moe``) → stacked."""
    return {rf"mlp\.experts\.(\d+)\.{gate}\.weight": "ffn_gate_exps.weight",
            rf"mlp\.experts\.(\d+)\.{up}\.weight": "ffn_up_exps.weight",
            rf"mlp\.experts\.(\d+)\.{down}\.weight": "ffn_down_exps.weight"}


ARCHS: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,  # llama.cpp runs Mistral as llama (its converter does the same)
    # llama.cpp's qwen2 takes no head_dim (q, o: hidden × hidden); llama (rotary rows permuted, its
    # optional q/k/v biases) computes the same model with any head_dim
    "qwen2": Arch("qwen2", "model.layers.{bid}.", {**_LLAMA_BLOCK, **_BIASES}, _LLAMA_GLOBAL, decoder_hparams,
                  square_heads_else="llama"),
    "qwen3": Arch("qwen3", "model.layers.{bid}.", {**_LLAMA_BLOCK, **_BIASES, **_QK_NORM}, _LLAMA_GLOBAL,
                  decoder_hparams),
    "phi3": Arch("phi3", "model.layers.{bid}.", _PHI3_BLOCK, _LLAMA_GLOBAL, phi3_hparams, extra=phi3_rope_factors),
    # llama.cpp runs Mixtral as llama with experts (its converter does the same)
    "mixtral": Arch("llama", "model.layers.{bid}.", {**_MOE_BLOCK, **_ROUTER}, _LLAMA_GLOBAL, moe_hparams,
                    permute_qk=True, stacked=_experts("w1", "w3", "w2")),
    "qwen2_moe": Arch("qwen2moe", "model.layers.{bid}.", {**_MOE_BLOCK, **_ROUTER, **_QWEN_SHARED},
                      _LLAMA_GLOBAL, moe_hparams, stacked=_experts("gate_proj", "up_proj", "down_proj")),
    "gpt2": Arch("gpt2", "transformer.h.{bid}.", _GPT2_BLOCK, _GPT2_GLOBAL, gpt2_hparams, alt_prefix="transformer."),
}


def sliding_window(cfg: dict[str, Any]) -> int | None:
    """The attention window the model uses within its context, or None (full attention). llama.cpp's
    builders for the architectures of this table attend to the whole context (its ``llama`` has no
    window, as its converter writes Mistral; its ``phi3`` turns Phi-3's off): past ``window`` tokens
    llama.cpp's outputs differ from the model's. Qwen2/3 use one only with ``use_sliding_window``."""
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return None
    ctx = int(cfg.get("max_position_embeddings") or 0)
    return int(window) if not ctx or int(window) < ctx else None


def arch_of(cfg: dict[str, Any]) -> Arch:
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise InputError(f"unsupported architecture: {mt} (the GGUF export knows {', '.join(sorted(ARCHS))})")
    arch = ARCHS[mt]
    heads = int(cfg.get("num_attention_heads") or 0)
    if arch.square_heads_else and heads and heads * head_dim(cfg) != int(cfg["hidden_size"]):
        log.info("gguf: %s with %d heads × head_dim %d ≠ hidden %d: written as llama.cpp's %r (its %r assumes "
                 "hidden / heads)", mt, heads, head_dim(cfg), cfg["hidden_size"],
                 ARCHS[arch.square_heads_else].gguf, arch.gguf)
        return ARCHS[arch.square_heads_else]
    return arch
