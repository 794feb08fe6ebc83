"""Read a GGUF back and compare every tensor with the model it was exported from.

Each tensor is dequantized by gguf-py (``gguf.quants.dequantize``: the same arithmetic as ggml's
reference dequantization, in float32) and compared with what llmpress runs: a compressed layer's
``decode``, a kept tensor as stored (float32), with llama.cpp's q/k row order applied to the
reference. A layer written exactly differs by 0.0; a re-quantized or rounded one by its rounding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from . import ExportSource
from .gguf import tensor_plan
from .gguf_arch import arch_of
from .gguf_blocks import why_not_blocks


def verify(gguf_file: str | Path | gguf.GGUFReader, model: str | Path) -> dict[str, Any]:
    """{"layers": {gguf name: {"max_abs": float, "type": str, "exact_layer": bool}}, "max_abs_exact": the
    largest difference over the compressed layers stored as blocks (0.0 when the export is exact),
    "missing": checkpoint tensors llama.cpp reads that the file lacks, "extra": file tensors with
    no checkpoint tensor}. ``gguf_file``: a path or an open reader (reading a GGUF's metadata with
    gguf-py takes seconds for a 50k-token vocabulary; a caller that reads it anyway passes it)."""
    reader = gguf_file if isinstance(gguf_file, gguf.GGUFReader) else gguf.GGUFReader(str(gguf_file))
    layers: dict[str, dict[str, Any]] = {}
    with ExportSource(model) as src:
        arch = arch_of(src.config)
        wanted = dict(tensor_plan(src, arch))  # gguf name -> its checkpoint names (an MoE's experts: several)
        got = {t.name: t for t in reader.tensors}
        worst = 0.0
        for gname, names in wanted.items():
            if gname not in got:
                continue
            t = got[gname]
            perm = arch.row_perm(gname, src.config)
            refs, exact_layer = [], True
            for name in names:
                e = src.get(name)
                r = e.out_in().to(torch.float32)
                refs.append(r if perm is None else r[perm])
                exact_layer = exact_layer and e.ct is not None and why_not_blocks(e.ct) is None
            ref = refs[0] if len(refs) == 1 else torch.stack(refs)  # (E, out, in) for stacked experts
            deq = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            deq = deq.reshape(ref.shape)
            diff = float((deq - ref).abs().max()) if ref.numel() else 0.0
            if exact_layer:
                worst = max(worst, diff)
            layers[gname] = {"max_abs": diff, "type": t.tensor_type.name, "exact_layer": exact_layer,
                             "bitwise": bool(torch.equal(deq.view(torch.int32), ref.contiguous().view(torch.int32)))}
    return {"layers": layers, "max_abs_exact": worst,
            "missing": sorted(set(wanted) - set(got)), "extra": sorted(set(got) - set(wanted))}
