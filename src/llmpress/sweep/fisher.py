"""The allocator's Fisher weights, computed block by block: peak memory near one block.

f_i = mean over calibration tokens of g_{t,i}², per linear and output channel, where g is the
gradient of Σ_t log p(y_t) at the linear's output and y_t is sampled from the model's own
next-token distribution (``sensitivity.py`` explains what the weights are for). The whole model is
never held, nor a batch's full-vocabulary logits:

1. **forward**: the sequential runner's walk (``pipeline._start_walk``: block 0's inputs and what
   the model passes each block), then each block in turn is loaded, run without gradients on every
   batch, and released; only the block-boundary hidden states are kept (blocks + 1 lists of one
   (B, T, H) tensor per batch);
2. **head**: the model's own forward with every block replaced by the identity and the last one by
   the stored last boundary state (a leaf that requires its gradient), caught at the output
   embeddings' input (after the final norm, whatever the family puts there); the head's logits are
   then made a chunk of rows at a time, with what the family applies after the head
   (:data:`POST_HEAD`, checked against the model's own logits of the last position), the labels
   sampled chunk by chunk from one generator (the same draws as one call over every row: CPU's
   ``multinomial`` consumes the generator row by row) and each chunk's loss backpropagated to the
   head's input, then through the final norm to the last boundary state;
3. **backward**: for each block from the last to the first: load it, recompute its forward from its
   stored input with gradients on (its parameters frozen), backpropagate the incoming gradient,
   hooks on its linears' outputs summing g² per output channel, pass the input's gradient down,
   free the block and its stored input.

The same numbers as one backward pass through the whole model (tested against it, within float
rounding), in the same float32.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import skeleton as sk
from ..errors import UnsupportedModelError

log = logging.getLogger(__name__)

LOGITS_CHUNK_BYTES = 32 << 20  # one (rows, V) float32 block of the head's logits; its softmax, noise and gradients are its size too


def _softcap(c: float) -> Callable[[Tensor], Tensor]:
    return lambda lg: torch.tanh(lg / c) * c


# what a family applies to its head's output, by config attribute (absent, None or neutral: nothing);
# transformers: Gemma 2/3's final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling
POST_HEAD: dict[str, tuple[Any, Callable[[float], Callable[[Tensor], Tensor]]]] = {
    "final_logit_softcapping": (None, _softcap),
    "logit_scale": (1.0, lambda s: (lambda lg: lg * s)),
    "logits_scaling": (1.0, lambda s: (lambda lg: lg / s)),
}


def post_head(config: Any) -> Callable[[Tensor], Tensor]:
    """The function the model applies to its output embeddings' result (the identity for most)."""
    get = getattr(config, "get_text_config", lambda: config)
    fns = []
    for attr, (neutral, make) in POST_HEAD.items():
        v = getattr(get(), attr, None)
        if v is not None and v != neutral:
            fns.append(make(float(v)))

    def apply(lg: Tensor) -> Tensor:
        for f in fns:
            lg = f(lg)
        return lg

    return apply


def _grad_safe(calls: list[list[Any]]) -> list[list[Any]]:
    """The runner's block calls with every tensor cloned out of inference mode (autograd cannot save
    an inference tensor for backward: the rotary tables are); a tensor shared by several blocks'
    calls is cloned once."""
    from ..pipeline import BlockCall

    memo: dict[int, Tensor] = {}

    def conv(v: Any) -> Any:
        if isinstance(v, Tensor):
            if id(v) not in memo:
                memo[id(v)] = v.clone() if v.is_inference() else v
            return memo[id(v)]
        if isinstance(v, tuple):
            return tuple(conv(x) for x in v)
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return [[BlockCall(conv(c.args), conv(c.kwargs)) for c in per_block] for per_block in calls]


def _fill_head(skel: nn.Module, store: Any, dev: torch.device) -> nn.Module:
    """The output embeddings filled in float32 on ``dev``: from their own tensor, or from the input
    embeddings' when tied and the checkpoint stores only those."""
    head = skel.get_output_embeddings() if hasattr(skel, "get_output_embeddings") else None
    if head is None or not sk.is_linear(head):
        raise UnsupportedModelError(f"{type(skel).__name__}: no linear output head to take the Fisher pass's gradient from")
    names = {m: n for n, m in skel.named_modules()}
    inp = skel.get_input_embeddings()
    sd = {}
    for k in (k for k in head.state_dict() if "." not in k):
        key = f"{names[head]}.{k}"
        if key not in store.where and k == "weight" and getattr(skel.config, "tie_word_embeddings", False) and inp in names:
            key = f"{names[inp]}.weight"
        sd[k] = store.get(key).float().to(dev)
    head.load_state_dict(sd, assign=True, strict=True)
    for p in head.parameters():
        p.requires_grad_(False)
    return head


