"""A codes chunk (formats 2 and 6) decoded in one compiled call: its field, its zero points, its bytes.

chunk.decode_chunk's generic path decodes a codes chunk in steps, each a Python call: the field's
header parsed, the stream decoded into a fresh symbol array, the zero points added (a pass over
the output, or a per-code array of them), the symbols packed into a fresh array and copied out.
A quantized folder's codes are hundreds of small chunks (a 576 × 576 4-bit matrix is 166 KB), so
those steps cost as much as a fifth of the decode. Here one call without the GIL decodes the field
(chunk_kernel's parser and backends) straight into the output (bytes of codes: ``AS_BYTES``) or
into a reused symbol array, adds each code's zero point by runs of one group, and packs the codes
into the output words. Anything it does not handle (a zstd stream) or that does not decode returns
a nonzero code, and the caller takes the generic path, which names the problem.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import kernels as K
from .chunk_kernel import _field

LESS_ZEROS, AS_BYTES = 1, 2  # a format-6 chunk's mode bits (chunk.py)
_JIT = dict(nogil=True, cache=True, boundscheck=False)


@njit(**_JIT)
def _add_zero_syms(sym, width, table, row, group, first):  # sym: (m,) uint8, one code each, in place
    """Code ``first + j`` (sym[j]) plus its zero point mod 2^width, a run of one group at a time
    (zeros.py's layout: row ``i // row``, group ``(i % row) // group``; 0 past the table)."""
    m = sym.shape[0]
    mask = (1 << width) - 1
    nr, ng = table.shape[0], table.shape[1]
    r = first // row
    c = first - r * row
    j = 0
    while j < m:
        g = c // group
        run = min(group - c % group, row - c, m - j)
        z = np.uint8(table[r, g]) if r < nr and g < ng else np.uint8(0)
        if z != 0:
            y = sym[j : j + run]  # a view: the loop vectorises
            for k in range(run):
                y[k] = (y[k] + z) & mask
        j += run
        c += run
        if c == row:
            c = 0
            r += 1


@njit(**_JIT)
def decode_codes(buf, width, zeros, table, row, group, first, out, sym):
    """A codes chunk's payload ``buf`` (uint8) into ``out`` ((n,) uint8, the chunk's bytes):
    ``zeros`` 1 for a segment with zero points (a mode byte first: chunk.py's LESS_ZEROS, AS_BYTES),
    0 for format 2's (one field of ``width``-bit symbols); ``table`` (R, G) uint8 the zero points
    with ``row``, ``group`` and the chunk's ``first`` code (zeros.py); ``sym`` a scratch of at least
    ⌈8n/width⌉ bytes. 0 on success, nonzero where the generic path must run."""
    n = out.shape[0]
    m = (8 * n + width - 1) // width
    mode = 0
    pos = 0
    if zeros:
        if buf.shape[0] < 1 or buf[0] > LESS_ZEROS + AS_BYTES:
            return -1
        mode = np.int64(buf[0])
        pos = 1
    if buf.shape[0] < pos + 1 or buf[pos] != 1:
        return -1
    if mode & AS_BYTES:
        rc, end = _field(buf, pos + 1, 8, out)
        if rc != 0:
            return rc
        if end != buf.shape[0]:
            return -1
        if mode & LESS_ZEROS:
            K.add_zero_runs(out, width, table, row, group, first)
        return 0
    if sym.shape[0] < m:
        return -1
    s = sym[:m]
    rc, end = _field(buf, pos + 1, width, s)
    if rc != 0:
        return rc
    if end != buf.shape[0]:
        return -1
    if mode & LESS_ZEROS:
        _add_zero_syms(s, width, table, row, group, first)
    K.pack_into(s, width, out)
    return 0


@njit(**_JIT)
def half_table(words, lut, out):  # words: (R, G) uint16 half floats; lut: (65536,) uint8 -> out (R, G); the largest
    """A zero-point tensor of 16-bit floats as its integers (zeros._half_codes' look-up table: 255
    for a word that is not one), and the largest, in one pass (zeros.zero_table)."""
    top = 0
    for r in range(words.shape[0]):
        for g in range(words.shape[1]):
            v = lut[words[r, g]]
            out[r, g] = v
            top = max(top, np.int64(v))
    return top


@njit(**_JIT)
def decode_bytes(buf, out):  # buf: a one-field chunk payload of 8-bit symbols; out: (n,) uint8
    """A chunk of raw bytes (an integer tensor: compressed-tensors' packed zero points, say; a
    file's bytes) into ``out`` in one call; 0, or nonzero where the generic path must run."""
    if buf.shape[0] < 1 or buf[0] != 1:
        return -1
    rc, end = _field(buf, 1, 8, out)
    if rc != 0:
        return rc
    return 0 if end == buf.shape[0] else -1
