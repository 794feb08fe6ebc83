"""A synthetic checkpoint with a real model's shapes and a real model's value distributions.

No weights can be downloaded here, yet the scale benchmark needs checkpoints of Llama-3-8B's
and Llama-3.2-1B's shapes whose lossless figures mean something (a BF16 file of Gaussian noise
compresses differently from a trained one: the exponent histogram is what the entropy coder
sees). So every tensor is drawn from the empirical distribution of the matching tensor of a
real model (SmolLM2-135M, the ``source``): the same kind (q_proj, down_proj, norm, ...) at the
same relative depth, through its quantile function (``QUANTILES`` quantiles at the midpoints of
equal probability steps, one drawn uniformly per value; SmolLM2's Q4_1 grid does not show
through, as every group of 32 has its own scale and offset), scaled by sqrt(fan-in ratio) for the
linear layers (a wider layer's weights are smaller by that factor in trained models, which is
what keeps the exponent histogram realistic rather than merely copied).

Writing streams: the safetensors header is computed from the shapes first, then each tensor is
drawn and written in row slices of ~``SLICE`` values, so memory stays at one slice whatever the
model size. Shards are balanced by bytes and indexed as ``from_pretrained`` expects.

    python bench/synth.py OUT --shape llama3-8b         # ~16 GB, 4 shards
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

QUANTILES = 1 << 16  # table entries: as fine as BF16's own spacing over a tensor's range
SLICE = 1 << 22  # values drawn at a time (~16 MiB of temporaries)


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture model's dimensions (the values of its HF config)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    shards: int
    rope_theta: float = 500000.0
    max_positions: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...], str, int | None]]:
        """(name, shape, kind, layer) of every tensor, in checkpoint order."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...], str, int | None]] = [("model.embed_tokens.weight", (self.vocab, h), "embed", None)]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,), "input_layernorm", i),
                (p + "self_attn.q_proj.weight", (h, h), "q_proj", i),
                (p + "self_attn.k_proj.weight", (kv, h), "k_proj", i),
                (p + "self_attn.v_proj.weight", (kv, h), "v_proj", i),
                (p + "self_attn.o_proj.weight", (h, h), "o_proj", i),
                (p + "post_attention_layernorm.weight", (h,), "post_attention_layernorm", i),
                (p + "mlp.gate_proj.weight", (self.intermediate, h), "gate_proj", i),
                (p + "mlp.up_proj.weight", (self.intermediate, h), "up_proj", i),
                (p + "mlp.down_proj.weight", (h, self.intermediate), "down_proj", i),
            ]
        out.append(("model.norm.weight", (h,), "norm", None))
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, h), "lm_head", None))
        return out

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "num_hidden_layers": self.layers, "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab, "tie_word_embeddings": self.tied, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_positions, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "bfloat16", "dtype": "bfloat16", "use_cache": True,
        }

    def nbytes(self) -> int:
        return sum(math.prod(s) for _, s, _, _ in self.tensors()) * 2


# The configs of the real models (meta-llama/Meta-Llama-3-8B, meta-llama/Llama-3.2-1B), and small
# stand-ins with the same traits for --quick.
SHAPES: dict[str, Shape] = {
    "llama3-8b": Shape(4096, 32, 14336, 32, 8, 128256, tied=False, shards=4),
    "llama3.2-1b": Shape(2048, 16, 8192, 32, 8, 128256, tied=True, shards=1),
    "llama3.2-1b-2l": Shape(2048, 2, 8192, 32, 8, 128256, tied=True, shards=1),  # 2 of its 16 blocks
    "quick-8b": Shape(1024, 2, 3584, 8, 2, 128256, tied=False, shards=2),
    "quick-1b": Shape(512, 2, 2048, 8, 2, 128256, tied=True, shards=1),
    "toy": Shape(64, 2, 160, 4, 2, 512, tied=False, shards=2),
}

# kind -> the source tensor's name pattern ({i}: its layer), and whether fan-in scaling applies
_SOURCE_OF: dict[str, tuple[str, bool]] = {
    "embed": ("model.embed_tokens.weight", False),
    "lm_head": ("model.embed_tokens.weight", True),  # SmolLM2's head is tied to its embedding
    "norm": ("model.norm.weight", False),
    "input_layernorm": ("model.layers.{i}.input_layernorm.weight", False),
    "post_attention_layernorm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    **{k: (f"model.layers.{{i}}.self_attn.{k}.weight", True) for k in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{k: (f"model.layers.{{i}}.mlp.{k}.weight", True) for k in ("gate_proj", "up_proj", "down_proj")},
}


