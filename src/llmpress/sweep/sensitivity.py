"""What each option costs the judge: predicted ΔKL(original ‖ compressed) per layer and option.

A second-order (Fisher) model of the KL on calibration tokens that accounts for how a layer's
error propagates to the output. One backward pass per calibration batch through the original
model, with labels sampled from the model's own output distribution, gives the gradient g_t of
Σ_s log p(y_s) at every linear's output; its mean square per output channel,
f_i = mean_t g_{t,i}², weighs that channel's output error. With ΔW = W − decode(encode(W, option))
— the real codec with the layer's real calibration Stats, so GPTQ's and AWQ's errors are theirs —
and H = Σ_t x_t x_tᵀ / n the input Gram matrix per token,

    ΔKL_l(option) ≈ ½ Σ_i f_i · ΔW_i H ΔW_iᵀ          (mean nats per token)

(the Fisher's cross terms between channels and between tokens dropped, g and x taken as
independent). Layers add up (HIGGS's linearity theorem), so the allocation minimizes Σ_l ΔKL_l.
The Stats are the original model's, walked block by block (``iter_stats``), and so are the Fisher
weights (``fisher.py``: forward keeping the block-boundary states, then backward a block at a time);
the table holds one block's Stats at a time. :func:`measured_dkl` gives the true ΔKL of a change, to check the
model against (``bench/alloc.py``).
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..tensor import get_codec
from .fisher import fisher_weights
from .menu import Option, options_for
from ..errors import InputError

log = logging.getLogger(__name__)

KEEP = r"lm_head|embed|wte|wpe|shared"  # left as they are: not allocated
FISHER_TOKENS = 4096  # calibration tokens the Fisher pass reads at most (its backward is the costly part)


@dataclass
class Choice:
    option: Option
    bits: int     # stored bits of the layer with this option
    dkl: float    # predicted ΔKL (nats per token) of this layer alone


@dataclass
class Table:
    """Every allocated layer's options with their cost and predicted ΔKL."""

    layers: dict[str, list[Choice]]
    numel: dict[str, int]
    shapes: dict[str, tuple[int, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({
            "layers": {n: [{"option": c.option.to_dict(), "bits": c.bits, "dkl": c.dkl} for c in cs]
                       for n, cs in self.layers.items()},
            "numel": self.numel, "shapes": {n: list(s) for n, s in self.shapes.items()}, "meta": self.meta,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Table":
        d = json.loads(text)
        return cls({n: [Choice(Option.from_dict(c["option"]), int(c["bits"]), float(c["dkl"])) for c in cs]
                    for n, cs in d["layers"].items()},
                   {n: int(v) for n, v in d["numel"].items()},
                   {n: (int(s[0]), int(s[1])) for n, s in d["shapes"].items()}, d.get("meta", {}))


def predicted_dkl(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor, n: int, f: torch.Tensor) -> float:
    """½ Σ_i f_i ΔW_i (H/n) ΔW_iᵀ for an (out, in) weight and its decoding (the product in
    float32, as many times faster than float64 as it matters: it runs for every layer and option)."""
    d = w.float() - w_hat.float()  # (out, in)
    g = gram if gram.dtype == torch.float32 else gram.float()
    q = ((d @ g) * d).double().sum(1) / max(1, n)  # (out,)
    return float(0.5 * (f.double() * q).sum())


def measure(model: str, menu: str, method: str | None = None, *, calib: str | None = None, samples: int = 32,
            seq_len: int = 512, batch_size: int = 4, keep: str = KEEP, progress: bool = True,
            device: str | None = "cpu") -> Table:
    """Predicted ΔKL and stored bits of every option of ``menu`` for every linear of ``model``: the
    Fisher weights block by block, then each block's Stats in turn (each Gram matrix freed once its
    last linear is measured), each linear read from the checkpoint alone."""
    from .. import skeleton as sk
    from ..device import resolve_device
    from ..models import TensorStore, load_tokenizer, resolve
    from ..pipeline import _calib_text, calib_ids, iter_stats

    t0 = time.perf_counter()
    dev = resolve_device(device)
    src = resolve(model)
    ids = calib_ids(load_tokenizer(src.name if src.kind == "embedded" else src.folder), _calib_text(calib), samples, seq_len)
    fisher = fisher_weights(model, ids[: max(1, FISHER_TOKENS // seq_len)], batch_size, keep, device=dev,
                            progress=progress)
    t1 = time.perf_counter()
    store = TensorStore(src)
    skel = sk.build_meta(sk.folder_config(src.folder))
    conv = {n for n, m in skel.named_modules() if type(m).__name__ == "Conv1D"}
    layers: dict[str, list[Choice]] = {}
    numel: dict[str, int] = {}
    shapes: dict[str, tuple[int, int]] = {}
    rx = re.compile(keep)
    for stats in iter_stats(model, calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size,
                            progress=progress, device=dev):
        order = list(stats)
        for j, (name, st) in enumerate(stats.items()):
            if rx.search(name):
                continue
            if name not in fisher:
                raise InputError(f"{name}: no Fisher weight (the Fisher pass saw no such linear); allocation "
                                 "does not support this model's layout")
            t = store.get(f"{name}.weight").float().to(dev)
            w = t.T.contiguous() if name in conv else t  # (out, in)
            shape = (int(w.shape[0]), int(w.shape[1]))
            opts = options_for(menu, shape, method)
            if not opts:
                raise InputError(f"{name} {shape}: the {menu} menu has no option for this shape")
            f = fisher[name].to(dev)
            g32 = st.gram.float()  # (in, in), once for every option
            row = []
            for o in opts:
                codec = get_codec(o.method)
                ct = codec.encode(w, st, **o.params)
                row.append(Choice(o, o.cost_bits(shape, ct), predicted_dkl(w, codec.decode(ct), g32, st.n, f)))
            layers[name], numel[name], shapes[name] = row, w.numel(), shape
            del w, t, g32, ct
            if not any(stats[m] is st for m in order[j + 1:]):  # its last reader: the block's largest tensors go
                st.gram = None
                st.derived.clear()
        del stats
    log.info("sensitivity: %d layers × %s menu in %.0f s (Fisher pass %.0f s)", len(layers), menu,
             time.perf_counter() - t0, t1 - t0)
    return Table(layers, numel, shapes, {"menu": menu, "method": method, "calib": calib, "samples": samples,
                                         "seq_len": seq_len, "seconds": time.perf_counter() - t0,
                                         "fisher_seconds": t1 - t0})


def load_or_measure(cache: Path | None, model: str, menu: str, method: str | None = None, **kw: Any) -> Table:
    """``measure``, kept in ``cache`` (JSON) for the next allocation of the same model and settings."""
    if cache is not None and cache.exists():
        return Table.from_json(cache.read_text())
    table = measure(model, menu, method, **kw)
    if cache is not None:
        from ..io.atomic import atomic_file

        with atomic_file(cache, force=True) as tmp:
            tmp.write_text(table.to_json())
    return table


@torch.no_grad()
def log_probs(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """The model's next-token log-probabilities on ``ids``, one (B, T, V) tensor per batch."""
    return [torch.log_softmax(model(input_ids=ids[i : i + batch_size], use_cache=False).logits.float(), -1)
            for i in range(0, ids.shape[0], batch_size)]


@torch.no_grad()
def measured_dkl(model: torch.nn.Module, ids: torch.Tensor, swaps: dict[str, torch.Tensor], batch_size: int = 4,
                 ref: list[torch.Tensor] | None = None) -> float:
    """True mean KL(original ‖ model with ``swaps``: {linear name: (out, in) weight}) on ``ids``
    (``ref``: the original's :func:`log_probs`, if already known); the weights are restored afterwards."""
    from .. import skeleton as sk

    ref = ref if ref is not None else log_probs(model, ids, batch_size)
    mods = {n: sk.get_module(model, n) for n in swaps}
    old = {n: sk.linear_weight(m).clone() for n, m in mods.items()}
    try:
        for n, m in mods.items():
            sk.set_linear_weight(m, swaps[n].to(old[n].dtype))
        new = log_probs(model, ids, batch_size)
    finally:
        for n, m in mods.items():
            sk.set_linear_weight(m, old[n])
    kl = sum(float((r.exp() * (r - q)).sum()) for r, q in zip(ref, new))
    return kl / ids.numel()
