"""Lossless benchmark: llmpress vs ZipNN vs zstd -3 on all-MiniLM-L6-v2 (FP32 as shipped, BF16, FP8) and SmolLM2-135M (FP8, GGUF).

    .venv/bin/python bench/lossless.py [--reps 3]
    .venv/bin/python bench/lossless.py --files BF16 FP8 SmolLM2-FP8 --tools "llmpress (rans)" "zstd -3" --out lossless-fp8.json
    .venv/bin/python bench/lossless.py --files BF16 GGUF-Q4_1 GGUF-Q4_K_M --tools "llmpress (rans)" "llmpress (smallest)" "zstd -3" --out lossless-gguf.json
    .venv/bin/python bench/lossless.py --kernel   # the head streams' rANS decode alone, ns/symbol
    .venv/bin/python bench/lossless.py --stages   # each encode/decode stage on BF16, ms and ns/word
    .venv/bin/python bench/lossless.py --folders GPTQ-4b-g128 GPTQ-4b-g128-BF16 CT-4b-g128 --reps 2

Ratio = compressed size / file size (whole safetensors file, header included); encode and
decode throughput in MB/s of the original file (best of ``--reps``, the reps of all tools
interleaved), at 1 and 2 threads.
llmpress decode = ``verify(sha256=False)``: decode everything in memory and check every
chunk's checksum (xxh3 since container v4; the chunks cover every byte); ``dec+sha`` adds the serial sha256 of each whole file
(what ``unpack``/``verify`` do by default). The compiled kernels are loaded (warm-up) before
timing. ZipNN
runs in its own venv (bench/.venvs/zipnn, created here with the torch pin) in a subprocess,
on a copy of the bytes (it reorders the buffer it is given). Results: bench/out/lossless.json
(``--out``), with the command, commit and date.

FP8 inputs (``FP8``, ``FP8-E5M2``: MiniLM; ``SmolLM2-FP8``) are cast as FP8 releases store their
weights (:func:`fp8_file`): every 2-D float tensor (linears and embeddings) → float8 with an F32
``…weight_scale`` beside it, absmax / the format's largest value per output channel (``--fp8-scale
channel``, compressed-tensors' channel strategy: (out, 1)) or per tensor (``tensor``: a scalar);
1-D tensors (norms, biases) in BF16. For each FP8 input the bench prints its entropy bounds: the
whole file's chunk-adaptive bound (every tensor's fields at their per-chunk order-0 entropy,
non-tensor bytes raw) and, over the FP8 tensors alone, the order-0 bits per word of three ways to
split the byte (the one 256-symbol field; exponent ‖ mantissa + sign, what llmpress codes; sign ‖
exponent + mantissa), the parts H(sign), H(exponent), H(mantissa | exponent), and the byte's
entropy given its row or its column of the matrix (a model per row or per column, its cost not
counted, estimated from the counts: an optimistic floor for a row- or column-adaptive coder). ZipNN is not run
on the FP8 inputs (no FP8 dtype is wired to it here); zstd -3 is their general-purpose baseline.

``--folders``: quantized folders (``.llmp`` format 6): an llmpress GPTQ 4-bit g128 SmolLM2 folder
(``GPTQ-4b-g128``, its unquantized tensors FP32 as written: the embedding is the embedded Q4_1 grid;
``GPTQ-4b-g128-BF16``, those tensors in BF16 as a release ships them) and its compressed-tensors
export (``CT-4b-g128``). Each is packed twice — codes against their zero points, and without
(format 2's codes) — and broken down: bits a code of the codes stream, bits of scale + zero point a
group, the rest; zstd -3 of the folder's files beside them; decode MB/s beside the BF16 file's.

GGUF inputs (``GGUF-Q4_1``: the packaged SmolLM2 GGUF, Q4_1 linears and a Q8_0 embedding;
``GGUF-Q4_K_M``: SmolLM2 quantized by llmpress with llama.cpp's Q4_K_M mix and exported as GGUF,
:func:`gguf_q4_k_m`) are packed as themselves (lossless/gguf.py: each block type's fields coded
apart). For each the bench prints, per block type, the packed bits a weight of each field (codes,
scales, mins, block parameters) beside its chunk-adaptive bound, and the file's bound; their
decode speed is compared with the BF16 input's (``dec/BF16``). ZipNN is not run on them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
VENV = HERE / ".venvs" / "zipnn"
TORCH_PIN = "torch==2.13.0"
sys.path.insert(0, str(HERE))
from _record import record  # noqa: E402

ZIPNN_SCRIPT = r"""
import json, sys, time, zipnn
path, dtype, threads, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = open(path, "rb").read()
z = zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype, threads=threads)
z.decompress(bytearray(bytes(z.compress(bytearray(data)))))  # warm-up, untimed (as llmpress's kernels are loaded first)
enc = dec = float("inf")
for _ in range(reps):
    buf = bytearray(data)                      # zipnn reorders the buffer it is given
    t = time.perf_counter(); c = bytes(z.compress(buf)); enc = min(enc, time.perf_counter() - t)
    t = time.perf_counter(); d = z.decompress(bytearray(c)); dec = min(dec, time.perf_counter() - t)
