"""Perplexity and fidelity of a causal LM to its original, against a cached reference.

The reference is the original model's next-token distribution p at every scored position,
kept compactly: the k most likely tokens with their log-probabilities, S tokens drawn from
the rest of p (the "tail", p restricted to the other tokens) with their log-probabilities,
the tail's mass p_rest, and the log-probability of the true next token. Against it, the KL
divergence of a model q is, with f(r) = r − 1 − log r ≥ 0 and r_i = q_i / p_i,

    KL(p‖q) = Σ_i p_i f(r_i)      (since Σ_i p_i (r_i − 1) = Σ q − Σ p = 0 over the vocabulary)
            = Σ_{i ∈ topk(p)} p_i f(r_i)  +  p_rest · E_{i ~ p_tail}[f(r_i)]

the top-k part exact, the tail part estimated from the S stored draws. So the per-token value
is never negative, is exactly 0 for a model identical to the reference (every r_i = 1: the
same float32 log-probabilities from the same code), is unbiased for the full-vocabulary KL,
and its sampling noise is second order in the perturbation (f(r) ≈ (log r)²/2), so it stays
small next to the KL itself even for near-lossless models. A top-k-only KL would underestimate:
a small model's next-token distribution keeps a few per cent of its mass outside its top 128
tokens, and a "top-k + rest bucket" KL, which treats that mass as one token, misses the part of
the divergence spread over it.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import InputError
from ..device import model_device
from ..models import cache_dir
from .cost import RSSMeter
from .windows import Protocol, make_windows

log = logging.getLogger(__name__)

TOPK = 128
TAIL_SAMPLES = 64


LOGITS_CHUNK_BYTES = 128 << 20  # one (rows, V) float32 block of logits; log-probs and the tail's weights are its size too
ROW_GROUP = 256  # rows are chunked in multiples of this (the tail is drawn this many rows per call)


def default_batch(ctx: int) -> int:
    return max(1, 2048 // ctx)  # windows per forward pass; the head's logits are made a chunk of rows at a time


def chunk_rows(vocab: int) -> int:
    """Rows of (rows, V) logits made and reduced at once: a multiple of :data:`ROW_GROUP` near
    :data:`LOGITS_CHUNK_BYTES` (chunking changes no figure: every row is computed alone)."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab * ROW_GROUP)) * ROW_GROUP


