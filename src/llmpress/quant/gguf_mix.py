"""llama.cpp's tensor-type mixes (Q4_K_M, Q3_K_M, Q2_K) as llmpress recipes.

``llama-quantize in.gguf out.gguf Q4_K_M`` does not store every tensor as Q4_K: its
``llama_tensor_get_type`` (``src/llama-quant.cpp``) picks a type per tensor from the tensor's
kind (attn_v, ffn_down, attn_output, …), its layer and the model's shape, then falls back to a
32-block type when the row width (the input features) is not a multiple of the type's block.
This module holds those picks as tables and turns them into a :class:`~llmpress.recipe.Recipe`
with one exact-name rule per linear, ``grid: gguf:<type>``, for the method the user chose.

Kinds (llama.cpp's categories, by GGUF tensor name): ``attn_qkv`` counts as ``attn_v`` in the
mixes below (llama.cpp tests "attn_v-like" before its own attn_qkv branch, which these mixes
never reach). Layer counters: llama.cpp numbers the attn_v-like tensors in file order
(``i_attention_wv`` of ``n_attention_wv``) and the ffn_down ones by layer (of ``n_layer``); the
GGUF export writes blocks in order, so both are the block number here.

Embeddings and head: llama.cpp gives ``output.weight`` (and a tied ``token_embd.weight``) Q6_K
(Q8_0 when its row width is not a multiple of 256) and an untied ``token_embd.weight`` the mix's
base type (with the fallback). ``llmpress quantize`` keeps both unquantized (the recipe's first
rule): :func:`mix_types` still reports llama.cpp's pick for them.

Not reproduced: mixtures of experts (refused: llama.cpp's 8-expert rules) and Falcon's rules
(no Falcon export). Reproduced: the ``LLM_TYPE_70B`` bump of attn_v to Q5_K (llama.cpp
calls 80-layer Qwen2 and 80-layer Llama with grouped KV heads 70B; applied here by that test).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InputError, UnsupportedModelError
from ..recipe import KEEP, Recipe, Rule

# --------------------------------------------------------------------------- ggml block sizes
BLOCK = {"q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256,
         "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32, "f16": 1}
# llama.cpp's tensor_type_fallback: a 256-block type whose row width it does not divide → 32-block
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


@dataclass(frozen=True)
class Site:
    """What llama.cpp's choice looks at for one tensor."""
    kind: str  # attn_v | attn_k | attn_q | attn_output | ffn_up | ffn_gate | ffn_down | output | token_embd | other
    layer: int  # the kind's counter (block number); -1 for global tensors
    n_layer: int  # the counter's total
    n_gqa: int  # attention heads / KV heads
    cols: int  # row width: input features
    is_70b: bool = False


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# Predicates a mix's table names (first matching entry wins)
WHEN: dict[str, Callable[[Site], bool]] = {
    "always": lambda s: True,
    "more_bits": lambda s: use_more_bits(s.layer, s.n_layer),
    "first_two": lambda s: s.layer < 2,
    "first_16th": lambda s: s.layer < s.n_layer // 16,
    "gqa>=4": lambda s: s.n_gqa >= 4,
}


@dataclass(frozen=True)
class Mix:
    base: str  # the type of every tensor no entry changes
    picks: dict[str, tuple[tuple[str, str], ...]]  # kind → ((when, type), ...), first match wins


MIXES: dict[str, Mix] = {
    "q4_k_m": Mix("q4_k", {
        "attn_v": (("more_bits", "q6_k"),),
        "ffn_down": (("more_bits", "q6_k"),),
    }),
    "q3_k_m": Mix("q3_k", {
        "attn_v": (("first_two", "q5_k"), ("always", "q4_k")),
        "ffn_down": (("first_16th", "q5_k"), ("always", "q4_k")),  # Falcon alone keeps Q3_K past them
        "attn_output": (("always", "q4_k"),),
    }),
    "q2_k": Mix("q2_k", {
        "attn_v": (("gqa>=4", "q4_k"), ("always", "q3_k")),
        "ffn_down": (("always", "q3_k"),),
        "attn_output": (("always", "q3_k"),),
    }),
}

# GGUF tensor name → kind (llama.cpp's tensor_get_category: exact names first, then substrings in order)
_KINDS: tuple[tuple[str, str], ...] = (
    (r"^output\.weight$", "output"), (r"^(per_layer_)?token_embd\.weight$", "token_embd"),
    (r"attn_qkv\.weight", "attn_v"), (r"attn_kv_b\.weight", "attn_v"), (r"attn_v\.weight", "attn_v"),
    (r"attn_k\.weight", "attn_k"), (r"attn_q\.weight", "attn_q"), (r"attn_output\.weight", "attn_output"),
    (r"ffn_up", "ffn_up"), (r"ffn_gate", "ffn_gate"), (r"ffn_down", "ffn_down"),
)


