"""The tokenizer as llama.cpp reads it from GGUF metadata.

llama.cpp tokenizes by itself, so the GGUF carries the whole vocabulary: every token string by
id, its type (normal, control for special tokens, user-defined for other added tokens, unused
for ids the tokenizer never produces), the BPE merges, the special token ids, whether a BOS/EOS
is added, the chat template, and the *pre-tokenizer*: the regex split applied before BPE, which
llama.cpp implements per model family and selects by name (``tokenizer.ggml.pre``).

The pre-tokenizer is recognised as llama.cpp's converter does: encode a fixed text exercising
whitespace runs, digits, emoji, scripts and contractions, hash the token ids, look the hash up.
Only the hashes of the families the export supports are listed. A vocabulary whose hash is not
listed (one its user trained) is recognised by its split instead where ``tokenizer.json`` declares
one llama.cpp implements whatever the tokens (:data:`PRE_TOKENIZER_SPLITS`: a plain byte-level
pre-tokenizer with GPT-2's regex and no normalizer is llama.cpp's ``gpt-2``); anything else is
written as ``default`` with a warning (llama.cpp then splits like GPT-2, close but not identical).

Byte-level BPE tokenizers (``tokenizer.json`` with a BPE model: GPT-2, Llama 3, SmolLM, Qwen)
become ``tokenizer.ggml.model = gpt2``; SentencePiece-style ones (byte fallback, ``▁`` spaces:
Llama 2, Mistral) become ``llama`` through gguf-py's ``LlamaHfVocab`` reader.
"""
from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from ..errors import InputError

log = logging.getLogger(__name__)

# the text llama.cpp's converter hashes (convert_hf_to_gguf.py, get_vocab_base_pre)
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256 of str(token ids of CHECK_TEXT) → llama.cpp's pre-tokenizer name
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}


def _split_key(normalizer: Any, pre_tokenizer: Any) -> str:
    """tokenizer.json's normalizer and pre-tokenizer as one key; ``trim_offsets`` (offsets, not ids) left out."""
    pre = {k: v for k, v in pre_tokenizer.items() if k != "trim_offsets"} if isinstance(pre_tokenizer, dict) else pre_tokenizer
    return json.dumps([normalizer, pre], sort_keys=True)


# tokenizer.json's (normalizer, pre_tokenizer) → llama.cpp's pre-tokenizer name, for a vocabulary
# whose CHECK_TEXT hash is not in PRE_TOKENIZERS: llama.cpp's split is a regex of its own, the same
# whatever the vocabulary (gpt-2: the regex ByteLevel applies with use_regex, llama-vocab.cpp's GPT2)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    _split_key(None, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}): "gpt-2",
}

# llama.cpp's vocabulary loader sets token attributes by *model name* (``general.name``, lower-cased):
# a name containing one of these words → the tokens it looks up (``token_to_id.at``: one missing
# and the model does not load, "unordered_map::at"). llama-vocab.cpp, llama_vocab::impl::load.
NAME_TOKENS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("phi-3", "phi3"): ("</s>", "<unk>", "<s>", "<|endoftext|>"),
}


def _looks_special(tok: str) -> bool:
    return (tok.startswith("<|") and tok.endswith("|>")) or tok in ("<pad>", "<mask>", "<s>", "</s>", "<unk>")


def _is_sentencepiece_bpe(folder: Path) -> bool:
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _bpe_vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int], str, Any]:
    """Tokens, types and pre-tokenizer name of a byte-level BPE tokenizer (transformers reads it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    vocab: dict[str, int] = tok.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise InputError(f"{folder}: tokenizer ids reach {max(vocab.values())}, beyond vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            special = decoder[i].special or _looks_special(t)
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    h = sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(h)
    if pre is None:
        tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        pre = PRE_TOKENIZER_SPLITS.get(_split_key(tj.get("normalizer"), tj.get("pre_tokenizer")))
    if pre is None:
        log.warning("%s: pre-tokenizer not recognised (hash %s); writing 'default'", folder, h[:16])
        pre = "default"
    return tokens, types, pre, tok


def _adds(tok: Any) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS around a text (what llama.cpp should do)."""
    plain = tok.encode("a", add_special_tokens=False)
    full = tok.encode("a", add_special_tokens=True)
    bos = tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id
    eos = tok.eos_token_id is not None and len(full) > len(plain) and full[-1] == tok.eos_token_id
    return bos, eos


def model_name(name: str, tokens: list[str]) -> str | None:
    """``name`` as ``general.name``, or None (not written) where llama.cpp would look up tokens by
    that name that this vocabulary does not have (:data:`NAME_TOKENS`; a Phi-3 with another tokenizer)."""
    have = set(tokens)
    for words, needed in NAME_TOKENS.items():
        missing = [t for t in needed if t not in have]
        if missing and any(word in name.lower() for word in words):
            log.warning("gguf: general.name %r not written: llama.cpp looks up %s in a model so named and "
                        "this vocabulary lacks %s (the model would not load)", name, ", ".join(needed),
                        ", ".join(missing))
            return None
    return name


def add_tokenizer(w: gguf.GGUFWriter, folder: Path, cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """Write the tokenizer keys of the model in ``folder`` and its ``general.name`` (:func:`model_name`);
    returns a summary for the report."""
    vocab_size = int(cfg.get("vocab_size") or 0)
    if not (folder / "tokenizer.json").is_file():
        raise InputError(f"{folder}: no tokenizer.json; llama.cpp needs the vocabulary (a SentencePiece "
                         f"tokenizer.model alone is not read by the GGUF export)")
    if _is_sentencepiece_bpe(folder):
        hf = gguf.vocab.LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, ttype in hf.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        model, pre = "llama", "default"
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    else:
        tokens, types, pre, tok = _bpe_vocab(folder, vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        model = "gpt2"
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
        bos, eos = _adds(tok)
        special.add_special_token.setdefault("bos", bos)
        if eos:
            special.add_special_token.setdefault("eos", eos)
    tc = folder / "tokenizer_config.json"
    prefix = json.loads(tc.read_text(encoding="utf-8")).get("add_prefix_space") if tc.is_file() else None
    if prefix is not None:
        w.add_add_space_prefix(bool(prefix))
    special.add_to_gguf(w, quiet=True)
    if (written := model_name(name, tokens)) is not None:
        w.add_name(written)
    return {"tokenizer": model, "pre_tokenizer": pre, "vocab": len(tokens), "merges": len(special.merges)}
