"""RTN: round each weight to the nearest point of its group's grid (no calibration).

The grid, range choice and group layout come from :class:`~llmpress.quant.grids.GridSpec`
(``grid=seed`` gives the seed article's floor-rounding quantizer, ``grid=nf`` NormalFloat).
"""
from __future__ import annotations

from torch import Tensor

from ..tensor import Stats, register
from .codec import QuantCodec, QWeight, rtn_qweight
from .grids import GridSpec


@register("rtn")
class RTN(QuantCodec):
    def quantize(self, w: Tensor, stats: Stats | None, spec: GridSpec) -> QWeight:
        return rtn_qweight(w, spec)