def kind_of(gguf_name: str) -> str:
    return next((k for pat, k in _KINDS if re.search(pat, gguf_name)), "other")


def fallback(t: str, cols: int) -> str:
    """llama.cpp's type for a row width the chosen block does not divide (F16 when none fits)."""
    if cols % BLOCK[t] == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if cols % BLOCK[t] == 0 else "f16"


def pick(mix: str, s: Site) -> str:
    """llama.cpp's type for one tensor under ``mix``."""
    m = MIXES[mix]
    if s.kind == "output":
        t = "q8_0" if s.cols % BLOCK[m.base] else "q6_k"
    else:
        t = next((ty for when, ty in m.picks.get(s.kind, ()) if WHEN[when](s)), m.base)
        if s.kind == "attn_v" and s.is_70b and t in ("q3_k", "q4_k"):
            t = "q5_k"
    return fallback(t, s.cols)


# --------------------------------------------------------------------------- a model's tensors
def _n_gqa(cfg: dict[str, Any]) -> int:
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
    kv = int(cfg.get("num_key_value_heads") or heads)
    return max(1, heads // kv)


def row_width(cfg: dict[str, Any], gguf_name: str, shape: tuple[int, ...]) -> int:
    """A stored weight's input features: GPT-2's block linears are Conv1D, stored (in, out)."""
    return int(shape[0] if cfg.get("model_type") == "gpt2" and gguf_name.startswith("blk.") else shape[1])


def mix_types(mix: str, cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, str]]:
    """``{checkpoint weight name: (GGUF name, llama.cpp's type)}`` for every 2-D weight llama.cpp
    quantizes. ``shapes``: checkpoint weight name → shape as stored ((out, in); GPT-2's Conv1D
    stores (in, out))."""
    from ..targets.gguf_arch import arch_of

    mix = mix.lower()
    if mix not in MIXES:
        raise InputError(f"unknown GGUF mix {mix!r}: choose one of {', '.join(MIXES)}")
    if int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0) > 1:
        raise UnsupportedModelError("a gguf mix does not know llama.cpp's rules for mixtures of experts")
    arch = arch_of(cfg)
    n_layer = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
    named = {}
    for name, shape in shapes.items():
        if len(shape) != 2 or not name.endswith(".weight"):
            continue
        g = arch.gguf_name(name)
        if g is not None and not re.search(r"norm|position_embd|ffn_gate_inp|rope", g):
            named[name] = g
    tied = not any(g == "output.weight" for g in named.values())
    wv = sorted((n for n, g in named.items() if kind_of(g) == "attn_v"),
                key=lambda n: int(re.search(r"blk\.(\d+)\.", named[n]).group(1)))
    is_70b = n_layer == 80 and (arch.gguf == "qwen2" or (arch.gguf == "llama" and _n_gqa(cfg) > 1))
    out: dict[str, tuple[str, str]] = {}
    for name, g in named.items():
        kind = kind_of(g)
        if kind == "token_embd" and tied:
            kind = "output"  # llama.cpp quantizes a tied embedding as the head it also is
        blk = re.search(r"blk\.(\d+)\.", g)
        if kind == "attn_v":
            layer, n = wv.index(name), len(wv)
        elif blk:
            layer, n = int(blk.group(1)), n_layer
        else:
            layer, n = -1, n_layer
        cols = row_width(cfg, g, shapes[name])
        out[name] = (g, pick(mix, Site(kind, layer, n, _n_gqa(cfg), cols, is_70b)))
    return out


def mix_recipe(mix: str, cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]], method: str = "rtn",
               keep: str = r"lm_head|embed|wte|wpe", **params: Any) -> Recipe:
    """One rule per linear (its exact module name) with ``method`` on llama.cpp's type for it;
    embeddings and head kept; a linear llama.cpp would leave F16 (no 32-block fits) kept too."""
    rules = [Rule(keep, KEEP)]
    extra = {k: v for k, v in params.items() if v is not None}
    for name, (_, t) in mix_types(mix, cfg, shapes).items():
        module = name[: -len(".weight")]
        if re.search(keep, module):
            continue
        rx = "^" + re.escape(module) + "$"
        rules.append(Rule(rx, KEEP) if t == "f16" else Rule(rx, method, {**extra, "grid": f"gguf:{t}"}))
    return Recipe(rules)


def model_shapes(model: str) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """A model's config and its stored tensor shapes, read from the safetensors headers."""
    from safetensors import safe_open

    from ..models import config, resolve, safetensors_files

    src = resolve(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in safetensors_files(src):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                shapes[k] = tuple(h.get_slice(k).get_shape())
    return config(src), shapes
