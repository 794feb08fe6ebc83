"""``llmpress.generate``: load a model the way ``llmpress.load`` does and generate text from a prompt.
(The module is ``generation``: a submodule named like the verb would replace it on the package.)

The decoding loop is our own (prefill once, then one token at a time through the KV cache) rather
than transformers' ``generate``, so that prefill and decode are timed apart and each token can be
streamed the moment it is chosen. Quantized layers run their packed kernels (``quant/kernels.py``):
by default float32 activations go through them too, computing in bfloat16 (``exact=True`` keeps
float32 throughout, dequantizing each packed layer per call).

Figures reported: ``tokens_per_s`` is the decode rate (tokens after the first / decode seconds: the
first token comes out of the prefill), ``decode_cpu_s`` the CPU time it took (with one thread, the
time the process actually ran: steadier than wall time where other jobs share the cores); ``weight_bytes`` the resident bytes of parameters and buffers
(each storage once: a tied embedding counts once); ``peak_rss_bytes`` the process's peak resident
set, loading included.
"""
from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import InputError

log = logging.getLogger(__name__)

Stream = Callable[[str], None]


def _tokenizer_for(model: Any) -> Any:
    from .models import load_tokenizer, resolve

    p = Path(str(model)).expanduser()
    folder = (p if p.is_dir() else p.parent) if p.exists() else resolve(str(model)).folder
    try:
        return load_tokenizer(folder)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise InputError(f"no tokenizer found for {model} in {folder} ({type(e).__name__}: {e})") from e


def _prompt_ids(tok: Any, prompt: str, chat: bool) -> torch.Tensor:
    """(1, T) token ids of the prompt, through the chat template when asked and available."""
    if chat and getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        return enc["input_ids"]
    if chat:
        log.warning("the tokenizer has no chat template; using the prompt as it is")
    ids = tok(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise InputError("the prompt is empty after tokenization")
    return ids


def _eos_ids(tok: Any, model: torch.nn.Module) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tok):
        e = getattr(src, "eos_token_id", None)
        ids.update([e] if isinstance(e, int) else (e or []))
    return ids


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token from (vocab,) logits: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.to(torch.float32) / temperature, -1)
    if top_p < 1.0:
        p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(p, 0) - p < top_p  # the smallest prefix reaching top_p (first token always kept)
        probs = torch.zeros_like(probs).index_copy_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class _Detok:
    """Text of the generated ids so far, handed out piece by piece; holds back a trailing
    incomplete UTF-8 character (decoded as U+FFFD) until the next token completes it."""

    def __init__(self, tok: Any):
        self.tok, self.ids, self.shown = tok, [], 0

    def push(self, tid: int) -> str:
        self.ids.append(tid)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[self.shown:], len(text)
        return piece


def generate(model: str | Path, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, threads: int | None = None, chat: bool = False,
             exact: bool = False, ignore_eos: bool = False, dtype: torch.dtype = torch.float32,
             stream: Stream | None = None) -> dict[str, Any]:
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` with MODEL (an llmpress folder or
    ``.llmp``, an original model, an embedded name); ``stream`` receives the text as it comes."""
    from .loading import load
    from .pipeline import peak_rss_bytes
    from .quant import kernels

    if max_new_tokens < 1:
        raise InputError("max_new_tokens must be ≥ 1")
    if not 0.0 < top_p <= 1.0:
        raise InputError("top_p must be in (0, 1]")
    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    tok = _tokenizer_for(model)
    m = load(str(model), **({} if dtype == torch.float32 else {"dtype": dtype})).eval()
    paths = kernels.prepare(m)  # pack now, not inside the timed prefill
    kernels.set_bf16_compute(m, not exact)
    load_s = time.perf_counter() - t0
    ids = _prompt_ids(tok, prompt, chat)
    eos = set() if ignore_eos else _eos_ids(tok, m)
    gen = torch.Generator().manual_seed(int(seed))
    detok, out_ids = _Detok(tok), []
    emit = stream or (lambda s: None)
    # only the last position's logits are needed: skip the head's product for the others
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(m.forward).parameters else {}
    with torch.inference_mode():
        t1 = time.perf_counter()
        res = m(input_ids=ids, use_cache=True, **last)
        nxt = sample(res.logits[0, -1], temperature, top_p, gen)
        t2, c2 = time.perf_counter(), time.process_time()
        out_ids.append(nxt)
        emit(detok.push(nxt))
        while len(out_ids) < max_new_tokens and nxt not in eos:
            res = m(input_ids=torch.tensor([[nxt]]), cache=res.cache, use_cache=True, **last)
            nxt = sample(res.logits[0, -1], temperature, top_p, gen)
            out_ids.append(nxt)
            emit(detok.push(nxt))
        t3, c3 = time.perf_counter(), time.process_time()
    decode_tokens = len(out_ids) - 1
    return {
        "model": str(model),
        "text": tok.decode(out_ids, skip_special_tokens=True),
        "tokens": out_ids,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": len(out_ids),
        "prefill_s": t2 - t1,
        "decode_s": t3 - t2,
        "tokens_per_s": decode_tokens / (t3 - t2) if decode_tokens else float("nan"),
        "decode_cpu_s": c3 - c2,  # CPU time of the decode: steadier than wall time on a shared machine
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "weight_bytes": kernels.resident_bytes(m),
        "peak_rss_bytes": peak_rss_bytes(),
        "forwards": paths,  # QuantLinear layers by forward path: {"int4": 210} / {"dequant": …}
        "exact": exact,
    }