def _post_head_free(model: torch.nn.Module) -> bool:
    """Whether the model's logits are its output embeddings applied to the last hidden states,
    with nothing after (no soft-capping or scaling, which a chunked head would skip)."""
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", lambda: cfg)
    tc = get() if cfg is not None else None
    for c in (cfg, tc):
        if c is None:
            continue
        if getattr(c, "final_logit_softcapping", None) or getattr(c, "logit_scale", 1.0) not in (None, 1, 1.0) \
                or getattr(c, "logits_scaling", 1.0) not in (None, 1, 1.0):
            return False
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def _hidden(model: torch.nn.Module, x: Tensor) -> tuple[Tensor | None, torch.nn.Module | None, Tensor]:
    """One forward pass of ``x`` (B, T) that stops short of the full-vocabulary logits: returns
    ``(h (B, T, H) the head's input, head, logits (B, T, V))`` where ``logits`` covers only the last
    position when ``h`` was caught (the head ran on that position alone) and every position when not."""
    head = model.get_output_embeddings() if _post_head_free(model) else None
    caught: dict[str, Tensor] = {}

    def pre(_mod, args):
        if args and isinstance(args[0], Tensor) and args[0].dim() == 3 and "h" not in caught:
            caught["h"] = args[0]
            return (args[0][:, -1:],)
        return None

    handle = head.register_forward_pre_hook(pre) if head is not None else None
    try:
        logits = model(input_ids=x, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    h = caught.get("h")
    if h is not None and (logits.shape[1] != 1 or not torch.equal(head(h[:, -1:]).float(), logits.float())):
        # the logits are not head(h): something ran after the head; run again, whole
        log.warning("%s: its logits are not its output embeddings' alone; full-vocabulary logits of every "
                    "position are kept at once", type(model).__name__)
        logits, h = model(input_ids=x, use_cache=False).logits, None
    return h, head, logits


def _logprob_batches(model: torch.nn.Module, ids: Tensor, batch_size: int, device: torch.device | None = None):
    """Yield ``(start, targets (n,), logprobs (n, V) float32)`` for each chunk of scored rows, in
    order: scored row ``r = start + j`` is window ``r // (T-1)``'s position ``r % (T-1)``. Chunks
    never straddle two batches of windows and hold :func:`chunk_rows` rows (the last of a batch
    fewer), so only one chunk's full-vocabulary log-probs exist at a time; every row's values are
    those the whole batch's logits gave. Computed where the model is (both on its device), or on
    ``device``; a model with its own ``logprob_batches`` (``streamed.StreamedOriginal``) makes them."""
    if hasattr(model, "logprob_batches"):
        yield from model.logprob_batches(ids, batch_size)
        return
    dev = device or model_device(model)
    T1, n_rows = ids.shape[1] - 1, chunk_rows(_vocab_of(model))
    with torch.inference_mode():
        for s in range(0, ids.shape[0], batch_size):
            x = ids[s : s + batch_size].to(dev)
            tgt = x[:, 1:].reshape(-1)  # (B*(T-1),)
            h, head, logits = _hidden(model, x)
            if h is not None:
                h = h[:, :-1].reshape(tgt.numel(), -1)  # (B*(T-1), H)
            else:
                logits = logits[:, :-1].reshape(tgt.numel(), -1)  # (B*(T-1), V)
            for a in range(0, tgt.numel(), n_rows):
                b = min(a + n_rows, tgt.numel())
                lg = (head(h[a:b]) if h is not None else logits[a:b]).float()  # (n, V)
                if not torch.isfinite(lg).all():
                    r = a + int((~torch.isfinite(lg)).any(-1).nonzero()[0])
                    raise InputError(f"the model produced non-finite logits (window {s + r // T1}, position {r % T1})")
                yield s * T1 + a, tgt[a:b], torch.log_softmax(lg, dim=-1)
                del lg


def _rest(lp: Tensor, idx: Tensor) -> Tensor:
    """log of the probability mass outside ``idx``; overwrites ``lp`` (to spare a copy)."""
    return lp.scatter_(-1, idx, float("-inf")).logsumexp(-1)


def _sample_tail(lp: Tensor, top: Tensor, samples: int, gen: torch.Generator, rows: int = ROW_GROUP) -> tuple[Tensor, Tensor]:
    """Draw ``samples`` tokens per row from p restricted to the tokens outside ``top``.

    ``lp`` (n, V) log-probabilities, ``top`` (n, k). Returns token ids (n, S) and their
    log-probabilities (n, S), gathered from ``lp`` itself so that a model equal to the
    reference reproduces them bit for bit. Works on ``rows`` rows at a time to bound memory."""
    idx, out = torch.empty(lp.shape[0], samples, dtype=torch.long), torch.empty(lp.shape[0], samples)
    for r in range(0, lp.shape[0], rows):
        sub = lp[r : r + rows]
        pr = sub.exp().scatter_(-1, top[r : r + rows], 0.0)  # (rows, V) tail weights, unnormalized
        empty = pr.sum(-1) <= 0  # the top-k hold all the mass: any draw, its weight p_rest is 0
        if empty.any():
            pr[empty] = 1.0
        idx[r : r + rows] = torch.multinomial(pr, samples, replacement=True, generator=gen)
        out[r : r + rows] = sub.gather(-1, idx[r : r + rows])
    return idx, out


def _f(lq: Tensor, lp: Tensor) -> Tensor:
    """f(r) = r − 1 − log r at r = q/p, from log-probabilities (float64, ≥ 0, 0 iff q = p)."""
    d = lq.double() - lp.double()
    return torch.expm1(d) - d


def _quantile(x: Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q)) if x.numel() else float("nan")


