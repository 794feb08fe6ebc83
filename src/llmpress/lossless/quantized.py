"""Which tensors of a quantized folder hold bit-packed codes, and where their zero points are.

A registry of folder kinds, each read from the folder's own description (never from tensor
values): llmpress's lossy folders (``llmpress.json``: each quantized linear's ``qweight`` with its
``bits``; an integer zero point ``zero`` on the ``asymz`` grid) and compressed-tensors'
``pack-quantized`` folders (``config.json``'s ``quantization_config``: each ``weight_packed``'s
bits from the config group whose targets name its module; ``weight_zero_point`` packed along the
output dimension). A folder no reader recognises, or whose description does not read, names
nothing: its bytes are packed as bytes. Codes of 8 bits are bytes already and are not named.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .fields import CODES
from .zeros import ZeroRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodesSpec:
    bits: int  # 1..7
    zero: ZeroRef | None = None  # the codes' zero points, where the quantizer has integer ones


def _llmpress(root: Path) -> dict[str, CodesSpec]:
    from ..errors import LlmpressError
    from ..io.folder import MANIFEST, read_manifest

    if not (root / MANIFEST).is_file():
        return {}
    try:
        tensors = read_manifest(root)["tensors"]
    except LlmpressError as e:
        log.debug("%s: no codes from its manifest (%s)", root, e)
        return {}
    out = {}
    for param, entry in tensors.items():
        meta, keys = entry.get("meta") or {}, entry.get("keys", ())
        bits = meta.get("bits")
        if "qweight" not in keys or type(bits) is not int or bits not in CODES:
            continue
        zero = None
        shape, gs = meta.get("shape"), meta.get("group_size")
        if meta.get("grid") == "asymz" and "zero" in keys and "g_idx" not in keys and \
                isinstance(shape, list) and len(shape) == 2 and type(gs) is int:
            cols = int(shape[1])
            zero = ZeroRef(f"{param}.zero", cols, gs if 0 < gs < cols else cols, "value")
        out[f"{param}.qweight"] = CodesSpec(bits, zero)
    return out


def _ct_matches(name: str, target: str) -> bool:
    """compressed-tensors' module match: ``re:`` a regex (re.match), else the name or ``Linear``."""
    if target.startswith("re:"):
        try:
            return re.match(target[3:], name) is not None
        except re.error:
            return False
    return target in (name, "Linear")


def _compressed_tensors(root: Path) -> dict[str, CodesSpec]:
    from .segments import read_safetensors_header

    try:
        q = json.loads((root / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return {}
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors":
        return {}
    groups = q.get("config_groups") or {}
    out: dict[str, CodesSpec] = {}
    for shard in sorted(root.glob("*.safetensors")):
        try:
            _, hdr = read_safetensors_header(shard)
        except Exception as e:  # noqa: BLE001 - a shard that does not read is packed as bytes
            log.debug("%s: no codes (%s)", shard, e)
            continue
        for name, info in hdr.items():
            if not name.endswith(".weight_packed") or not isinstance(info, dict):
                continue
            module = name[: -len(".weight_packed")]
            w = next((g.get("weights") or {} for g in groups.values() if isinstance(g, dict) and
                      (g.get("format") or q.get("format")) == "pack-quantized" and
                      any(_ct_matches(module, t) for t in g.get("targets") or [] if isinstance(t, str))), None)
            shape = info.get("shape")
            if not w or type(w.get("num_bits")) is not int or w["num_bits"] not in CODES or \
                    info.get("dtype") not in ("I32", "U32") or not (isinstance(shape, list) and len(shape) == 2):
                continue
            bits = w["num_bits"]
            row = int(shape[1]) * 32 // bits  # codes per stored row, padding included
            zero = None
            zname = f"{module}.weight_zero_point"
            if not w.get("symmetric", True) and zname in hdr and row:
                gs = w.get("group_size")
                zero = ZeroRef(zname, row, gs if w.get("strategy") == "group" and type(gs) is int and gs > 0 else row,
                               "packed")
            out[name] = CodesSpec(bits, zero)
    return out


# folder kind -> its reader (a folder is read by the first that names something)
READERS: dict[str, Callable[[Path], dict[str, CodesSpec]]] = {
    "llmpress": _llmpress,
    "compressed-tensors": _compressed_tensors,
}


def quantized_of(root: Path) -> dict[str, CodesSpec]:
    """{stored tensor name: CodesSpec} of a quantized folder's bit-packed codes; {} for any other."""
    for kind, read in READERS.items():
        found = read(Path(root))
        if found:
            log.debug("%s: %d codes tensors (%s)", root, len(found), kind)
            return found
    return {}

