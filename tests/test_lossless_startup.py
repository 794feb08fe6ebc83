"""Start-up of the lossless path as a user sees it: a fresh process that packs, unpacks, verifies
or describes a file imports neither torch nor the lossy stack (bench/startup.py times it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Modules a lossless command must never import (each costs a second or more to import).
HEAVY = ("torch", "transformers", "ray", "llmpress.quant", "llmpress.pipeline")


def _bf16_file(path: Path) -> Path:
    """A small safetensors file (a BF16 matrix and an I64 vector), written without torch."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((64, 300), dtype=np.float32) * 0.02).view(np.uint32)
    a = (a >> 16).astype(np.uint16).tobytes()  # BF16: the top half of each FP32 word
    b = np.arange(5, dtype=np.int64).tobytes()
    header = {"a": {"dtype": "BF16", "shape": [64, 300], "data_offsets": [0, len(a)]},
              "b": {"dtype": "I64", "shape": [5], "data_offsets": [len(a), len(a) + len(b)]}}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + a + b)
    return path


def _fresh(code: str, tmp_path: Path, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """Run ``code`` in a fresh interpreter; it prints the heavy modules it ended up importing."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


CLI = "import sys\nfrom llmpress.cli import main\nsys.argv = ['llmpress', *{args!r}]\ntry:\n    main()\n" \
      "except SystemExit as e:\n    assert not e.code, e.code"


def test_lossless_cli_does_not_import_torch(tmp_path):
    """pack, unpack, verify and info (of a source and of a .llmp), each in a fresh process."""
    src = _bf16_file(tmp_path / "w.safetensors")
    packed, back = tmp_path / "w.llmp", tmp_path / "back.safetensors"
    for args in (["pack", str(src), "-o", str(packed)], ["unpack", str(packed), "-o", str(back)],
                 ["verify", str(packed)], ["info", str(src)], ["info", str(packed), "--json"]):
        assert _fresh(CLI.format(args=args), tmp_path) == [], args
    assert back.read_bytes() == src.read_bytes()


def test_lossless_api_does_not_import_torch(tmp_path):
    """The library verbs too (llmpress.pack/unpack/verify/info), and the modules behind them."""
    src = _bf16_file(tmp_path / "w.safetensors")
    code = (f"import llmpress, llmpress.lossless.container, llmpress.lossless.reader, llmpress.lossless.bounds\n"
            f"llmpress.pack({str(src)!r}, 'w.llmp')\nllmpress.verify('w.llmp')\nllmpress.info('w.llmp')\n"
            f"llmpress.unpack('w.llmp', 'back.safetensors')")
    assert _fresh(code, tmp_path) == []
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()


@pytest.fixture(scope="module")
def aot():
    """The ahead-of-time build of the decode kernels (`llmpress warmup`; make setup has usually
    built it for these sources already, then this is a look-up)."""
    from llmpress.lossless import compiled

    compiled.build()
    m = compiled.module()
    assert m is not None
    return m


def test_aot_unpack_imports_no_numba(tmp_path, aot):
    """With the build in place, unpack, verify and info of a .llmp load it and never import numba."""
    src = _bf16_file(tmp_path / "w.safetensors")
    packed = tmp_path / "w.llmp"
    assert _fresh(CLI.format(args=["pack", str(src), "-o", str(packed)]), tmp_path) == []
    for args in (["unpack", str(packed), "-o", str(tmp_path / "back.safetensors")], ["verify", str(packed)],
                 ["info", str(packed)]):
        code = CLI.format(args=args)
        if args[0] != "info":  # info reads the index alone: no kernel at all
            code += "\nassert '_llmpress_lossless_aot' in sys.modules"
        assert _fresh(code, tmp_path, HEAVY + ("numba",)) == [], args
    assert (tmp_path / "back.safetensors").read_bytes() == src.read_bytes()


def test_aot_pack_imports_no_numba(tmp_path, aot):
    """With the build in place, pack (the rans policy) and info of a source never import numba either."""
    src = _bf16_file(tmp_path / "w.safetensors")
    for args in (["pack", str(src), "-o", str(tmp_path / "w.llmp")], ["info", str(src)]):
        code = CLI.format(args=args) + "\nassert '_llmpress_lossless_aot' in sys.modules"
        assert _fresh(code, tmp_path, HEAVY + ("numba",)) == [], args


def test_aot_delta_imports_no_numba_nor_torch(tmp_path, aot):
    """A fine-tune packed against its base and unpacked against it: the delta kernels come from the
    build too (no numba, no torch in either process)."""
    base = _bf16_file(tmp_path / "base.safetensors")
    buf = bytearray(base.read_bytes())
    start = 8 + int.from_bytes(buf[:8], "little")
    words = np.frombuffer(buf, np.uint16, 64 * 300, start).copy()
    words[::3] += 1  # a third of the weights one representable value up
    buf[start : start + words.nbytes] = words.tobytes()
    ft = tmp_path / "ft.safetensors"
    ft.write_bytes(bytes(buf))
    packed, back = tmp_path / "d.llmp", tmp_path / "back.safetensors"
    for args in (["pack", str(ft), "-o", str(packed), "--base", str(base)],
                 ["unpack", str(packed), "-o", str(back), "--base", str(base)]):
        code = CLI.format(args=args) + "\nassert '_llmpress_lossless_aot' in sys.modules"
        assert _fresh(code, tmp_path, HEAVY + ("numba",)) == [], args
    assert back.read_bytes() == ft.read_bytes()


def _words(dtype: str, n: int) -> np.ndarray:
    """(n·itemsize,) uint8: weight-like words of ``dtype``, a run of zero words first (the split
    coder's pieces then differ)."""
    from llmpress.lossless.fields import ITEMSIZE

    rng = np.random.default_rng(1)
    w = rng.standard_normal(n).astype(np.float32) * 0.02
    words = {"BF16": lambda: (w.view(np.uint32) >> 16).astype(np.uint16), "F16": lambda: w.astype(np.float16),
             "F32": lambda: w, "F8_E4M3": lambda: rng.integers(0, 256, n, dtype=np.uint8) & 0xBF,
             "F8_E5M2": lambda: rng.binomial(255, 0.3, n).astype(np.uint8)}[dtype]()
    raw = np.ascontiguousarray(words).view(np.uint8).copy()
    raw[: 4096 * ITEMSIZE[dtype]] = 0
    return raw


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F8_E4M3", "F8_E5M2"])
def test_aot_kernels_match_jit(aot, dtype, monkeypatch):
    """Each float layout, a long chunk (32-lane rANS, split streams) and a short one (4-lane rANS):
    the payload the AOT kernels encode is the JIT kernels' byte for byte, each decodes the other's,
    and a corrupted payload gets the same error code from both decoders."""
    from llmpress.lossless import chunk, compiled, entropy, fields
    from llmpress.lossless import chunk_kernel as CK
    from llmpress.lossless.fields import layout

    lay = layout(dtype)

    def use_aot(on: bool) -> None:
        monkeypatch.setenv(compiled.ENV, "1" if on else "0")
        monkeypatch.setattr(compiled, "_loaded", {})  # module() asks the environment again
        for mod, name in ((entropy, "K"), (entropy, "M"), (entropy, "R32"), (fields, "K"), (chunk, "CK")):
            monkeypatch.setattr(mod, name, compiled.Kernels(getattr(mod, name).__dict__["_name"]))
        monkeypatch.setattr(lay, "_kernels", None)

    for n in (1 << 17, 3000):
        raw = _words(dtype, n)
        use_aot(False)
        j = chunk.encode_chunk(raw, dtype)[0]
        use_aot(True)
        a = chunk.encode_chunk(raw, dtype)[0]
        assert a == j
        aot_pair = (chunk.CK.decode_fields, lay.kernels()[1])
        assert all(isinstance(k, compiled._Dispatch) for k in (*aot_pair, lay.kernels()[0])), "not in the build"
        m = lay.symbols(len(raw))
        hd = np.dtype(lay.head_dtype)
        for payload in (a, a[: len(a) // 2] + bytes([a[len(a) // 2] ^ 0x5A]) + a[len(a) // 2 + 1 :]):
            buf = np.frombuffer(payload, np.uint8)
            res = []
            for dec, merge in ((CK.decode_fields, lay.jit_kernels()[1]), aot_pair):
                f = [np.zeros(m, hd)] + [np.zeros(m, np.uint8) for _ in range(3)]
                rc = dec(buf, lay.fields[0].width, lay.tail_w, *f)
                x = np.zeros(m, lay.word)
                if rc == 0:
                    merge(*f, x)
                res.append((rc, [v.tobytes() for v in f], x.tobytes()))
            assert res[0] == res[1]
            if payload is a:
                assert res[0][0] == 0 and res[0][2] == raw.tobytes()


@pytest.mark.parametrize("bits", [3, 4])
def test_aot_codes_kernels_match_jit(aot, bits, monkeypatch):
    """A format-6 codes chunk (zeros.py; 4 bits as bytes, 3 bits a symbol a code) encodes to the same
    payload with the AOT kernels as with the JIT ones, decodes back by both, and the kernels it calls
    (unpack_bits, pack_bits, add_codes, add_zero_runs, fill_zeros) are in the build."""
    from llmpress.lossless import chunk, compiled, entropy, fields, zeros
    from llmpress.lossless.zeros import ChunkZeros, ZeroRef

    rng = np.random.default_rng(bits)
    z = rng.integers(0, 1 << bits, 1 << 16).astype(np.uint8)
    q = ((z.astype(np.int64) + rng.integers(-2, 3, len(z))) & ((1 << bits) - 1)).astype(np.uint8)
    raw = fields.CODES[bits].merge([q], len(q) * bits // 8)
    out = []
    for on in (False, True):
        monkeypatch.setenv(compiled.ENV, "1" if on else "0")
        monkeypatch.setattr(compiled, "_loaded", {})
        for mod, name in ((entropy, "K"), (entropy, "M"), (entropy, "R32"), (fields, "K"), (chunk, "K"), (zeros, "K")):
            monkeypatch.setattr(mod, name, compiled.Kernels(getattr(mod, name).__dict__["_name"]))
        buf = chunk.encode_chunk(raw, "U8", codes=bits, zeros=z)[0]
        back = chunk.decode_chunk(memoryview(buf), "U8", len(raw), codes=bits, zeros=ChunkZeros(lambda: z.reshape(1, -1), ZeroRef("z", len(z), 1, "value"), 0))
        assert back.tobytes() == raw.tobytes()
        out.append(buf)
        if on:
            assert all(isinstance(getattr(fields.K, k), compiled._Dispatch) for k in ("unpack_bits", "pack_bits"))
            assert isinstance(chunk.K.add_codes, compiled._Dispatch)
            assert all(isinstance(getattr(zeros.K, k), compiled._Dispatch) for k in ("add_zero_runs", "fill_zeros"))
    assert out[0] == out[1]


def test_aot_gguf_unpack_imports_no_numba(tmp_path, aot):
    """A packed GGUF file's chunks decode through the build's gguf_kernel.decode_chunk (its
    signature matches the call): unpack and verify never import numba, and restore the file."""
    from gguf import GGMLQuantizationType as T, GGUFWriter, quants

    import llmpress

    rng = np.random.default_rng(0)
    src = tmp_path / "m.gguf"
    w = GGUFWriter(str(src), "llama")
    for qt in (T.Q4_1, T.Q5_0, T.Q8_0):
        w.add_tensor(qt.name, quants.quantize((rng.standard_normal((64, 512)) * 0.02).astype(np.float32), qt), raw_dtype=qt)
    q6 = rng.integers(0, 256, (64, 210), dtype=np.uint8)
    q6[:, 208:210] = np.abs(rng.standard_normal(64) * 1e-3).astype(np.float16).view(np.uint8).reshape(64, 2)
    w.add_tensor("Q6_K", q6, raw_dtype=T.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    packed, back = tmp_path / "m.llmp", tmp_path / "back.gguf"
    llmpress.pack(src, packed, chunk_bytes=1 << 14)
    for args in (["unpack", str(packed), "-o", str(back)], ["verify", str(packed)]):
        code = CLI.format(args=args) + "\nassert '_llmpress_lossless_aot' in sys.modules"
        assert _fresh(code, tmp_path, HEAVY + ("numba",)) == [], args
    assert back.read_bytes() == src.read_bytes()
