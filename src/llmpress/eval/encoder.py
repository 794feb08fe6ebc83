"""Fidelity of a sentence encoder (no next-token head): cosine similarity of its sentence
embeddings to the original's, on real sentences of the evaluation texts.

A sentence embedding is the mean of the last hidden states over the sentence's tokens
(attention mask applied), as sentence-transformers' all-MiniLM-L6-v2 pools them; both models
embed the same batches, so the only difference is the weights.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..device import model_device
from .cost import RSSMeter


def embed(model: torch.nn.Module, tokenizer, sents: list[str], batch_size: int = 32, max_len: int = 128) -> tuple[Tensor, dict]:
    """Mean-pooled sentence embeddings (S, H) float32 and the run's cost."""
    out, n_tok = [], 0
    meter = RSSMeter()
    dev = model_device(model)
    t0 = time.perf_counter()
    with meter, torch.inference_mode():
        for s in range(0, len(sents), batch_size):
            enc = tokenizer(sents[s : s + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            enc = {k: v.to(dev) for k, v in enc.items()}
            h = model(**enc).last_hidden_state.float()  # (B, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            e = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            if not torch.isfinite(e).all():
                raise InputError(f"the encoder produced non-finite hidden states (sentences {s}..{s + batch_size})")
            out.append(e.cpu())
            n_tok += int(enc["attention_mask"].sum())
    secs = time.perf_counter() - t0
    return torch.cat(out), {"seconds": secs, "tokens_per_s": n_tok / secs, "peak_rss_bytes": meter.peak}


def embedding_fidelity(emb: Tensor, ref_emb: Tensor) -> dict:
    """Cosine similarity per sentence between two embedding sets (S, H): mean, worst, median."""
    if emb.shape != ref_emb.shape:
        raise InputError(f"embeddings of shape {tuple(emb.shape)} vs the reference's {tuple(ref_emb.shape)}")
    cos = F.cosine_similarity(emb.double(), ref_emb.double(), dim=-1).clamp(-1.0, 1.0)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "cos_median": float(cos.median()),
            "sentences": int(cos.numel())}
