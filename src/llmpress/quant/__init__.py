"""Quantization: affine/NormalFloat/seed grids, presets (llama.cpp's block types and K-quants), bit-packing, RTN, GPTQ, AWQ, HQQ, QuantLinear.

Importing this package registers the codecs ``rtn``, ``gptq``, ``awq`` and ``hqq``.
"""
from . import awq, gptq, hqq, kquant, presets, rtn  # noqa: F401  (registration)
from .grids import GridSpec
from .linear import QuantLinear

__all__ = ["GridSpec", "QuantLinear"]
