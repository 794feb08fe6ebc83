"""The ``dense`` export: a plain Hugging Face folder of float weights that any engine loads.

Each compressed linear is stored as the weight llmpress decodes, in its checkpoint layout; every
other tensor as it was. ``dtype`` chooses the float type of the decoded weights: ``float32``
(the default) holds llmpress's decoded values exactly; ``bfloat16`` / ``float16`` halve the size
and round them (the largest rounding error is reported). Tokenizer files, chat template and
generation config are copied; ``config.json`` is the source's without llmpress's
``quantization_config``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..io.folder import FolderWriter, copy_side_files
from ..quant.rotate import apply_steps
from ..tensor import CompressedTensor
from . import ExportSource, Target, register_target

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_target("dense")
class Dense(Target):
    fallbacks = ()  # every layer is representable: there is nothing to fall back from
    folds_online = True  # an online rotation goes back into the weights (quant/rotate.py unrotation: W H Hᵀ)

    def why_not(self, ct: CompressedTensor, **opts: Any) -> str | None:
        return None

    def write(self, src: ExportSource, out: Path, actions: dict[str, str], *, dtype: str = "float32",
              shard_bytes: int = 2 << 30, **opts: Any) -> dict[str, Any]:
        if dtype not in DTYPES:
            raise InputError(f"dense export: dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        to = DTYPES[dtype]
        writer = FolderWriter(out, shard_bytes=shard_bytes)
        max_err = 0.0
        for e in src.entries():
            t = e.tensor()
            if e.name in src.unrotate:
                t = apply_steps(t, src.unrotate[e.name])
            if e.ct is not None:
                cast = t.to(to)
                max_err = max(max_err, float((cast.float() - t).abs().max()) if t.numel() else 0.0)
                t = cast
            writer.add_tensor(e.name, t)
        files = writer.finish_shards()
        copy_side_files(src.root, out)
        cfg = dict(src.config)
        if src.compressed_names:
            cfg["dtype"] = dtype
            cfg.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        return {"files": files, "dtype": dtype, "max_abs_rounding": max_err}
