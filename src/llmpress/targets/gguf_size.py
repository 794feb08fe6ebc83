"""The size of a GGUF export before it exists: what an allocation to a file size must know.

``fixed_bytes(model, linears, type)`` is the size of the file ``llmpress export OUT --format gguf
--type <type>`` writes for a compression of ``model``, less the bytes of the given linears'
tensor data: the header, the key-value metadata (hyperparameters, tokenizer) and the tensor
table — built by the export's own calls (:func:`.gguf.add_metadata`) and written to a scratch
file to be measured — plus every other tensor in the type the export gives it, each padded to
the file's alignment. A linear's own bytes are :func:`llmpress.sweep.menu.gguf_tensor_bytes`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from . import ExportSource
from .gguf import add_metadata, kept_type_of, parse_type, tensor_plan
from .gguf_arch import arch_of


def _nbytes(qtype: T, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def fixed_bytes(model: str | Path, linears: set[str], kept_type: str | None = "q8_0") -> int:
    """Bytes of the GGUF export of a compression of ``model`` besides the tensor data of
    ``linears`` (checkpoint weight names); ``kept_type``: the export's ``--type``."""
    from ..quant.gguf_mix import model_shapes

    kept = parse_type(kept_type)
    _, stored = model_shapes(str(model))
    with ExportSource(model) as src:
        cfg = src.config
        arch = arch_of(cfg)
        with tempfile.TemporaryDirectory(prefix="llmpress-gguf-size-") as tmp:
            path = Path(tmp) / "header.gguf"
            w = gguf.GGUFWriter(path, arch.gguf)
            add_metadata(w, src, arch, quantized=True)
            w.add_file_type(gguf.LlamaFileType.GUESSED)  # its value does not change the size
            data = 0
            for gname, names in tensor_plan(src, arch):
                shape = stored[names[0]]
                if src.module_types.get(names[0].rpartition(".")[0]) == "Conv1D" and len(shape) == 2:
                    shape = shape[::-1]  # written as (out, in)
                if len(names) > 1:
                    shape = (len(names), *shape)
                if all(n in linears for n in names):
                    qtype = T.F32  # the tensor table's entry is the same size whatever its type
                else:
                    qtype = kept_type_of(gname, shape, kept)
                    data += gguf.GGUFWriter.ggml_pad(_nbytes(qtype, shape), w.data_alignment)
                w.add_tensor_info(gname, shape, np.dtype(np.float32), 0, raw_dtype=qtype)
            for gname, t in arch.extra(cfg).items():
                shape = tuple(t.shape)
                data += gguf.GGUFWriter.ggml_pad(_nbytes(T.F32, shape), w.data_alignment)
                w.add_tensor_info(gname, shape, np.dtype(np.float32), 0, raw_dtype=T.F32)
            try:
                w.write_header_to_file(path)
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                w.flush()
                header = path.stat().st_size
            finally:
                w.close()
    return gguf.GGUFWriter.ggml_pad(header, w.data_alignment) + data

