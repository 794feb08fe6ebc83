"""What an allocation may choose for each linear layer: named menus of options.

An :class:`Option` is one recipe rule's method and parameters. A menu (``MENUS``, by name) lists
the options it offers for a layer of a given shape and method:

* ``gptq`` / ``awq`` / ``rtn``: the method at 2, 3, 4 bits with groups of 64 and 128, 5 and 6 bits
  with groups of 128, and RTN at 8 bits, groups of 128 (the cheap fallback where the methods no
  longer differ);
* ``best``: the methods together, so each layer also chooses its method: GPTQ, AWQ and AWQ+GPTQ
  at 2, 3, 4 bits with groups of 64 and 128, GPTQ and RTN at 5 and 6 bits with groups of 128, RTN at
  2, 3, 4 bits too (the cheap fallback: it wins where the calibration misleads) and RTN 8-bit;
  ``best-quick``: a third of its encodings — GPTQ and AWQ+GPTQ at 2, 3, 4 bits with groups of 64,
  RTN at 4 and 8 bits with groups of 128;
* ``gptq-quick`` (the quick sweep's): GPTQ at 2, 3, 4 bits, groups of 64, and RTN 8-bit;
  ``near-lossless`` (the near-lossless search's mixed ladder, :mod:`.search`): GPTQ at 5 and 6 bits,
  groups of 128, and RTN 8-bit — the widths between which a mean KL of ~0.01 is crossed;
* ``gguf``: llama.cpp's types q2_k … q6_k and q8_0 as ``grid: gguf:<type>`` with the chosen
  method (GPTQ by default), each replaced by llama.cpp's fallback where the row width is not a
  multiple of its block (:mod:`llmpress.quant.gguf_mix`); fallbacks that make two options the
  same type leave one.

AWQ options are **unfolded** (``fold: false``): each layer searches and stores its own input
scale (``in_scale``, float16, counted in its cost). A folded scale is shared by the linears that
read one input (q/k/v, gate/up; :mod:`llmpress.quant.fold`) and searched for all of them at
once, so it exists only when the whole group is AWQ and its error depends on the group's
choices: it is not a per-layer option. Unfolded, what the sensitivity table measures for a layer
(:func:`.sensitivity.measure` encodes it alone) is what ``compress`` writes for it.

An option's **cost** is the bits its layer takes as stored: for a ``gguf`` type the bytes the
GGUF export writes for the tensor (its blocks, padded to the file's 32-byte alignment), for the
others the CompressedTensor's own count (codes, group parameters, metadata).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from ..tensor import CompressedTensor, get_codec
from ..errors import InputError

GGUF_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")
GGUF_ALIGN = 32  # gguf-py's default data alignment


@dataclass(frozen=True)
class Option:
    method: str
    params_json: str  # the rule's parameters, as sorted JSON (hashable)

    @classmethod
    def of(cls, method: str, **params: Any) -> "Option":
        return cls(method, json.dumps(params, sort_keys=True))

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    @property
    def gguf_type(self) -> str | None:
        g = str(self.params.get("grid", ""))
        return g.removeprefix("gguf:") if g.startswith("gguf:") else None

    @property
    def label(self) -> str:
        p = self.params
        if self.gguf_type:
            return f"{self.method}-{self.gguf_type}"
        return f"{self.method}-w{p['bits']}-g{p['group_size']}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Option":
        d = dict(d)
        return cls.of(d.pop("method"), **d)

    def cost_bits(self, shape: tuple[int, int], ct: CompressedTensor) -> int:
        """Bits the layer takes as stored with this option (``ct``: its encoding)."""
        t = self.gguf_type
        if t is None:
            return int(ct.nbits())
        return 8 * gguf_tensor_bytes(t, shape)


def gguf_tensor_bytes(gguf_type: str, shape: tuple[int, int]) -> int:
    """Bytes a GGUF file holds for an (out, in) tensor of ``gguf_type``: its blocks, padded to the alignment."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[gguf_type.upper()]]
    out, inp = shape
    if inp % block:
        raise InputError(f"{gguf_type}: rows of {inp} are not a multiple of its block of {block}")
    n = out * (inp // block) * size
    return -(-n // GGUF_ALIGN) * GGUF_ALIGN


# the parameters a method's options carry besides bits and group size (see the docstring: AWQ unfolded)
METHOD_PARAMS: dict[str, dict[str, Any]] = {"awq": {"fold": False}, "awq+gptq": {"fold": False}}


def _opts(method: str, bits: tuple[int, ...], groups: tuple[int, ...]) -> list[Option]:
    return [Option.of(method, bits=b, group_size=g, **METHOD_PARAMS.get(method, {})) for b in bits for g in groups]


def _grid_menu(method: str, groups: tuple[int, ...] = (64, 128), high: tuple[int, ...] = (5, 6),
               low: tuple[int, ...] = (2, 3, 4)) -> Callable[[tuple[int, int], str | None], list[Option]]:
    def options(shape: tuple[int, int], _method: str | None) -> list[Option]:
        return _opts(method, low, groups) + _opts(method, high, (128,)) + _opts("rtn", (8,), (128,))

    return options


def _best_menu(shape: tuple[int, int], _method: str | None) -> list[Option]:
    low, groups, high = (2, 3, 4), (64, 128), (5, 6)
    opts = [o for m in ("gptq", "awq", "awq+gptq", "rtn") for o in _opts(m, low, groups)]
    return opts + [o for m in ("gptq", "rtn") for o in _opts(m, high, (128,))] + _opts("rtn", (8,), (128,))


def _best_quick_menu(shape: tuple[int, int], _method: str | None) -> list[Option]:
    return [o for m in ("gptq", "awq+gptq") for o in _opts(m, (2, 3, 4), (64,))] + _opts("rtn", (4, 8), (128,))


def _gguf_menu(shape: tuple[int, int], method: str | None) -> list[Option]:
    from ..quant.gguf_mix import fallback

    seen: dict[str, Option] = {}
    for t in GGUF_TYPES:
        ft = fallback(t, shape[1])
        if ft != "f16" and ft not in seen:
            seen[ft] = Option.of(method or "gptq", grid=f"gguf:{ft}")
    return list(seen.values())


MENUS: dict[str, Callable[[tuple[int, int], str | None], list[Option]]] = {
    "gptq": _grid_menu("gptq"),
    "awq": _grid_menu("awq"),
    "rtn": _grid_menu("rtn"),
    "gptq-quick": _grid_menu("gptq", groups=(64,), high=()),  # the quick sweep's: a third of the encodings
    "near-lossless": _grid_menu("gptq", groups=(128,), low=()),
    "best": _best_menu,  # every method per layer
    "best-quick": _best_quick_menu,  # the quick sweep's size of it
    "gguf": _gguf_menu,
}
# menus whose options carry the method the user picks (--method)
TAKES_METHOD = {"gguf"}


def check_menu(menu: str, method: str | None) -> None:
    """Refuse an unknown menu or method before any work."""
    if menu not in MENUS:
        raise InputError(f"unknown menu {menu!r}; known: {', '.join(MENUS)}")
    if method is not None:
        if menu not in TAKES_METHOD:
            raise InputError(f"a method applies to the {', '.join(sorted(TAKES_METHOD))} menu only; the {menu} menu names its own")
        get_codec(method)


def options_for(menu: str, shape: tuple[int, int], method: str | None = None) -> list[Option]:
    """The options of ``menu`` an (out, in) layer can take (those its codec accepts for the shape)."""
    check_menu(menu, method)
    out = []
    for o in MENUS[menu](shape, method):
        if get_codec(o.method).why_not_shape(shape, o.params) is None:
            out.append(o)
    return out
