"""Low-rank factorization: plain, randomized, whitened (SVD-LLM) and activation-scaled (ASVD)
truncated SVD, rank allocation, and low-rank together with quantization.

Importing this package registers the codecs (recipe ``method`` names):

=================  ===========================================================================
``svd``            plain truncated SVD, exact (``torch.linalg.svd``): min ‖W − W'‖
``rsvd``           the same by randomized sketching (``torch.svd_lowrank``; oversample, niter)
``whiten``         SVD-LLM whitened SVD from the Gram matrix X Xᵀ: min ‖(W − W')X‖
``asvd``           ASVD: SVD of W·diag(mean|x|^α), the scale folded back
``<base>+q``       ``svd+q`` ``rsvd+q`` ``whiten+q`` ``asvd+q``: factorize, then quantize U and V
``lqer``           quantize (default gptq), then add a whitened low-rank correction of the error
=================  ===========================================================================

Params: one of ``rank``, ``ratio``, ``energy``. "ratio" is the fraction of a layer's parameters
*kept*: rank k stores k(m + n) of m·n, so ``ratio: 0.8`` removes 20 % (see ``allocate.py``).
"""
from . import asvd, svd, whiten  # noqa: E402,F401
from . import combo  # noqa: F401  (register the codecs)
from .linear import LowRankLinear

__all__ = ["LowRankLinear"]