def _window_se(per_token: Tensor, ctx1: int) -> float:
    """Standard error of the mean of ``per_token`` (W*(ctx-1),) over windows (tokens within a
    window are correlated; windows are treated as independent samples)."""
    w = per_token.double().view(-1, ctx1).mean(1)
    return float(w.std(unbiased=True) / math.sqrt(w.numel())) if w.numel() > 1 else float("nan")


@dataclass
class Reference:
    """The original model's next-token distributions on a protocol's windows (N = W·(ctx−1))."""

    protocol: Protocol
    ids: Tensor  # (W, ctx) int64
    domain: Tensor  # (W,) int64
    topk_idx: Tensor  # (N, k) int32, sorted by descending probability
    topk_lp: Tensor  # (N, k) float32
    log_rest: Tensor  # (N,) float32
    tail_idx: Tensor  # (N, S) int32, draws from the reference's distribution outside its top-k
    tail_lp: Tensor  # (N, S) float32
    target_lp: Tensor  # (N,) float32
    model_info: dict = field(default_factory=dict)  # model_type, vocab_size, name, fingerprint
    cost: dict = field(default_factory=dict)  # tokens_per_s, peak_rss_bytes, seconds of the original

    # ------------------------------------------------------------------ building and caching
    @classmethod
    def build(cls, model: "torch.nn.Module | Callable[[], torch.nn.Module]", tokenizer, texts: list, *, ctx: int = 512,
              tokens: int = 16384, k: int = TOPK, samples: int = TAIL_SAMPLES, batch_size: int | None = None,
              fingerprint: str | None = None,
              name: str = "", cache: bool = True, describe: Callable[[torch.nn.Module], dict] | None = None) -> "Reference":
        """Run the original once over the windows, or load the result from the disk cache
        (keyed by the model's fingerprint, the texts' hashes and the protocol). ``model`` may be
        a function that loads it, called only on a cache miss; ``describe(model)`` adds figures
        about the original (bits per weight, bytes) to ``cost``, cached with the rest."""
        bs = batch_size or default_batch(ctx)
        ids, domain, proto = make_windows(tokenizer, texts, ctx, tokens, bs)
        path = None
        if cache and fingerprint:
            key = f"{fingerprint[:16]}-{proto.key()}-k{k}s{samples}"
            path = cache_dir() / "reference" / f"{key}.safetensors"
            ref = None
            if path.exists():
                try:
                    ref = cls.load(path)
                except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # damaged: measured again
                    log.warning("reference cache %s is unreadable (%s); measuring the original again", path, e)
            if ref is not None and torch.equal(ref.ids, ids):
                log.info("reference loaded from %s", path)
                ref.protocol.threads = proto.threads
                return ref
        if not isinstance(model, torch.nn.Module):
            model = model()
        vocab = _vocab_of(model)
        if int(ids.max()) >= vocab:
            raise InputError(f"the tokenizer yields token id {int(ids.max())} but the model's vocabulary has {vocab} tokens")
        k = min(k, vocab)
        N = ids.shape[0] * (ctx - 1)
        topk_idx = torch.empty(N, k, dtype=torch.int32)
        topk_lp = torch.empty(N, k)
        log_rest, target_lp = torch.empty(N), torch.empty(N)
        tail_idx, tail_lp = torch.empty(N, samples, dtype=torch.int32), torch.empty(N, samples)
        gen = torch.Generator().manual_seed(0)
        meter = RSSMeter()
        t0 = time.perf_counter()
        with meter:
            for a, tgt, lp in _logprob_batches(model, ids, bs):  # lp (n, V)
                b = a + tgt.numel()
                target_lp[a:b] = lp.gather(-1, tgt.unsqueeze(-1)).reshape(-1).cpu()
                v, i = lp.topk(k, dim=-1)  # (n, k)
                topk_lp[a:b], topk_idx[a:b] = v.cpu(), i.to(torch.int32).cpu()
                # the tail draws from the CPU generator, wherever the model ran: the same draws
                ti, tl = _sample_tail(lp.cpu(), i.cpu(), samples, gen)
                tail_idx[a:b], tail_lp[a:b] = ti.to(torch.int32), tl
                log_rest[a:b] = _rest(lp, i).cpu()
        secs = time.perf_counter() - t0
        ref = cls(proto, ids, domain, topk_idx, topk_lp, log_rest, tail_idx, tail_lp, target_lp,
                  model_info={"model_type": _model_type(model), "vocab_size": vocab, "name": name, "fingerprint": fingerprint},
                  cost={"seconds": secs, "tokens_per_s": ids.numel() / secs, "peak_rss_bytes": meter.peak,
                        **(describe(model) if describe else {})})
        if path is not None:
            ref.save(path)
        return ref

    def save(self, path: Path) -> None:
        from ..io.atomic import atomic_file

        tensors = {"ids": self.ids, "domain": self.domain, "topk_idx": self.topk_idx, "topk_lp": self.topk_lp,
                   "log_rest": self.log_rest, "tail_idx": self.tail_idx, "tail_lp": self.tail_lp, "target_lp": self.target_lp}
        meta = {"protocol": json.dumps(self.protocol.to_dict()), "model": json.dumps(self.model_info), "cost": json.dumps(self.cost)}
        with atomic_file(path, force=True) as tmp:  # a name of its own: runs filling the cache at once do not mix
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> "Reference":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as h:
            meta = h.metadata()
        t = load_file(str(path))
        return cls(Protocol(**json.loads(meta["protocol"])), t["ids"], t["domain"], t["topk_idx"], t["topk_lp"],
                   t["log_rest"], t["tail_idx"], t["tail_lp"], t["target_lp"], json.loads(meta["model"]), json.loads(meta["cost"]))

    @property
    def ppl(self) -> float:
        return math.exp(-float(self.target_lp.double().mean()))

    # ------------------------------------------------------------------ comparing
    def identical(self) -> dict:
        """What :meth:`compare` gives a model whose log-probabilities are the reference's own bit
        for bit (a bit-exact restore of the original): every r_i = 1, so KL exactly 0, the
        reference's top token always the model's, its perplexity the reference's; no forward pass.
        Speed and memory are the original's, as measured when the reference was built."""
        N = self.target_lp.numel()
        out = self._summary(torch.zeros(N, dtype=torch.float64), self.target_lp, torch.ones(N, dtype=torch.bool))
        out.update(seconds=0.0, tokens_per_s=self.cost.get("tokens_per_s"), peak_rss_bytes=self.cost.get("peak_rss_bytes"))
        return out

    def check(self, model: torch.nn.Module, tokenizer_sha256: str | None) -> None:
        """Refuse comparisons that would be meaningless: another tokenizer, vocabulary or architecture."""
        if tokenizer_sha256 is not None and tokenizer_sha256 != self.protocol.tokenizer_sha256:
            raise InputError("the model's tokenizer differs from the reference's (vocabulary or special tokens): "
                             "next-token distributions cannot be compared")
        vocab, mt = _vocab_of(model), _model_type(model)
        if vocab != self.model_info.get("vocab_size"):
            raise InputError(f"the model's vocabulary has {vocab} tokens, the reference's {self.model_info.get('vocab_size')}")
        if self.model_info.get("model_type") and mt != self.model_info["model_type"]:
            raise InputError(f"the model's architecture {mt!r} differs from the reference's {self.model_info['model_type']!r}")

    def compare(self, model: torch.nn.Module, tokenizer_sha256: str | None = None) -> dict:
        """Perplexity of ``model`` and its fidelity to the reference, pooled and per text."""
        self.check(model, tokenizer_sha256)
        N = self.target_lp.numel()
        kl, tlp, agree = torch.empty(N, dtype=torch.float64), torch.empty(N), torch.empty(N, dtype=torch.bool)
        p_ref = self.topk_lp.exp()  # (N, k)
        p_rest = self.log_rest.exp()
        meter = RSSMeter()
        t0 = time.perf_counter()
        with meter:
            for a, tgt, lp in _logprob_batches(model, self.ids, self.protocol.batch_size):  # lp (n, V)
                b = a + tgt.numel()
                dev = lp.device  # the reference's slices go where the model's log-probs are
                idx = self.topk_idx[a:b].long().to(dev)
                tlp[a:b] = lp.gather(-1, tgt.reshape(-1, 1)).squeeze(-1).cpu()
                at = lp.gather(-1, idx)  # (n, k) model log-probs of the reference's top-k tokens
                agree[a:b] = (at[:, 0] >= lp.max(-1).values).cpu()  # the reference's top token is (one of) the model's top
                tail = lp.gather(-1, self.tail_idx[a:b].long().to(dev))  # (n, S)
                kl_top = (p_ref[a:b].to(dev).double() * _f(at, self.topk_lp[a:b].to(dev))).sum(-1)
                kl_tail = p_rest[a:b].to(dev).double() * _f(tail, self.tail_lp[a:b].to(dev)).mean(-1)
                kl[a:b] = (kl_top + kl_tail).cpu()
        secs = time.perf_counter() - t0
        out = self._summary(kl, tlp, agree)
        out.update(seconds=secs, tokens_per_s=self.ids.numel() / secs, peak_rss_bytes=meter.peak)
        return out

    def _summary(self, kl: Tensor, tlp: Tensor, agree: Tensor) -> dict:
        """The fidelity figures of per-token KL, target log-probs and top-1 agreement (N,), pooled
        and, with several texts, per text."""
        ctx1 = self.protocol.ctx - 1
        out = _stats(kl, tlp, self.target_lp, agree, ctx1)
        dom = self.domain.repeat_interleave(ctx1)
        if len(self.protocol.texts) > 1:
            out["texts"] = {t["name"]: _stats(kl[dom == i], tlp[dom == i], self.target_lp[dom == i], agree[dom == i], ctx1)
                            for i, t in enumerate(self.protocol.texts)}
        return out


