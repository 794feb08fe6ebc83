"""``evaluate``: the judge every lossy result in llmpress reports with.

For a causal LM: perplexity on real text, and against the original (the reference) the KL
divergence of next-token distributions, top-1 agreement and ln(PPL ratio) with its standard
error. For an encoder: cosine similarity of sentence embeddings to the original's. Beside
them the cost: bits per weight, bytes on disk, peak RAM and tokens/s, each next to the
reference's. The protocol (windows, scored tokens, tokenizer, texts with their sha256) is part
of every result. The pieces live in :mod:`llmpress.eval`.
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .causal import TOPK, Reference, perplexity
from .cost import cost_of, fingerprint_module, fingerprint_path, manifest
from .encoder import embed, embedding_fidelity
from .windows import sentences as eval_sentences
from .windows import tokenizer_sha256
from ..text import EVAL_DEFAULTS

log = logging.getLogger(__name__)

__all__ = ["evaluate", "Reference", "perplexity"]


@dataclass
class _Model:
    """A model argument, resolved but loaded only when needed."""

    arg: Any
    name: str
    path: Path | None  # folder or file holding the weights, None for an in-memory module
    tokenizer: Any
    _module: torch.nn.Module | None = None
    device: torch.device | None = None  # where the model runs (None: where it is; a loaded one: the CPU)
    decode_once: bool = False  # quantized layers decoded once at load (quant.linear.decode_once)

    def module(self) -> torch.nn.Module:
        if self._module is None:
            from ..loading import load

            log.info("loading %s", self.name)
            if self.decode_once:
                from ..quant.kernels import unpacked
                from ..quant.linear import decode_once

                with unpacked():
                    self._module = load(self.arg).eval()
                decode_once(self._module)
            else:
                self._module = load(self.arg).eval()
        if self.device is not None:
            self._module.to(self.device)  # in place; a no-op once it is there
        return self._module

    def reference_model(self) -> torch.nn.Module:
        """The model a reference is built from: an original checkpoint is walked block by block
        (``streamed.StreamedOriginal``: its float32 whole never sits in memory), anything else loaded."""
        from .streamed import StreamedOriginal, streamable

        if self._module is None and not isinstance(self.arg, torch.nn.Module) and streamable(self.path):
            log.info("reference %s: streamed block by block", self.name)
            return StreamedOriginal(self.path, self.device)
        return self.module()

    def release(self) -> None:
        if not isinstance(self.arg, torch.nn.Module):
            self._module = None
            gc.collect()

    def fingerprint(self) -> str:
        return fingerprint_path(self.path) if self.path is not None else fingerprint_module(self.module())

    def config(self) -> dict:
        if self._module is not None or self.path is None:
            return self.module().config.to_dict()
        import json

        cfg = (self.path if self.path.is_dir() else self.path.parent) / "config.json"
        return json.loads(cfg.read_text()) if cfg.exists() else self.module().config.to_dict()

    def is_causal(self) -> bool:
        if self._module is not None:
            return type(self._module).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in self.config().get("architectures") or [])


def _resolve(x: Any, tokenizer: Any, what: str) -> _Model:
    from ..models import load_tokenizer, resolve

    if isinstance(x, torch.nn.Module):
        x.eval()
        if tokenizer is None:
            src = getattr(getattr(x, "config", None), "_name_or_path", "")
            if not src or not Path(src).is_dir():
                raise InputError(f"the {what} is an in-memory model: pass its tokenizer (tokenizer=/ref_tokenizer=)")
            tokenizer = load_tokenizer(src)
        return _Model(x, type(x).__name__, None, tokenizer, x)
    p = Path(str(x)).expanduser()
    path = p if p.exists() else resolve(x).path
    folder = path if path.is_dir() else path.parent
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(folder)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
            raise InputError(f"no tokenizer found for the {what} {x} in {folder} ({type(e).__name__}: {e})") from e
    return _Model(x, str(x), path, tokenizer)


def _default_reference(m: _Model) -> str | None:
    """An llmpress folder names its source model in ``llmpress.json``; use it when it resolves."""
    src = (manifest(m.path) or {}).get("source") if m.path is not None else None
    if not src:
        return None
    try:
        from ..models import resolve

        resolve(src)
        return src
    except Exception:  # noqa: BLE001
        log.warning("%s names its source %r, which is not available: no reference", m.name, src)
        return None


def evaluate(model: Any, reference: Any = None, text: Any = None, *, ctx: int = 512, tokens: int = 16384,
             tokenizer: Any = None, ref_tokenizer: Any = None, batch_size: int | None = None, sentences: int = 256,
             k: int = TOPK, cache: bool = True, device: str | torch.device | None = None,
             decode_once: bool = False) -> dict[str, Any]:
    """Evaluate ``model`` (a path, a model name or a loaded ``nn.Module``), against ``reference``
    (the same kinds; by default the source an llmpress folder names) on ``text`` (a corpus
    name, a file, ``hf:NAME``, a ``(name, content)`` pair, or a list of those; by default
    :data:`llmpress.text.EVAL_DEFAULTS`, tokens split evenly among them).

    Returns a dict with the DESIGN keys: ``ppl``, ``ref_ppl``, ``kl_mean``, ``kl_median``,
    ``kl_p99``, ``kl_max``, ``top1``, ``ln_ppl_ratio`` (+ ``_se``), ``bpw``, ``ref_bpw``,
    ``bytes_in`` (the reference's bytes), ``bytes_out`` (the model's), ``ratio``, ``seconds``,
    ``peak_rss_bytes``, ``tokens_per_s`` (and ``ref_`` twins), ``protocol``; for an encoder
    ``cos_mean``/``cos_min`` instead of the next-token keys.

    ``device``: cpu | cuda | auto, where both models run (None: a loaded model on the CPU, an
    in-memory one where it is). The reference's cached log-probabilities do not depend on it.
    ``decode_once``: quantized layers are decoded to dense weights once at load instead of at every
    forward (the same figures, the dense model's memory: the sweep's judge; speed and peak RAM are
    then the decoded model's, not the packed one's).
    """
    from ..device import model_device, resolve_device

    dev = resolve_device(device) if device is not None else None
    t0 = time.perf_counter()
    texts = list(EVAL_DEFAULTS) if text is None else (list(text) if isinstance(text, list) else [text])
    m = _resolve(model, tokenizer, "model")
    m.decode_once = decode_once
    if reference is None and not isinstance(model, torch.nn.Module):
        reference = _default_reference(m)
    r = _resolve(reference, ref_tokenizer, "reference") if reference is not None else None
    for x in (m, r):
        if x is not None:
            x.device = dev
    causal = m.is_causal()
    if r is not None and r.is_causal() != causal:
        kinds = {True: "a causal LM", False: "an encoder"}
        raise InputError(f"the model is {kinds[causal]} but the reference is {kinds[not causal]}")
    res: dict[str, Any] = {"model": m.name, "reference": r.name if r else None, "kind": "causal" if causal else "encoder"}
    if causal:
        res.update(_causal(m, r, texts, ctx, tokens, batch_size, k, cache))
    else:
        res.update(_encoder(m, r, texts, sentences, batch_size))
    mc = cost_of(m.module(), m.path)
    res.update(bpw=mc["bpw"], bytes_out=mc["bytes"], device=str(model_device(m.module())))
    if res.get("ref_bytes") is not None:
        res["bytes_in"] = res.pop("ref_bytes")
    elif mc["bytes_in"] is not None:
        res["bytes_in"] = int(mc["bytes_in"])
    if res.get("bytes_in"):
        res["ratio"] = res["bytes_out"] / res["bytes_in"]
    res["seconds"] = time.perf_counter() - t0
    m.release()
    return res


def _causal(m: _Model, r: _Model | None, texts: list, ctx: int, tokens: int, batch_size: int | None, k: int, cache: bool) -> dict:
    if r is None:
        out = perplexity(m.module(), m.tokenizer, texts, ctx=ctx, tokens=tokens, batch_size=batch_size)
        return out
    if tokenizer_sha256(m.tokenizer) != tokenizer_sha256(r.tokenizer):
        raise InputError(f"tokenizer mismatch: {m.name} and the reference {r.name} do not share a tokenizer")
    mc, rc = m.config(), r.config()  # fail before any forward pass
    if mc.get("vocab_size") != rc.get("vocab_size"):
        raise InputError(f"the model's vocabulary has {mc.get('vocab_size')} tokens, the reference's {rc.get('vocab_size')}")
    if mc.get("model_type") != rc.get("model_type"):
        raise InputError(f"the model's architecture {mc.get('model_type')!r} differs from the reference's {rc.get('model_type')!r}")
    ref = _reference(r, texts, ctx, tokens, batch_size, k, cache)
    r.release()  # the original leaves memory before the model runs: peak RSS is the model's own
    return _with_protocol(ref.compare(m.module(), tokenizer_sha256(m.tokenizer)), ref, k)


def _reference(r: _Model, texts: list, ctx: int, tokens: int, batch_size: int | None, k: int, cache: bool) -> Reference:
    return Reference.build(r.reference_model, r.tokenizer, texts, ctx=ctx, tokens=tokens, k=k, batch_size=batch_size,
                           fingerprint=r.fingerprint() if cache else None, name=r.name, cache=cache,
                           describe=lambda mod: {k2: v for k2, v in cost_of(mod, r.path).items() if k2 != "bytes_in"})


def evaluate_identical(reference: Any, text: Any = None, *, ctx: int = 512, tokens: int = 16384, tokenizer: Any = None,
                       batch_size: int | None = None, k: int = TOPK) -> dict[str, Any]:
    """The figures :func:`evaluate` gives a model that is ``reference`` bit for bit (a lossless
    restore its caller has verified, checksums included), without running it: the fidelity keys
    of a causal LM (KL exactly 0, top-1 1, the reference's perplexity) and the protocol; speed and
    memory are the original's."""
    texts = list(EVAL_DEFAULTS) if text is None else (list(text) if isinstance(text, list) else [text])
    r = _resolve(reference, tokenizer, "reference")
    if not r.is_causal():
        raise InputError(f"{r.name}: the fidelity of an identical model is defined here for causal LMs only")
    ref = _reference(r, texts, ctx, tokens, batch_size, k, True)
    r.release()
    return _with_protocol(ref.identical(), ref, k)


def _with_protocol(out: dict[str, Any], ref: Reference, k: int) -> dict[str, Any]:
    out["protocol_label"] = ref.protocol.label()
    out["protocol"] = {**ref.protocol.to_dict(), "kl": (f"KL(reference‖model) per scored token: exact over the reference's top-{k} "
                                                        f"tokens + the rest estimated from {ref.tail_idx.shape[1]} draws of the "
                                                        "reference's tail (unbiased; exactly 0 for the reference itself)")}
    out.update({f"ref_{key}": ref.cost.get(key) for key in ("tokens_per_s", "peak_rss_bytes", "bpw", "bytes")})
    return out


def _encoder(m: _Model, r: _Model | None, texts: list, n: int, batch_size: int | None) -> dict:
    sents, meta = eval_sentences(texts, n)
    protocol = {"sentences": len(sents), "texts": meta, "selection": "sentences of 6-48 words spread evenly over each text",
                "pooling": "mean over tokens (attention mask)", "max_len": 128,
                "tokenizer": type(m.tokenizer).__name__, "tokenizer_sha256": tokenizer_sha256(m.tokenizer),
                "threads": torch.get_num_threads()}
    bs = batch_size or 32
    out: dict[str, Any] = {"protocol": protocol}
    if r is not None:
        if tokenizer_sha256(m.tokenizer) != tokenizer_sha256(r.tokenizer):
            raise InputError(f"tokenizer mismatch: {m.name} and the reference {r.name} do not share a tokenizer")
        rm = r.module()
        ref_emb, rcost = embed(rm, r.tokenizer, sents, bs)
        rc = cost_of(rm, r.path)
        out.update(ref_bpw=rc["bpw"], ref_bytes=rc["bytes"], **{f"ref_{k}": v for k, v in rcost.items() if k != "seconds"})
        r.release()
        mm = m.module()
        if getattr(mm.config, "hidden_size", None) != getattr(rm.config, "hidden_size", None) or mm.config.model_type != rm.config.model_type:
            raise InputError(f"the model ({mm.config.model_type}, hidden {mm.config.hidden_size}) and the reference "
                             f"({rm.config.model_type}, hidden {rm.config.hidden_size}) are different architectures")
        del rm
        emb, cost = embed(mm, m.tokenizer, sents, bs)
        out.update(embedding_fidelity(emb, ref_emb))
    else:
        _, cost = embed(m.module(), m.tokenizer, sents, bs)
    out.update(tokens_per_s=cost["tokens_per_s"], peak_rss_bytes=cost["peak_rss_bytes"])
    return out

