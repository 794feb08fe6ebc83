"""Bit-packing of integer codes 0..2^b−1 into bytes, b ∈ {2, 3, 4, 5, 6, 8}.

Codes are packed in flat (row-major) order, little-endian within a byte: code i occupies
bits [b·i, b·i + b) of the stream. For b ∈ {2, 4, 8} a byte holds 8/b whole codes (shift and
mask, fast path); for b ∈ {3, 5, 6} eight codes fill exactly b bytes, unpacked through a
bit plane. Everything is vectorised torch on uint8; the packed size is ceil(n·b/8) bytes.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..errors import InputError


def packed_bytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


def _pack_whole(codes: Tensor, bits: int) -> Tensor:
    per = 8 // bits
    n = codes.numel()
    c = torch.nn.functional.pad(codes.reshape(-1), (0, (-n) % per)).reshape(-1, per)  # (N, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (c << shifts).sum(-1, dtype=torch.uint8) if per > 1 else c.reshape(-1).clone()


def _unpack_whole(packed: Tensor, bits: int, n: int) -> Tensor:
    per = 8 // bits
    if per == 1:
        return packed[:n]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(-1)[:n]


def _pack_planes(codes: Tensor, bits: int) -> Tensor:
    n = codes.numel()
    c = torch.nn.functional.pad(codes.reshape(-1), (0, (-n) % 8)).reshape(-1, 8)  # (N, 8) codes
    planes = (c.unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8, device=c.device)) & 1  # (N, 8, b) bits
    planes = planes.reshape(-1, bits, 8)  # (N, b, 8): the 8b-bit stream cut into b bytes
    return (planes << torch.arange(8, dtype=torch.uint8, device=planes.device)).sum(-1, dtype=torch.uint8).reshape(-1)[: packed_bytes(n, bits)]


def _unpack_planes(packed: Tensor, bits: int, n: int) -> Tensor:
    p = torch.nn.functional.pad(packed, (0, (-packed.numel()) % bits)).reshape(-1, bits)  # (N, b) bytes
    planes = (p.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=p.device)) & 1  # (N, b, 8)
    planes = planes.reshape(-1, 8, bits)  # (N, 8, b): bits of each code
    return (planes << torch.arange(bits, dtype=torch.uint8, device=planes.device)).sum(-1, dtype=torch.uint8).reshape(-1)[:n]


# bits -> (pack, unpack): a dispatch table, no if-chain.
PACKERS: dict[int, tuple[Callable[[Tensor, int], Tensor], Callable[[Tensor, int, int], Tensor]]] = {
    2: (_pack_whole, _unpack_whole),
    3: (_pack_planes, _unpack_planes),
    4: (_pack_whole, _unpack_whole),
    5: (_pack_planes, _unpack_planes),
    6: (_pack_planes, _unpack_planes),
    8: (_pack_whole, _unpack_whole),
}


def pack(codes: Tensor, bits: int) -> Tensor:
    """Integer codes (any shape, values 0..2^b−1) → uint8 (ceil(n·b/8),)."""
    if bits not in PACKERS:
        raise InputError(f"cannot pack {bits}-bit codes; supported: {sorted(PACKERS)}")
    c = codes.reshape(-1)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise InputError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    return PACKERS[bits][0](c.to(torch.uint8), bits)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """uint8 bytes → the first ``n`` codes, uint8 (n,)."""
    if bits not in PACKERS:
        raise InputError(f"cannot unpack {bits}-bit codes; supported: {sorted(PACKERS)}")
    if packed.numel() < packed_bytes(n, bits):
        raise InputError(f"{packed.numel()} bytes cannot hold {n} codes of {bits} bits")
    return PACKERS[bits][1](packed.reshape(-1), bits, n)
