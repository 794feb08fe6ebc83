"""The evaluation protocol: which tokens of which texts a model is scored on.

Perplexities measured under different protocols are not comparable, so every number llmpress
prints carries the :class:`Protocol` that produced it. Ours: each text is tokenized without
special tokens into ``n = tokens / (ctx * len(texts))`` windows of ``ctx`` tokens, spread over
the whole text (window j starts at the first paragraph at or after character j/n) so that a
book's front matter does not stand for the book; a text with too few paragraph breaks for its
windows (a user's file written one paragraph per line, or none) is cut at line starts instead,
then at word starts, and the protocol names the boundary used; windows never overlap, no BOS is added;
inside a window every token but the first is scored (predicted from the tokens before it in
the same window), so ``n_windows * (ctx - 1)`` tokens are scored in all.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import re
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError
from ..text import load_text, text_sha256


@dataclass
class Protocol:
    ctx: int
    windows: int  # in all, over every text
    scored_tokens: int
    texts: list[dict]  # [{"name", "sha256", "windows"}]
    tokenizer: str  # class name
    tokenizer_sha256: str
    batch_size: int
    threads: int
    scoring: str = ("per text, windows of ctx tokens, the j-th of n starting at the first paragraph at or after "
                    "character j/n of the text (non-overlapping, spread over the whole text); no BOS added; "
                    "every token but each window's first is scored")
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """Hash of what decides the scored numbers (not the thread count)."""
        d = self.to_dict()
        d.pop("threads")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def label(self) -> str:
        """The protocol in one short string, printed beside every PPL and KL: the texts, windows ×
        ctx, and a hash of everything that decides the figures (texts' contents, tokenizer,
        scoring). Two figures are comparable only when their labels are equal."""
        names = "+".join(Path(t["name"]).name for t in self.texts)
        return f"{names} {self.windows}×{self.ctx} #{self.key()[:8]}"


_TOK_SHA: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


def tokenizer_sha256(tok) -> str:
    """Identity of a tokenizer: its class, its vocabulary and its special tokens."""
    if tok in _TOK_SHA:
        return _TOK_SHA[tok]
    vocab = sorted(tok.get_vocab().items())
    payload = json.dumps([type(tok).__name__.replace("Fast", ""), vocab, sorted(map(str, tok.all_special_tokens))])
    _TOK_SHA[tok] = h = hashlib.sha256(payload.encode()).hexdigest()
    return h


def text_spec(text) -> tuple[str, str]:
    """``(name, content)`` of a text argument: a spec for :func:`llmpress.text.load_text`, or a
    ``(name, content)`` pair of raw text."""
    if isinstance(text, tuple):
        return str(text[0]), str(text[1])
    return str(text), load_text(str(text))


# Where a window may start, finest last: the first that gives every window room is used.
BOUNDARIES: dict[str, str] = {"paragraph": r"\n\n+", "line": r"\n+", "word": r"\s+"}


def _spread_windows(tok, text: str, n: int, ctx: int, boundary: str = "paragraph") -> list[Tensor]:
    """``n`` windows of ``ctx`` token ids, the j-th starting at the first ``boundary`` (a key of
    :data:`BOUNDARIES`) at or after character j/n of the text and tokenized from there alone (so
    windows never overlap). Tokenizes only what it needs, not the whole corpus."""
    starts = [0] + [m.end() for m in re.finditer(BOUNDARIES[boundary], text)] + [len(text)]
    offs = [starts[bisect.bisect_left(starts, j * len(text) // n)] if j else 0 for j in range(n)] + [len(text)]
    out = []
    for j in range(n):
        seg = text[offs[j] : offs[j + 1]]
        chars = min(len(seg), max(ctx * 8, 2048))
        while True:
            ids = tok(seg[:chars], add_special_tokens=False)["input_ids"]
            if len(ids) >= ctx + 1 or chars >= len(seg):  # +1: the cut may split the last word
                break
            chars = min(len(seg), chars * 2)
        if len(ids) < ctx:
            return out
        out.append(torch.tensor(ids[:ctx], dtype=torch.long))
    return out


def make_windows(tok, texts: list, ctx: int, tokens: int, batch_size: int) -> tuple[Tensor, Tensor, Protocol]:
    """Cut the texts into windows.

    Returns ``ids`` (W, ctx) int64, ``domain`` (W,) int64 (index of the text each window comes
    from) and the :class:`Protocol`.
    """
    if ctx < 2:
        raise InputError(f"ctx must be at least 2 tokens (got {ctx})")
    per_text = tokens // (ctx * len(texts))
    if per_text < 1:
        raise InputError(f"tokens={tokens} is less than one window of ctx={ctx} per text ({len(texts)} texts)")
    all_ids, domain, meta = [], [], []
    for i, t in enumerate(texts):
        name, content = text_spec(t)
        wins: list[Tensor] = []
        for boundary in BOUNDARIES if content.strip() else ():
            wins = _spread_windows(tok, content, per_text, ctx, boundary)
            if len(wins) == per_text:
                break
        if len(wins) < per_text:
            total = len(tok(content, add_special_tokens=False)["input_ids"]) if len(content) < 10**6 else None
            raise InputError(f"text {name!r} is too short for {per_text} windows of ctx={ctx} tokens "
                             f"({total if total is not None else 'not enough'} tokens; ask for fewer tokens or a shorter ctx)")
        n = per_text
        all_ids.append(torch.stack(wins))
        domain.append(torch.full((n,), i, dtype=torch.long))
        meta.append({"name": name, "sha256": text_sha256(content), "windows": n,
                     **({"boundary": boundary} if boundary != "paragraph" else {})})
    ids = torch.cat(all_ids)
    proto = Protocol(
        ctx=ctx, windows=ids.shape[0], scored_tokens=ids.shape[0] * (ctx - 1), texts=meta,
        tokenizer=type(tok).__name__, tokenizer_sha256=tokenizer_sha256(tok), batch_size=batch_size,
        threads=torch.get_num_threads(),
    )
    return ids, torch.cat(domain), proto


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")


def sentences(texts: list, n: int, min_words: int = 6, max_words: int = 48) -> tuple[list[str], list[dict]]:
    """``n`` sentences of ``min_words``..``max_words`` words, ``n / len(texts)`` from each text,
    spread over it: the j-th is the first such sentence at or after paragraph j/per of the text."""
    per = max(1, n // len(texts))
    out, meta = [], []
    for t in texts:
        name, content = text_spec(t)
        paras = content.split("\n\n")
        got: list[str] = []
        nxt = 0  # first paragraph not yet used: sentences stay in order and distinct
        for j in range(per):
            for i in range(max(nxt, j * len(paras) // per), len(paras)):
                ok = [s for s in _SENT.split(paras[i].strip()) if min_words <= len(s.split()) <= max_words and s[-1:] in ".!?"]
                if ok:
                    got.append(ok[0])
                    nxt = i + 1
                    break
        if not got:
            raise InputError(f"text {name!r} has no sentence of {min_words}..{max_words} words")
        out += got
        meta.append({"name": name, "sha256": text_sha256(content), "sentences": len(got)})
    return out, meta
