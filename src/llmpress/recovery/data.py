"""Training text: token windows in a fixed shuffled order, and a guard against training on the
evaluation text.

The windows are consecutive, non-overlapping ``seq_len``-token pieces of the training text,
shuffled once by a seeded generator; step i uses windows i·B … i·B + B − 1 (cycling through the
text again when a run needs more windows than it has). A step's batch depends only on the seed
and the step number, so an interrupted run that resumes sees the same batches. The last
``holdout`` windows of the text are never trained on: they are the held-out slice on which the
run's best state is chosen.

Overlap: a model trained on the very text it is evaluated on would look better than it is.
We compare word n-grams (n = 13, the window GPT-3's decontamination used) of the training text
with those of the evaluation texts; the fraction of the training text's n-grams that also occur
in an evaluation text measures the contamination.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError

log = logging.getLogger(__name__)

NGRAM = 13
MAX_OVERLAP = 0.01  # refuse above this fraction of shared training n-grams
_WORD = re.compile(r"\w+")


class TextOverlapError(InputError):
    pass


@dataclass
class TrainWindows:
    windows: Tensor  # (N, seq_len) int64: the training windows
    seed: int
    chars: int = 0  # characters of the text the windows were cut from
    held: Tensor | None = None  # (H, seq_len) int64: the held-out windows, after the training ones in the text

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.order = torch.randperm(self.windows.shape[0], generator=g)

    def batch(self, step: int, batch_size: int) -> Tensor:
        """The (batch_size, seq_len) ids of step ``step``."""
        n = self.windows.shape[0]
        idx = (torch.arange(batch_size) + step * batch_size) % n
        return self.windows[self.order[idx]]


def train_windows(tokenizer, text: str, seq_len: int, needed: int, seed: int = 0, holdout: int = 0) -> TrainWindows:
    """Cut ``text`` into up to ``needed`` training windows of ``seq_len`` tokens and, after them in
    the text, ``holdout`` held-out windows (tokenizing only what they need); at least one training
    window, or a clear error. A text too short for both gives the held-out slice at most a quarter of it."""
    if seq_len < 2:
        raise InputError(f"seq_len must be ≥ 2; got {seq_len}")
    want = needed + holdout
    chars = max(want * seq_len * 6, 20000)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= want * seq_len or chars >= len(text):
            break
        chars *= 2
    total = len(ids) // seq_len
    held = min(holdout, total // 4) if total < want else holdout
    n = min(total - held, needed)
    if n < 1:
        raise InputError(f"the training text is too short: {len(ids)} tokens for one window of {seq_len}")
    if held < holdout:
        log.warning("the training text holds %d windows: %d of them held out (asked for %d)", total, held, holdout)
    if n < needed:
        log.info("training text holds %d windows of %d tokens; the run cycles through it %.1f times", n, seq_len, needed / n)
    w = torch.tensor(ids[: (n + held) * seq_len], dtype=torch.long).reshape(n + held, seq_len)
    return TrainWindows(w[:n], seed, min(chars, len(text)), w[n:] if held else None)


def _ngram_hashes(text: str, n: int = NGRAM) -> set[bytes]:
    words = _WORD.findall(text.lower())
    return {hashlib.blake2b(" ".join(words[i : i + n]).encode(), digest_size=8).digest() for i in range(len(words) - n + 1)}


def text_overlap(train: str, evals: dict[str, str], n: int = NGRAM) -> dict[str, float]:
    """For each evaluation text, the fraction of the training text's word n-grams it contains."""
    tr = _ngram_hashes(train, n)
    if not tr:
        return {name: 0.0 for name in evals}
    return {name: len(tr & _ngram_hashes(t, n)) / len(tr) for name, t in evals.items()}


def check_overlap(train: str, evals: dict[str, str], *, allow: bool = False, limit: float = MAX_OVERLAP) -> dict[str, float]:
    """Refuse (or, with ``allow``, warn loudly) when the training text shares more than ``limit``
    of its n-grams with an evaluation text; warn on any smaller shared part."""
    ov = text_overlap(train, evals)
    for name, f in ov.items():
        if f > limit:
            msg = (f"the training text overlaps the evaluation text {name!r}: {100 * f:.2f}% of its {NGRAM}-word "
                   f"windows occur there; evaluation after training would be contaminated")
            if not allow:
                raise TextOverlapError(msg + " (train on another text, or pass allow_overlap to go on anyway)")
            log.warning("WARNING: %s", msg)
        elif f > 0:
            log.warning("the training text shares %.3f%% of its %d-word windows with %r (boilerplate?)", 100 * f, NGRAM, name)
    return ov