class Quantiles:
    """Quantile tables of a source model's tensors, by kind and relative depth."""

    def __init__(self, get: Callable[[str], torch.Tensor], source_layers: int, seed: int = 0):
        self._get = get
        self.source_layers = source_layers
        self._cache: dict[str, tuple[torch.Tensor, int]] = {}
        self.rng = np.random.default_rng(seed)

    def table(self, kind: str, layer: int | None, layers: int) -> tuple[torch.Tensor, int]:
        """(QUANTILES float32 quantiles of the source tensor at the midpoints (k + ½)/QUANTILES, its fan-in)."""
        pattern, _ = _SOURCE_OF[kind]
        src_layer = 0 if layer is None else round(layer * (self.source_layers - 1) / max(1, layers - 1))
        name = pattern.format(i=src_layer)
        if name not in self._cache:
            src = self._get(name)
            t = src.float().flatten()
            if t.numel() > (1 << 24):  # quantiles of a sample: torch.quantile refuses more than 2^24 values
                t = t[torch.randperm(t.numel(), generator=torch.Generator().manual_seed(1))[: 1 << 24]]
            q = torch.quantile(t, (torch.arange(QUANTILES, dtype=torch.float64) + 0.5).div_(QUANTILES).float())
            self._cache[name] = (q, src.shape[-1])
        return self._cache[name]

    def bf16_table(self, kind: str, layer: int | None, layers: int, shape: tuple[int, ...]) -> np.ndarray:
        """The quantile table of a tensor of ``kind`` and ``shape`` as BF16 bit patterns (uint16),
        scaled by sqrt(source fan-in / fan-in) for linear weights."""
        q, src_fan_in = self.table(kind, layer, layers)
        if _SOURCE_OF[kind][1] and len(shape) == 2:
            q = q * math.sqrt(src_fan_in / shape[1])
        return q.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    def draw(self, table: np.ndarray, n: int) -> np.ndarray:
        """n values: the quantile function at uniform draws (an index into the table each), (n,) uint16."""
        return table.take(self.rng.integers(0, QUANTILES, n, dtype=np.uint16 if QUANTILES <= 1 << 16 else np.int64))


def _header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """A safetensors header (BF16 tensors in the given order), padded to 8 bytes with spaces."""
    hdr: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in entries:
        n = math.prod(shape) * 2
        hdr[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    b = json.dumps(hdr, separators=(",", ":")).encode()
    b += b" " * (-len(b) % 8)
    return struct.pack("<Q", len(b)) + b


def _shards(tensors: list, n: int) -> list[list]:
    """Split tensors, in order, into n runs of about equal bytes."""
    total = sum(math.prod(s) for _, s, _, _ in tensors)
    out: list[list] = [[] for _ in range(n)]
    acc = 0
    for t in tensors:
        k = min(n - 1, acc * n // max(1, total))
        out[k].append(t)
        acc += math.prod(t[1])
    return [s for s in out if s]


def _values(q: Quantiles, shape: Shape, kind: str, layer: int | None, dims: tuple[int, ...]) -> Iterator[bytes]:
    """The tensor's BF16 bytes, slice by slice."""
    table = q.bf16_table(kind, layer, shape.layers, dims)
    numel = math.prod(dims)
    for start in range(0, numel, SLICE):
        yield q.draw(table, min(SLICE, numel - start)).tobytes()


def source_getter(folder: Path) -> tuple[Callable[[str], torch.Tensor], int]:
    """(tensor getter, number of layers) of a source HF folder, read lazily."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    where = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            where.update({k: f for k in h.keys()})
    layers = 1 + max(int(m.group(1)) for k in where if (m := re.match(r"model\.layers\.(\d+)\.", k)))

    def get(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as h:
            return h.get_tensor(name)

    return get, layers


def write_checkpoint(out: Path, shape: Shape, source: Path, seed: int = 0) -> dict:
    """Write the synthetic checkpoint into the new folder ``out``: shards, index, config.json and
    the source's tokenizer files. Returns {"bytes", "files", "tensors"}."""
    if out.exists():
        raise FileExistsError(f"{out} exists")
    get, src_layers = source_getter(source)
    q = Quantiles(get, src_layers, seed)
    out.mkdir(parents=True)
    groups = _shards(shape.tensors(), shape.shards)
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        with open(out / fname, "wb") as f:
            f.write(_header([(n, s) for n, s, _, _ in group]))
            for name, dims, kind, layer in group:
                for b in _values(q, shape, kind, layer, dims):
                    f.write(b)
                weight_map[name] = fname
        log.info("wrote %s", fname)
    if len(groups) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": shape.nbytes()}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(shape.config(), indent=2))
    for p in source.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and p.is_file():
            shutil.copy2(p, out / p.name)
    return {"bytes": shape.nbytes(), "files": len(groups), "tensors": len(weight_map)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="toy")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from llmpress.models import resolve

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(write_checkpoint(a.out, SHAPES[a.shape], resolve("smollm2-135m").path, a.seed)))


if __name__ == "__main__":
    main()
