"""Checksums used by the container formats."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import zlib

CHUNK = 1 << 22


def crc32(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_sha256(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root``, keyed by relative posix path."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
