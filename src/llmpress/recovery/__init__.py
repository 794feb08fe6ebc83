"""Recovery training: win back a compressed model's quality without growing it.

Quantized layers train through their own quantizer (``qat``), low-rank layers train their
factors (``factors``), towards the original model's distributions (``distill``), in a CPU loop
with checkpoints (``loop``); ``api.finetune`` writes the result in the input's own format.
"""
from .api import finetune

__all__ = ["finetune"]