assert bytes(d) == data, "zipnn round trip failed"
print(json.dumps({"bytes_out": len(c), "enc_s": enc, "dec_s": dec}))
"""


def ensure_zipnn() -> Path:
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import zipnn"], capture_output=True).returncode == 0:
        return py
    print("creating", VENV, "(torch pin first, then zipnn)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    pin = VENV / "pin.txt"
    pin.write_text(TORCH_PIN + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", TORCH_PIN], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "-c", pin, "zipnn"], check=True)
    return py


def _model_file(name: str) -> Path:
    from llmpress.models import resolve

    return resolve(name).path / "model.safetensors"


def bf16_file(model: str) -> Path:
    from safetensors.torch import load_file, save_file
    import torch

    out = OUT / f"{model}-bf16.safetensors"
    if not out.exists():
        sd = load_file(str(_model_file(model)))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, str(out))
    return out


FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}


def fp8_file(model: str, fmt: str, scale: str) -> Path:
    """``model``'s checkpoint as an FP8 release (see the module's docstring), written once under OUT."""
    from safetensors.torch import load_file, save_file
    import torch

    out = OUT / f"{model}-fp8-{fmt}-{scale}.safetensors"
    if out.exists():
        return out
    dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    sd, o = load_file(str(_model_file(model))), {}
    for k, v in sd.items():
        if v.ndim == 2 and v.is_floating_point():
            w = v.float()  # (out, in)
            a = w.abs().amax(dim=1, keepdim=True) if scale == "channel" else w.abs().max()
            s = (a / FP8_MAX[fmt]).clamp(min=1e-12)  # (out, 1) or ()
            o[k] = (w / s).to(dtype)
            o[k + "_scale" if k.endswith("weight") else k + ".weight_scale"] = s
        else:
            o[k] = v.to(torch.bfloat16) if v.is_floating_point() else v
    save_file(o, str(out))
    return out


def gguf_q4_1(scale: str) -> Path:
    """The packaged SmolLM2 GGUF (Q4_1 linears, a Q8_0 embedding), as shipped."""
    from llmpress.models import _smollm2_gguf

    return _smollm2_gguf()


def gguf_q4_k_m(scale: str) -> Path:
    """SmolLM2-135M as a Q4_K_M GGUF that llmpress writes: ``quantize --method rtn --gguf-mix
    q4_k_m`` (llama.cpp's type per tensor: Q4_K, Q6_K, and Q5_0 where a row is not whole 256-blocks)
    then ``export --format gguf --type q8_0`` (the embedding as Q8_0); made once under OUT (~4 min)."""
    out = OUT / "smollm2-q4_k_m-rtn.gguf"
    if out.exists():
        return out
    folder = OUT / "smollm2-q4_k_m-rtn"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    py = [sys.executable, "-m", "llmpress"]
    subprocess.run([*py, "quantize", "smollm2-135m", "-o", folder, "--method", "rtn", "--gguf-mix", "q4_k_m", "--force"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run([*py, "export", folder, "-o", out, "--format", "gguf", "--type", "q8_0", "--force"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def gguf_fields(path: Path) -> dict:
    """A GGUF file's breakdown after ``pack``: per block type, each field's packed bits a weight
    (codes, scales, mins, the block parameters; a parameter's float fields summed) beside its
    chunk-adaptive entropy bound, and the whole file's bound (fields at their bound, other bytes as packed)."""
    from llmpress.lossless.container import pack
    from llmpress.lossless.gguf import BLOCKS
    from llmpress.lossless.reader import Packed

    types: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=OUT) as d:
        out = Path(d) / "g.llmp"
        pack(path, out, threads=2)
        with Packed(out) as p:
            other = p.size - sum(c[1] for f in p.index["files"] for s in f["segments"] if "gguf" in s for c in s["chunks"])
            bound = 0.0
            for _, s in p.tensors():
                if "gguf" not in s:
                    continue
                bt, st = BLOCKS[s["gguf"]], s["stats"]
                t = types.setdefault(s["gguf"], {"weights": 0, "bytes": 0, "packed_bits": {}, "bound_bits": {}})
                t["weights"] += s["length"] // bt.block_bytes * bt.weights
                t["bytes"] += s["length"]
                for k, v in st["field_bytes"].items():
                    t["packed_bits"][k] = t["packed_bits"].get(k, 0) + 8 * v
                for k, v in st["field_bits"].items():
                    t["bound_bits"][k] = t["bound_bits"].get(k, 0) + v
                    bound += v / 8
    for t in types.values():
        n = t["weights"]
        t["bits_per_weight"] = 8 * t["bytes"] / n
        t["packed_bpw"] = {k: v / n for k, v in t.pop("packed_bits").items()}
        t["bound_bpw"] = {k: v / n for k, v in t.pop("bound_bits").items()}
    size = path.stat().st_size
    return {"types": types, "bound_ratio": (bound + other) / size}


# label -> (the input file's builder, given the FP8 scale strategy; ZipNN's dtype name, None: not run)
INPUTS = {
    "FP32": (lambda sc: _model_file("minilm-l6"), "float32"),
    "BF16": (lambda sc: bf16_file("minilm-l6"), "bfloat16"),
    "FP8": (lambda sc: fp8_file("minilm-l6", "e4m3", sc), None),
    "FP8-E5M2": (lambda sc: fp8_file("minilm-l6", "e5m2", sc), None),
    "SmolLM2-FP8": (lambda sc: fp8_file("smollm2-135m", "e4m3", sc), None),
    "GGUF-Q4_1": (gguf_q4_1, None),
    "GGUF-Q4_K_M": (gguf_q4_k_m, None),
}


def inputs(labels: tuple[str, ...] | list[str] = ("FP32", "BF16"), fp8_scale: str = "channel") -> dict[str, Path]:
    return {k: INPUTS[k][0](fp8_scale) for k in labels}


def _h_bits(counts) -> float:
    """n · H0 of a histogram, bits."""
    import numpy as np

    c = np.asarray(counts, np.float64)
    c = c[c > 0]
    return float(-(c * np.log2(c / c.sum())).sum()) if c.size else 0.0


def _h_given(ctx, sym, nctx: int) -> float:
    """Σ over contexts of n_c · H0(sym | c), bits: ctx, sym (n,) int64, sym < 256."""
    import numpy as np

    t = np.bincount(ctx * 256 + sym, minlength=nctx * 256).reshape(nctx, 256).astype(np.float64)
    tot = t.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(-np.nansum(t * np.log2(t / tot)))


def fp8_bounds(path: Path, chunk_bytes: int = 512 << 10) -> dict:
    """The FP8 input's entropy bounds (see the module's docstring): a ratio of the file's bytes,
    and bits per FP8 word (order 0 per tensor)."""
    import numpy as np

    from llmpress.lossless.bounds import chunk_bound_bits
    from llmpress.lossless.fields import LAYOUTS
    from llmpress.lossless.segments import chunks_of, plan_file

    data = np.fromfile(path, np.uint8)
    chunk_bits, n8 = 0.0, 0
    alt = dict.fromkeys(("byte", "exp|man + sign", "sign|exp + man", "H(sign)", "H(exp)", "H(man|exp)",
                         "H(byte|row)", "H(byte|col)"), 0.0)
    for seg in plan_file(path):
        raw = data[seg.offset : seg.offset + seg.length]
        if seg.kind != "tensor":
            chunk_bits += 8.0 * seg.length
            continue
        for o, ln in chunks_of(seg, chunk_bytes):
            chunk_bits += chunk_bound_bits(raw[o : o + ln], seg.dtype)[0]
        if not seg.dtype.startswith("F8") or not seg.length:
            continue
        M = LAYOUTS[seg.dtype].M
        b = raw.astype(np.int64)  # (n,) one FP8 word each
        n8 += len(b)
        h_em, h_s, h_e = (_h_bits(np.bincount(x)) for x in (b & 0x7F, b >> 7, (b & 0x7F) >> M))
        alt["byte"] += _h_bits(np.bincount(b))
        alt["exp|man + sign"] += h_em + h_s
        alt["sign|exp + man"] += _h_bits(np.bincount(b >> M)) + _h_bits(np.bincount(b & ((1 << M) - 1)))
        alt["H(sign)"] += h_s
        alt["H(exp)"] += h_e
        alt["H(man|exp)"] += h_em - h_e
        rows, cols = (seg.shape[0], len(b) // seg.shape[0]) if len(seg.shape) == 2 else (1, len(b))  # (R, C)
        alt["H(byte|row)"] += _h_given(np.arange(len(b)) // cols, b, rows)
        alt["H(byte|col)"] += _h_given(np.arange(len(b)) % cols, b, cols)
    return {"bound_chunk_ratio": chunk_bits / 8 / len(data), "fp8_words": n8,
            "fp8_bits_per_word": {k: v / max(n8, 1) for k, v in alt.items()}}


def warm_up() -> None:
    """Load the compiled kernels (numba, cache=True) once, so no throughput counts them."""
    import torch
    from safetensors.torch import save_file

    from llmpress.lossless.container import pack, verify

    with tempfile.TemporaryDirectory(dir=OUT) as d:
        src = Path(d) / "w.safetensors"
        g = torch.Generator().manual_seed(0)
        save_file({"a": torch.randn(300, 300, generator=g).to(torch.bfloat16), "b": torch.randn(300, 300, generator=g),
                   "c": torch.randn(30, generator=g).half(), "d": torch.randn(300, 300, generator=g).to(torch.float8_e4m3fn),
                   "e": torch.randn(30, generator=g).to(torch.float8_e5m2)}, str(src))
        for policy in ("rans", "ans", "zstd"):
            pack(src, Path(d) / "w.llmp", force=True, policy=policy)
            verify(Path(d) / "w.llmp")


def run_llmpress(path: Path, threads: int, reps: int, policy: str) -> dict:
    from llmpress.lossless.container import pack, verify

    enc = dec = dsha = dcpu = float("inf")
    with tempfile.TemporaryDirectory(dir=OUT) as d:
        out = Path(d) / "x.llmp"
        for _ in range(reps):
            out.unlink(missing_ok=True)  # deleting the last rep's output is not encoding
            t = time.perf_counter()
            pack(path, out, threads=threads, policy=policy)
            enc = min(enc, time.perf_counter() - t)
            t, c = time.perf_counter(), time.process_time()
            verify(out, threads=threads, sha256=False)
            dec, dcpu = min(dec, time.perf_counter() - t), min(dcpu, time.process_time() - c)
            t = time.perf_counter()
            verify(out, threads=threads)
            dsha = min(dsha, time.perf_counter() - t)
        return {"bytes_out": out.stat().st_size, "enc_s": enc, "dec_s": dec, "dec_sha_s": dsha, "dec_cpu_s": dcpu}


def run_zstd(path: Path, threads: int, reps: int) -> dict:
    import zstandard

    data = path.read_bytes()
    enc = dec = dcpu = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        c = zstandard.ZstdCompressor(level=3, threads=threads if threads > 1 else 0).compress(data)
        enc = min(enc, time.perf_counter() - t)
        t, cp = time.perf_counter(), time.process_time()
        d = zstandard.ZstdDecompressor().decompress(c)
        dec, dcpu = min(dec, time.perf_counter() - t), min(dcpu, time.process_time() - cp)
    assert d == data
    return {"bytes_out": len(c), "enc_s": enc, "dec_s": dec, "dec_cpu_s": dcpu}


def run_zipnn(py: Path, path: Path, dtype: str, threads: int, reps: int) -> dict:
    r = subprocess.run([py, "-c", ZIPNN_SCRIPT, str(path), dtype, str(threads), str(reps)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode:
        raise RuntimeError(f"zipnn failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def kernel_only(reps: int) -> None:
    """Time stages of one thread's decode on every float chunk's head stream (the rANS part):
    the model read + decode table, the rANS kernel alone, and the whole ``decode_stream``."""
    import struct

    import numpy as np

    from llmpress.lossless import kernels as K
    from llmpress.lossless import freq_model as FM
    from llmpress.lossless import rans32 as R32
    from llmpress.lossless.chunk import encode_chunk
    from llmpress.lossless.container import _chunks_of
    from llmpress.lossless.entropy import BY_ID, decode_stream
    from llmpress.lossless.segments import plan_file

    def best(fn) -> float:
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    for label, path in inputs().items():
        data = np.fromfile(path, np.uint8)
        heads = []  # (backend, payload, n)
        for seg in plan_file(path):
            if seg.dtype not in ("F32", "BF16"):
                continue
            for o, ln in _chunks_of(seg, 512 << 10):  # as pack cuts them
                c = encode_chunk(data[seg.offset + o : seg.offset + o + ln], seg.dtype)[0]
                bid, plen = struct.unpack_from("<BI", c, 1)
                heads.append((bid, c[6 : 6 + plen], ln // (4 if seg.dtype == "F32" else 2)))
        n = sum(h[2] for h in heads)
        prep = []  # (kernel, words, n, decode tables..., pb, out): 32-lane (rans) or four-lane (rans4) streams
        for bid, pl, m in heads:
            b = np.frombuffer(pl, np.uint8)
            f = np.zeros(1024, np.int64)
            pb, used = FM.read_model(b, 1024, f)
            if pb <= 0:
                continue
            if BY_ID[bid].name == "rans":
                prep.append((R32.decode, b[used:], m, *K.decode_table(f, pb), pb, np.empty(m, np.uint16)))
            else:
                prep.append((K.rans_decode, b[used:].view("<u2"), m, *K.decode_table(f, pb), pb, np.empty(m, np.uint16)))
        t_k = best(lambda: [k(w, m, ds, di, pb, o) for k, w, m, ds, di, pb, o in prep])
        t_s = best(lambda: [decode_stream(bid, memoryview(pl), m, 10) for bid, pl, m in heads])
        print(f"{label}: {len(heads)} head streams, {n} symbols: rANS kernel {t_k * 1e9 / n:.2f} ns/symbol, "
              f"decode_stream {t_s * 1e9 / n:.2f} ns/symbol ({t_s * 1e3 / (n * 2 / 2**20):.2f} ms per MiB of decoded u16 head)")


def stages(reps: int) -> None:
    """One thread, per stage, on every BF16 chunk of MiniLM (256 Ki words each): the encode and
    decode kernels of the head (32-lane vector and scalar, four-lane rans4), the tail, the merge
    and the checksums. Prints ms and ns a word."""
    import hashlib
    import zlib

    import numpy as np
    import xxhash

    from llmpress.lossless import kernels as K
    from llmpress.lossless import rans32 as S
    from llmpress.lossless.container import _chunks_of
    from llmpress.lossless.entropy import RANS_PB
    from llmpress.lossless.fields import layout
    from llmpress.lossless.segments import plan_file

    path = inputs()["BF16"]
    data = np.fromfile(path, np.uint8)
    chunks = [data[s.offset + o : s.offset + o + ln] for s in plan_file(path) if s.dtype == "BF16"
              for o, ln in _chunks_of(s, 512 << 10)]
    lay = layout("BF16")

    def best(fn, r: int = reps) -> float:
        t = float("inf")
        for _ in range(r):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t * 1e3

    def each(fn, xs) -> None:  # results dropped at once, as the codec does (a list of them would
        for x in xs:           # time the page faults of ~90 MB of fresh arrays instead)
            fn(x)

    prep = []  # (head, freqs, pb, tail)
    for c in chunks:
        (head, tail), (h, _) = lay.split_hist(c)
        k = int(np.count_nonzero(h))
        if k >= 2:
            pb = max(RANS_PB, (k - 1).bit_length())
            prep.append((head, K.normalize_freqs(h, pb), pb, tail, h))
    n = sum(len(p[0]) for p in prep)
    es = [S.encode(s, f, pb) for s, f, pb, *_ in prep]
    e4 = [K.rans_encode(s, f, pb) for s, f, pb, *_ in prep]
    t32 = [K.decode_table(f, pb) for _, f, pb, *_ in prep]
    outs = [np.empty(len(p[0]), np.uint16) for p in prep]
    packed = [K.pack_bits(p[3], 6) for p in prep]
    tails = [np.empty(len(p[0]), np.uint8) for p in prep]
    rows = {
        "enc: split fields + histograms": lambda: each(lay.split_hist, chunks),
        "enc: normalize frequencies": lambda: [K.normalize_freqs(h, pb) for _, _, pb, _, h in prep],
        "enc: head rANS 32 lanes (rans)": lambda: [S.encode(s, f, pb) for s, f, pb, *_ in prep],
        "enc: head rANS 32 lanes, portable": lambda: [S.encode_portable(s, f, pb) for s, f, pb, *_ in prep],
        "enc: head rANS 4 lanes (rans4)": lambda: [K.rans_encode(s, f, pb) for s, f, pb, *_ in prep],
        "enc: tail bit-pack (6 bits)": lambda: [K.pack_bits(p[3], 6) for p in prep],
        "dec: decode tables": lambda: [K.decode_table(f, pb) for _, f, pb, *_ in prep],
        "dec: head rANS 32 lanes (rans)": lambda: [S.decode(b, len(o), ds, di, p[2], o) for b, (ds, di), p, o in zip(es, t32, prep, outs)],
        "dec: head rANS 32 lanes, portable": lambda: [S.decode_portable(b, len(o), ds, di, p[2], o) for b, (ds, di), p, o in zip(es, t32, prep, outs)],
        "dec: head rANS 4 lanes (rans4)": lambda: [K.rans_decode(w, len(o), ds, di, p[2], o) for w, (ds, di), p, o in zip(e4, t32, prep, outs)],
        "dec: tail unpack (6 bits)": lambda: [K.unpack_bits(b, 6, t) for b, t in zip(packed, tails)],
        "dec: merge head and tail": lambda: each(lambda ot: lay.merge(list(ot), len(ot[0])), zip(outs, tails)),
        "chunk crc32 (zlib, for comparison)": lambda: [zlib.crc32(c) for c in chunks],
        "chunk xxh3-64 (stored)": lambda: [xxhash.xxh3_64_intdigest(c) for c in chunks],
        "file sha256": lambda: hashlib.sha256(data).digest(),
    }
    print(f"BF16 MiniLM, {len(chunks)} chunks, {n} head symbols, one thread (best of {reps})")
    for name, fn in rows.items():
        t = best(fn)
        print(f"  {name:38s} {t:8.2f} ms {t * 1e6 / n:6.2f} ns/word")
    assert all((o == p[0]).all() for o, p in zip(outs, prep))


# ---------------------------------------------------------------- quantized folders (format 6)


def gptq_folder() -> Path:
    """An llmpress GPTQ 4-bit g128 folder of SmolLM2-135M: the frontier bench's, else made here."""
    for f in (OUT / "frontier" / "gptq-w4-g128", OUT / "gptq-w4-g128"):
        if (f / "llmpress.json").is_file():
            return f
    import llmpress

    out = OUT / "gptq-w4-g128"
    llmpress.quantize("smollm2-135m", out, method="gptq", bits=4, group_size=128, progress=False)
    return out


def gptq_bf16_folder() -> Path:
    """The GPTQ folder as a release would ship it: every tensor kept unquantized (embedding, norms)
    in BF16, codes, scales and zero points as they were; the manifest's shard sha256 updated."""
    import hashlib
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = OUT / "gptq-w4-g128-bf16"
    if (out / "llmpress.json").is_file():
        return out
    src = gptq_folder()
    tmp = OUT / "gptq-w4-g128-bf16.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    sd = load_file(str(src / "model.safetensors"))
    keep = {k for k in sd if not k.endswith((".qweight", ".scale", ".zero", ".g_idx", ".in_scale"))}
    save_file({k: v.to(torch.bfloat16) if k in keep and v.dtype == torch.float32 else v for k, v in sd.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    m = json.loads((tmp / "llmpress.json").read_text())
    m["files"]["model.safetensors"] = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
    (tmp / "llmpress.json").write_text(json.dumps(m, indent=1))
    tmp.replace(out)
    return out


def ct_folder() -> Path:
    """The GPTQ folder exported to compressed-tensors (pack-quantized). SmolLM2's 576-wide inputs are
    not whole groups of 128, which compressed-tensors cannot hold: those linears are re-quantized by
    the export's fallback (``--fallback requantize``: RTN on its own grid), down_proj keeps GPTQ's codes."""
    from llmpress.targets.api import export

    out = OUT / "ct-w4-g128"
    if not (out / "config.json").is_file():
        export(gptq_folder(), out, format="compressed-tensors", fallback="requantize")
    return out


FOLDERS = {"GPTQ-4b-g128": gptq_folder, "GPTQ-4b-g128-BF16": gptq_bf16_folder, "CT-4b-g128": ct_folder}


def _folder_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def folder_breakdown(folder: Path, res: dict, plain: dict) -> dict:
    """Per part of a quantized folder's pack: codes (bits a code; and without zero points),
    scales + zero points (bits a group), the rest; stored sizes beside them."""
    from llmpress.lossless.quantized import quantized_of
    from llmpress.lossless.segments import plan_file

    found = quantized_of(folder)
    zeros = {s.zero.tensor for s in found.values() if s.zero is not None}
    stored = {g.name: g.length for f in folder.glob("*.safetensors") for g in plan_file(f) if g.kind == "tensor"}
    scales = {n for n in stored if n.endswith((".scale", ".weight_scale"))}
    t = res["tensors"]
    n_codes = sum(8 * stored[n] // found[n].bits for n in found)
    groups = sum(stored[n] // 4 if n.endswith(".weight_scale") and folder.name.startswith("ct") else stored[n] // 2
                 for n in scales)  # F32 scales in the CT export, F16 in llmpress's
    part = lambda names, r=res: sum(r["tensors"][n]["packed"] for n in names)  # noqa: E731
    codes_b, codes_plain = part(found), part(found, plain)
    gp_b, gp_stored = part(scales | zeros), sum(stored[n] for n in scales | zeros)
    rest_in = res["bytes_in"] - sum(stored[n] for n in found) - gp_stored
    rest_out = res["bytes_out"] - codes_b - gp_b
    return {"codes": len(found), "bits": sorted({s.bits for s in found.values()}), "n_codes": n_codes,
            "codes_bits_per_code": 8 * codes_b / n_codes, "codes_bits_per_code_no_zero": 8 * codes_plain / n_codes,
            "codes_stored_bits": 8 * sum(stored[n] for n in found) / n_codes,
            "codes_ratio": codes_b / sum(stored[n] for n in found),
            "groups": groups, "group_params_bits": 8 * gp_b / groups, "group_params_stored_bits": 8 * gp_stored / groups,
            "rest_bytes_in": rest_in, "rest_bytes_out": rest_out, "rest_ratio": rest_out / rest_in,
            "embed_bytes_in": sum(v["bytes"] for k, v in t.items() if "embed" in k),
            "embed_bytes_out": sum(v["packed"] for k, v in t.items() if "embed" in k)}


def decode_segments(path: Path, keep, threads: int, reps: int) -> dict:
    """Decode only the segments ``keep(segment)`` of a ``.llmp`` (every chunk checked, as verify does):
    bytes out, best wall and CPU seconds of ``reps``."""
    import llmpress.lossless.container as C

    wall = cpu = float("inf")
    n = 0
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        with C.Packed(path) as p, C._pool(threads) as ex:
            n = 0
            for f in p.index["files"]:
                for part in p.iter_chunks(f, [s for s in f["segments"] if keep(s)], ex):
                    n += len(part)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return {"bytes": n, "MBps": n / wall / 1e6, "cpu_MBps": n / cpu / 1e6}


def quantized_bench(labels: list[str], reps: int, out_name: str) -> None:
    """Each quantized folder: llmpress's pack (and the same without zero points: format 2's plain
    codes) against zstd -3 of the folder's files, with the per-part breakdown; decode MB/s beside
    the BF16 MiniLM file's (the BF16 path), same threads, reps interleaved."""
    import zstandard

    import llmpress.lossless.container as C
    from llmpress.lossless.quantized import CodesSpec

    rec = record()
    warm_up()
    rows = []
    folders = {k: FOLDERS[k]() for k in labels}
    bf16 = bf16_file("minilm-l6")
    th = 2
    os.environ["OMP_NUM_THREADS"] = str(th)
    with tempfile.TemporaryDirectory(dir=OUT) as d:
        dec_ref = run_llmpress(bf16, th, reps, "rans")
        ref_MBps = bf16.stat().st_size / dec_ref["dec_s"] / 1e6
        ref_pack = Path(d) / "bf16.llmp"
        C.pack(bf16, ref_pack, threads=th)
        ref_one = decode_segments(ref_pack, lambda s: s["dtype"] == "BF16", 1, max(reps, 3))  # the BF16 path, 1 thread
        for label, folder in folders.items():
            x, y = Path(d) / f"{label}.llmp", Path(d) / f"{label}-plain.llmp"
            res = C.pack(folder, x, threads=th, force=True)
            real = C.quantized_of
            C.quantized_of = lambda root: {k: CodesSpec(v.bits) for k, v in real(root).items()}  # no zero points
            try:
                plain = C.pack(folder, y, threads=th, force=True)
            finally:
                C.quantized_of = real
            dec = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                C.verify(x, threads=th, sha256=False)
                dec = min(dec, time.perf_counter() - t0)
            codes_one = decode_segments(x, lambda s: "codes" in s, 1, max(reps, 3))  # the codes path, 1 thread
            data = _folder_bytes(folder)
            z = len(zstandard.ZstdCompressor(level=3).compress(data))
            with C.Packed(x) as p:
                version = p.version
            b = folder_breakdown(folder, res, plain)
            row = {"folder": label, "path": str(folder), "bytes_in": res["bytes_in"], "bytes_out": res["bytes_out"],
                   "ratio": res["ratio"], "ratio_no_zero": plain["ratio"], "zstd3_ratio": z / len(data),
                   "version": version, "dec_MBps": res["bytes_in"] / dec / 1e6, "dec_vs_BF16": res["bytes_in"] / dec / 1e6 / ref_MBps,
                   "codes_dec_1t_MBps": codes_one["MBps"], "codes_dec_1t_cpu_MBps": codes_one["cpu_MBps"],
                   "codes_dec_vs_BF16_cpu": codes_one["cpu_MBps"] / ref_one["cpu_MBps"],
                   **b}
            rows.append(row)
            print(f"{label}: ratio {row['ratio']:.4f}", file=sys.stderr)
    result = {**rec, "cpus": os.cpu_count(), "reps": reps, "threads": th, "bf16_ref_dec_MBps": ref_MBps,
              "bf16_tensors_dec_1t_MBps": ref_one["MBps"], "bf16_tensors_dec_1t_cpu_MBps": ref_one["cpu_MBps"], "rows": rows}
    out = OUT / out_name
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"command: {rec['command']}\ncommit: {rec['commit']}   date: {rec['date']}   cpus: {os.cpu_count()}   threads: {th}")
    print("ratio: .llmp / the folder's bytes (all files); no-zero: the codes coded without their zero points (format 2's "
          "codes); codes b/c: bits a code (stored 4.0); grp b: bits of scale + zero point a group (stored); rest: "
          "everything else (embedding, norms, headers, config, tokenizer) packed / stored; dec: MB/s of output, "
          f"and over the BF16 MiniLM file's {ref_MBps:.1f} MB/s ({th} threads); codes 1t: the codes segments alone, "
          f"one thread, MB/s of output by CPU time, and over the BF16 MiniLM tensors' {ref_one['cpu_MBps']:.0f} MB/s")
    print(f"\n{'folder':18s} {'MB':>6s} {'ratio':>7s} {'no-zero':>7s} {'zstd -3':>7s} {'codes b/c':>9s} {'no-zero':>7s} "
          f"{'codes':>6s} {'grp b':>12s} {'rest':>6s} {'dec MB/s':>8s} {'/BF16':>6s} {'codes 1t':>8s} {'/BF16':>6s} ver")
    for r in rows:
        print(f"{r['folder']:18s} {r['bytes_in'] / 1e6:6.1f} {r['ratio']:7.4f} {r['ratio_no_zero']:7.4f} "
              f"{r['zstd3_ratio']:7.4f} {r['codes_bits_per_code']:9.3f} {r['codes_bits_per_code_no_zero']:7.3f} "
              f"{r['codes_ratio']:6.4f} {r['group_params_bits']:5.1f} ({r['group_params_stored_bits']:4.1f}) "
              f"{r['rest_ratio']:6.4f} {r['dec_MBps']:8.1f} {r['dec_vs_BF16']:6.2f} {r['codes_dec_1t_cpu_MBps']:8.0f} "
              f"{r['codes_dec_vs_BF16_cpu']:6.2f} {r['version']}")
    print(f"\nwrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kernel", action="store_true", help="time the head rANS decode alone (1 thread)")
    ap.add_argument("--stages", action="store_true", help="time each encode/decode stage on BF16 (1 thread)")
    ap.add_argument("--files", nargs="+", default=["FP32", "BF16"], choices=sorted(INPUTS), help="which inputs")
    ap.add_argument("--fp8-scale", choices=("channel", "tensor"), default="channel",
                    help="the FP8 inputs' weight scales: per output channel or per tensor")
    ap.add_argument("--tools", nargs="+", default=None, help="only these tools (e.g. 'llmpress (rans)' zipnn)")
    ap.add_argument("--out", default="lossless.json", help="results file name under bench/out/")
    ap.add_argument("--folders", nargs="+", choices=sorted(FOLDERS), default=None,
                    help="quantized folders instead of files: their codes, scales/zero points and the rest, "
                         "llmpress vs zstd -3 (results: --out, default lossless-quantized.json)")
    args = ap.parse_args()
    if args.folders:
        OUT.mkdir(parents=True, exist_ok=True)
        quantized_bench(args.folders, args.reps, args.out if args.out != "lossless.json" else "lossless-quantized.json")
        return
    if args.kernel or args.stages:
        OUT.mkdir(parents=True, exist_ok=True)
        warm_up()
        (kernel_only if args.kernel else stages)(max(args.reps, 5))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    zpy = ensure_zipnn() if not args.tools or "zipnn" in args.tools else None  # its venv only when it runs
    rec = record()
    warm_up()
    rows = []
    files = inputs(args.files, args.fp8_scale)
    bounds = {label: fp8_bounds(path) for label, path in files.items() if "FP8" in label}
    ggufs = {label: gguf_fields(path) for label, path in files.items() if label.startswith("GGUF")}
    for th in args.threads:
        os.environ["OMP_NUM_THREADS"] = str(th)
        runs = {}  # (file, tool) -> one timed run
        for label, path in files.items():
            tools = {
                "llmpress (rans)": lambda p=path: run_llmpress(p, th, 1, "rans"),
                "llmpress (ans)": lambda p=path: run_llmpress(p, th, 1, "ans"),
                "llmpress (zstd)": lambda p=path: run_llmpress(p, th, 1, "zstd"),
                "llmpress (smallest)": lambda p=path: run_llmpress(p, th, 1, "smallest"),
                "zipnn": lambda p=path, lb=label: run_zipnn(zpy, p, INPUTS[lb][1], th, 1),
                "zstd -3": lambda p=path: run_zstd(p, th, 1),
            }
            runs.update({(label, k): v for k, v in tools.items() if (not args.tools or k in args.tools)
                         and (k != "zipnn" or INPUTS[label][1])})
        # reps interleaved across files and tools (one each, round after round), best of each: on
        # a shared machine a burst of load then hits every file and tool alike, not one's reps
        best: dict[tuple[str, str], dict] = {}
        for _ in range(args.reps):
            for key, fn in runs.items():
                r = fn()
                b = best.setdefault(key, r)
                for k in ("enc_s", "dec_s", "dec_sha_s", "dec_cpu_s"):
                    if k in r:
                        b[k] = min(b[k], r[k])
        for (label, name), r in best.items():
            size = files[label].stat().st_size
            rows.append({"file": label, "tool": name, "threads": th, "bytes_in": size, "bytes_out": r["bytes_out"],
                         "ratio": r["bytes_out"] / size, "enc_MBps": size / r["enc_s"] / 1e6,
                         "dec_MBps": size / r["dec_s"] / 1e6,
                         "dec_sha_MBps": size / r["dec_sha_s"] / 1e6 if "dec_sha_s" in r else None,
                         "dec_cpu_MBps": size / r["dec_cpu_s"] / 1e6 if "dec_cpu_s" in r else None})
            print(f"{label} {name:16s} t={th} ratio {rows[-1]['ratio']:.4f}", file=sys.stderr)
    # each FP8 input's decode speed against the BF16 input's, same tool and threads: by wall time
    # and by the process's CPU time (on a shared machine the wall time counts others' turns)
    by = {(r["file"], r["tool"], r["threads"]): r for r in rows}
    for r in rows:
        ref = by.get(("BF16", r["tool"], r["threads"]))
        fp8 = ref is not None and (r["file"] in bounds or r["file"] in ggufs)
        r["dec_vs_BF16"] = r["dec_MBps"] / ref["dec_MBps"] if fp8 else None
        r["dec_cpu_vs_BF16"] = r["dec_cpu_MBps"] / ref["dec_cpu_MBps"] if fp8 and r["dec_cpu_MBps"] else None
    result = {**rec, "cpus": os.cpu_count(), "reps": args.reps,
              "fp8_scale": args.fp8_scale, "rows": rows, "bounds": bounds, "gguf": ggufs}
    out = OUT / args.out
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"command: {rec['command']}\ncommit: {rec['commit']}   date: {rec['date']}   cpus: {os.cpu_count()}")
    for label, b in bounds.items():
        parts = "  ".join(f"{k} {v:.3f}" for k, v in b["fp8_bits_per_word"].items())
        print(f"{label} ({args.fp8_scale} scales): chunk-adaptive bound {b['bound_chunk_ratio']:.4f} of the file; "
              f"FP8 words, order-0 bits/word: {parts}")
    for label, g in ggufs.items():
        print(f"{label}: chunk-adaptive bound {g['bound_ratio']:.4f} of the file (GGUF fields at their bound, "
              "other bytes as packed); bits a weight, packed (bound):")
        for name, t in g["types"].items():
            parts = "  ".join(f"{k} {t['packed_bpw'][k]:.3f} ({t['bound_bpw'][k]:.3f})" for k in t["packed_bpw"])
            print(f"  {name:5s} {t['weights']:>11,} weights, {t['bits_per_weight']:.3f} stored -> "
                  f"{sum(t['packed_bpw'].values()):.3f}: {parts}")
    print("dec cpu: MB per second of the process's CPU time; dec/BF16: this input's decode MB/s over the BF16 "
          "input's (same tool, threads), wall and cpu")
    print(f"\n{'file':11s} {'tool':19s} {'thr':>3s} {'ratio':>7s} {'enc MB/s':>9s} {'dec MB/s':>9s} {'dec+sha':>8s} "
          f"{'dec cpu':>8s} {'dec/BF16 wall  cpu':>18s}")
    for r in rows:
        f = lambda k, w=8, p=1: f"{r[k]:{w}.{p}f}" if r.get(k) else " " * w  # noqa: E731
        print(f"{r['file']:11s} {r['tool']:19s} {r['threads']:3d} {r['ratio']:7.4f} {r['enc_MBps']:9.1f} "
              f"{r['dec_MBps']:9.1f} {f('dec_sha_MBps')} {f('dec_cpu_MBps')} {f('dec_vs_BF16', 13, 2)} {f('dec_cpu_vs_BF16', 5, 2)}")
    print(f"\nwrote {out}")



if __name__ == "__main__":
    main()
