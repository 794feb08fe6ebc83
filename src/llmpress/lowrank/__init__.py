"""Low-rank factorization: plain, randomized, whitened (SVD-LLM) and activation-scaled (ASVD)
truncated SVD, rank allocation, and low-rank together with quantization.

Importing this package registers the codecs ``svd``, ``rsvd``, ``whiten``, ``asvd`` and the
combinations (see ``combo.py``). "ratio" is the fraction of linear-layer parameters *kept*
(see ``allocate.py``).
"""
from . import asvd, svd, whiten  # noqa: E402,F401
from . import combo  # noqa: F401  (register the codecs)
from .linear import LowRankLinear

__all__ = ["LowRankLinear"]