def _stats(kl: Tensor, tlp: Tensor, ref_tlp: Tensor, agree: Tensor, ctx1: int) -> dict:
    nll, ref_nll = -tlp.double(), -ref_tlp.double()
    diff = nll - ref_nll
    lr = float(diff.mean())
    return {
        "ppl": math.exp(float(nll.mean())), "ref_ppl": math.exp(float(ref_nll.mean())),
        "kl_mean": float(kl.mean()), "kl_se": _window_se(kl, ctx1), "kl_median": _quantile(kl, 0.5),
        "kl_p99": _quantile(kl, 0.99), "kl_max": float(kl.max()), "top1": float(agree.double().mean()),
        "ln_ppl_ratio": lr, "ln_ppl_ratio_se": _window_se(diff, ctx1), "ppl_ratio": math.exp(lr),
    }


def perplexity(model: torch.nn.Module, tokenizer, texts: list, *, ctx: int = 512, tokens: int = 16384,
               batch_size: int | None = None) -> dict:
    """Perplexity of a causal LM alone (no reference), with its protocol and speed."""
    bs = batch_size or default_batch(ctx)
    ids, domain, proto = make_windows(tokenizer, texts, ctx, tokens, bs)
    nll = torch.empty(ids.shape[0] * (ctx - 1), dtype=torch.float64)
    meter = RSSMeter()
    t0 = time.perf_counter()
    with meter:
        for a, tgt, lp in _logprob_batches(model, ids, bs):  # lp (n, V)
            nll[a : a + tgt.numel()] = -lp.gather(-1, tgt.unsqueeze(-1)).reshape(-1).double().cpu()
    secs = time.perf_counter() - t0
    out = {"ppl": math.exp(float(nll.mean())), "ln_ppl_se": _window_se(nll, ctx - 1)}
    if len(proto.texts) > 1:
        dom = domain.repeat_interleave(ctx - 1)
        out["texts"] = {t["name"]: {"ppl": math.exp(float(nll[dom == i].mean())), "ln_ppl_se": _window_se(nll[dom == i], ctx - 1)}
                        for i, t in enumerate(proto.texts)}
    out.update(seconds=secs, tokens_per_s=ids.numel() / secs, peak_rss_bytes=meter.peak, protocol=proto.to_dict(),
               protocol_label=proto.label())
    return out


def _vocab_of(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    return int(getattr(model.config, "vocab_size"))


def _model_type(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) or type(model).__name__
