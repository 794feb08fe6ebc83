"""The original model's forward pass one block at a time: a reference for checkpoints larger
than memory.

Loading an original to build its reference costs its whole float32 size (an 8B model: 32 GB).
Here the checkpoint stays on disk and the windows are walked as compression walks them
(``pipeline._start_walk``): block 0's inputs for every batch of windows, then each block
loaded in float32, run over every batch and released. The last block's outputs are then
replayed through the model's own forward, whose blocks are replaced by stand-ins (the identity,
and the recorded outputs for the last block), so the family's own code applies what follows the
blocks (final norm, soft-capping, head). Peak memory: one block, the embedding and head, and the
hidden states of every window (windows × ctx × hidden float32). Every block computes what it
computes inside the whole model on the same batch, so the log-probabilities are the loaded
model's.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .. import skeleton as sk
from ..device import resolve_device
from ..errors import LlmpressError

log = logging.getLogger(__name__)


class StreamedOriginal(nn.Module):
    """A causal checkpoint on disk, evaluated block by block (see the module's docstring).
    ``model`` is its meta skeleton: config, head shape and parameter dtypes for the judge's
    bookkeeping; :meth:`logprob_batches` is the forward pass."""

    def __init__(self, source: str | Path, device: str | torch.device | None = None):
        super().__init__()
        from ..pipeline import open_walkable

        _, self.store, self.model = open_walkable(source)
        self.config = self.model.config
        self.device = resolve_device(device) if device is not None else torch.device("cpu")

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a StreamedOriginal has no single-batch forward: use logprob_batches")

    def logprob_batches(self, ids: Tensor, batch_size: int) -> Iterator[tuple[int, Tensor, Tensor]]:
        """What ``causal._logprob_batches`` yields for the loaded model, computed block by block."""
        from ..pipeline import _load_when_called, _start_walk, walk_forward
        from .causal import _logprob_batches

        skel, dev = self.model, self.device
        walk = _start_walk(skel, self.store, ids, batch_size, dev)
        hs = walk.hs
        for _, hs in walk_forward(walk, self.store, hs, dev):  # (B, T, C) per batch: the last block's outputs
            pass
        batches = [ids[s : s + batch_size] for s in range(0, ids.shape[0], batch_size)]
        current: dict[str, Tensor] = {}

        def which(_m: nn.Module, _args: tuple, kwargs: dict) -> None:
            x = kwargs["input_ids"].to("cpu")
            current["h"] = next(h for b, h in zip(batches, hs) if b.shape == x.shape and torch.equal(b, x))

        for block in walk.blocks:  # an instance attribute: nn.Module.__call__ finds it first
            block.forward = lambda *a, **k: a[0] if a else k["hidden_states"]
        walk.blocks[-1].forward = lambda *a, **k: current["h"]
        handles, loaded = _load_when_called(skel, walk.prefix, self.store, dev)
        handles.append(skel.register_forward_pre_hook(which, with_kwargs=True))
        try:
            yield from _logprob_batches(skel, ids, batch_size, device=dev)
        finally:
            for block in walk.blocks:
                del block.forward
            for h in handles:
                h.remove()
            for m in loaded:
                sk.release(m)


def streamable(path: Path | None) -> bool:
    """Whether a reference at ``path`` is an original causal checkpoint the walk can stream
    (an llmpress output or an unwalkable family is loaded whole instead)."""
    if path is None:
        return False
    from ..loading import is_llmpress_output
    from ..models import is_causal, resolve

    try:
        if is_llmpress_output(path):
            return False
        src = resolve(path)
        if not is_causal(src):
            return False
        skel = sk.build_meta(sk.folder_config(src.folder))
    except (LlmpressError, OSError, ValueError, KeyError) as e:
        log.debug("%s: not streamed (%s)", path, e)
        return False
    return sk.why_not_walkable(skel) is None