def _head_grads(skel: nn.Module, store: Any, last: list[Tensor], blocks: nn.ModuleList,
                prefix: str, dev: torch.device, gen: torch.Generator) -> list[Tensor]:
    """∂ Σ_t log p(y_t) / ∂ (the last block's output), one (B, T, H) per batch, y_t sampled from p."""
    from ..pipeline import _load_when_called

    head = _fill_head(skel, store, dev)
    post = post_head(skel.config)
    handles, loaded = _load_when_called(skel, prefix, store, dev)
    loaded.append(head)  # filled above
    caught: dict[str, Tensor] = {}

    def catch(_m: nn.Module, args: tuple) -> tuple | None:
        if "x" in caught or not caught.get("armed"):  # the model's own call only, not the chunks below
            return None
        caught["x"] = args[0]  # (B, T, H), in the graph of the last boundary state
        return (args[0][:, -1:].detach(),)  # the model makes only the last position's logits

    handles.append(head.register_forward_pre_hook(catch))
    cur: dict[str, Tensor] = {}
    for b in blocks:
        b.forward = lambda *a, **k: a[0] if a else k["hidden_states"]  # an instance attribute: called first
    blocks[-1].forward = lambda *a, **k: cur["h"]
    width = skel.get_input_embeddings().weight.shape[-1]  # its shape, known on meta
    extra = {"use_cache": False} if hasattr(skel.config, "use_cache") else {}
    grads = []
    try:
        for h in last:
            cur["h"] = h.detach().requires_grad_()
            caught["armed"] = True
            with torch.enable_grad():
                # zeros for the embeddings (the blocks are skipped, their output is ``h``): the input
                # embeddings are neither loaded nor called (the walk left their rebuilt buffers on meta)
                embeds = torch.zeros(*h.shape[:2], width, dtype=h.dtype, device=dev)  # (B, T, E)
                logits = skel(inputs_embeds=embeds, **extra).logits  # (B, 1, V)
                x = caught.pop("x")
                caught.clear()
                with torch.no_grad():
                    mine = post(head(x[:, -1:]))
                if not torch.allclose(mine.float(), logits.float(), rtol=1e-5, atol=1e-6):  # the same operations
                    raise UnsupportedModelError(f"{type(skel).__name__}: its logits are not its output head's (with "
                                                f"{', '.join(POST_HEAD)}); the Fisher pass cannot make them in chunks")
                del logits, mine
                xl = x.detach().requires_grad_()
                flat = xl.reshape(-1, xl.shape[-1])  # (B·T, H)
                rows = max(1, LOGITS_CHUNK_BYTES // (4 * _out_features(head)))
                for a in range(0, flat.shape[0], rows):
                    logp = torch.log_softmax(post(head(flat[a : a + rows])).float(), -1)  # (rows, V)
                    y = torch.multinomial(logp.detach().exp(), 1, generator=gen)  # (rows, 1)
                    logp.gather(1, y).sum().backward()
                    del logp, y
                torch.autograd.backward(x, xl.grad)
            grads.append(cur.pop("h").grad)
            del x, xl, flat
    finally:
        for b in blocks:
            del b.forward
        for hd in handles:
            hd.remove()
        for m in loaded:
            sk.release(m)
    return grads


def fisher_weights(model: str | Path, ids: Tensor, batch_size: int = 4, keep: str = r"lm_head", seed: int = 0,
                   device: str | torch.device | None = "cpu", progress: bool = False) -> dict[str, Tensor]:
    """f_i = mean over the tokens of ``ids`` (samples, seq_len) of g_{t,i}², per linear of the blocks
    whose name ``keep`` does not match: {name: (out,) float64 on the CPU}. Block by block (module doc)."""
    from ..device import resolve_device
    from ..pipeline import _block_out, _start_walk, open_walkable, walk_forward

    dev = resolve_device(device)
    _, store, skel = open_walkable(model)
    rx = re.compile(keep)
    walk = _start_walk(skel, store, ids, batch_size, dev)
    blocks, prefix = walk.blocks, walk.prefix
    calls = _grad_safe(walk.calls)
    bounds: list[list[Tensor] | None] = [[h.clone() for h in walk.hs]]  # bounds[i]: block i's inputs, per batch
    for _, outs in walk_forward(walk, store, bounds[0], dev, calls, desc="fisher fwd", progress=progress):
        bounds.append(outs)
    del walk
    gen = torch.Generator(device=dev).manual_seed(seed)
    grads = _head_grads(skel, store, bounds.pop(), blocks, prefix, dev, gen)
    acc: dict[str, Tensor] = {}
    for i in tqdm(reversed(range(len(blocks))), total=len(blocks), desc="fisher bwd", disable=not progress, unit="block"):
        block, bp = blocks[i], f"{prefix}{i}."
        sk.fill(block, bp, store.get, dtype=torch.float32)
        sk.move(block, dev)
        for p in block.parameters():
            p.requires_grad_(False)
        lin = {f"{bp}{n}": m for n, m in block.named_modules() if sk.is_linear(m) and not rx.search(f"{bp}{n}")}
        for n, m in lin.items():
            acc[n] = torch.zeros(_out_features(m), dtype=torch.float64, device=dev)
        handles = [m.register_forward_hook(_grab(acc[n])) for n, m in lin.items()]
        down = []
        try:
            for h, kw, g in zip(bounds[i], calls[i], grads):
                x = h.detach().requires_grad_()  # block 0's too: its linears' outputs need their gradients
                with torch.enable_grad():
                    out = _block_out(block, x, kw)
                    torch.autograd.backward(out, g)
                down.append(x.grad if i > 0 else None)
                del out
        finally:
            for hd in handles:
                hd.remove()
            sk.release(block)
        grads, bounds[i] = down, None
    tokens = ids.numel()
    return {n: (a / max(1, tokens)).cpu() for n, a in acc.items()}


def _out_features(m: nn.Module) -> int:
    """A linear's output width (GPT-2's Conv1D stores its weight (in, out))."""
    return int(m.weight.shape[1] if type(m).__name__ == "Conv1D" else m.weight.shape[0])


def _grab(acc: Tensor) -> Callable:
    """A forward hook adding Σ_t g_t² (per output channel) of the linear's output gradient to ``acc``."""
    def on_grad(g: Tensor) -> None:  # (B, T, out)
        acc.add_(g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0))

    def fwd(_m: nn.Module, _args: tuple, out: Tensor) -> None:
        if out.requires_grad:
            out.register_hook(on_grad)

    return fwd

