"""Structure-aware fuzzing of llmpress's two readers: the lossy folder and the ``.llmp`` container.

Each target starts from real files written by llmpress (a small quantized/factorized folder; small
``.llmp`` files, one per entropy-coding policy) and mutates them knowing their structure: the
manifest's JSON fields, each compressed tensor's codec meta, the safetensors header (dtype, shape,
offsets, its length), the packed codes, shard names; the container's index (decompressed, mutated,
recompressed, footer and crc fixed so the mutation reaches the checks behind them), its payloads,
footer and preamble. Half of the data mutations re-seal the file (sha256 in the manifest) as a
deliberate editor would; the others must be caught by the checksum.

An input's outcome is one of:

- ``refused``: an :class:`~llmpress.errors.LlmpressError` (what the reader promises);
- ``accepted``: it loaded, and the oracle agrees — every tensor the model holds is the one the
  (possibly re-sealed) shard stores, every restored file's sha256 is the one its index states;
- ``wrong``: it loaded, and the oracle disagrees (a corrupted input accepted);
- ``crash``: any other exception.

Each is also timed and its peak resident memory measured (``VmHWM`` reset through
``/proc/self/clear_refs`` before the input, so the peak is this input's). A hang is an input that
takes more than 1 s of this process's CPU time (all threads): wall time on a shared machine
counts the other processes' turns too. The clean peak every input is compared with is measured
once the process is warm (``Fuzzer.warm``: each base loaded and a few hundred inputs run,
among them every entropy backend id in every field of a chunk, so numba's dispatchers and the
readers' error paths have loaded their code). An input over the time or memory bound is run a
second time and judged on that run (``Fuzzer.run``): a cost the input drives recurs, a one-time
cost of the process (a dispatcher's first call, a module's first import) does not; the outcome
must also be the same both times (a reader whose answer depends on what ran before is a crash).

The mutators draw their choices from an ``Rng`` (``random.Random`` for the long run in
``bench/fuzz.py``; hypothesis's ``data.draw`` in ``tests/fuzz/test_fuzz.py``, so a failure shrinks).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import zstandard

HANG_SECONDS = 1.0
INTERRUPT_SECONDS = 30.0  # an input still running after this much CPU time is stopped (run_input)
# the interpreter's own noise in a peak (a first-time import, an exception's traceback): an input's
# peak counts as over its bound when it exceeds the clean input's by more than 2× its size + this
SLACK_BYTES = 4 << 20
POLICIES = ("rans", "ans", "zstd")
INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 16, 31, 32, 33, 64, 255, 256, 1 << 20, 1 << 31, (1 << 31) - 1, 1 << 32,
                    1 << 40, 1 << 62, 1 << 64, -(1 << 63), 10**30]
INTERESTING = [None, True, False, "", "x", "../x", "/etc/passwd", "float16", "uint8", "nope", 0.5, -0.0, float("1e308"),
               [], {}, [1], [1 << 20, 1 << 20], [0, 0], [-1, 4], {"codec": "rtn"}, "model.safetensors", *INTERESTING_INTS]
BAD_NAMES = ["../model.safetensors", "/tmp/model.safetensors", "a/../../model.safetensors", "model.safetensors\x00",
             "C:model.safetensors", "..\\model.safetensors", "", ".", "sub/model.safetensors", "model.safetensors/"]
ST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "F8_E4M3", "X", 7]


class Rng(Protocol):
    def randint(self, a: int, b: int) -> int: ...

    def choice(self, seq: list[Any]) -> Any: ...

    def random(self) -> float: ...


# ---------------------------------------------------------------------------- JSON mutation
def _nodes(x: Any, path: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indices)."""
    out = [path]
    if isinstance(x, dict):
        for k, v in x.items():
            out += _nodes(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x[:8]):
            out += _nodes(v, path + (i,))
    return out


def _set(x: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    parent = x
    for p in path[:-1]:
        parent = parent[p]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return x


def _get(x: Any, path: tuple) -> Any:
    for p in path:
        x = x[p]
    return x


LAST_EDIT = [""]  # the last JSON edit, for the failure report


def mutate_json(x: Any, rng: Rng, paths: list[tuple] | None = None) -> Any:
    """One structure-aware edit of a JSON value: a node replaced by an interesting or nearby value,
    deleted, or given a new key."""
    x = json.loads(json.dumps(x))
    paths = paths or _nodes(x)
    path = rng.choice(paths)
    old = _get(x, path) if _has(x, path) else None
    op = rng.randint(0, 5)
    if op == 0 and path and _has(x, path):
        new, x = "<deleted>", _set(x, path, None, delete=True)
    elif op == 1 and isinstance(old, int) and not isinstance(old, bool):
        new = old + rng.choice([-2, -1, 1, 2, old, -old])
        x = _set(x, path, new)
    elif op == 2 and isinstance(old, list) and old:
        new = old[:-1] if rng.random() < 0.5 else old + [rng.choice(old)]
        x = _set(x, path, new)
    elif op == 3 and isinstance(old, dict):
        k = rng.choice(["extra", "shape", "rank", "bits", "codec", "dense", "g_idx", "version"])
        new = old[k] = rng.choice(INTERESTING)
        path = path + (k,)
    elif op == 4 and isinstance(old, str):
        new = rng.choice([old[:-1], old + "x", old.upper(), "../" + old, old * 2])
        x = _set(x, path, new)
    else:
        new = rng.choice(INTERESTING)
        x = _set(x, path, new)
    LAST_EDIT[0] = f"{'.'.join(map(str, path))} := {new!r}"[:200]
    return x


def _has(x: Any, path: tuple) -> bool:
    try:
        _get(x, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


# ---------------------------------------------------------------------------- safetensors
def split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(header: dict[str, Any], data: bytes, length: int | None = None) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h) if length is None else length % (1 << 64)) + h + data


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------------------- outcome
@dataclass
class Outcome:
    kind: str  # refused | accepted | wrong | crash
    seconds: float  # wall time
    peak_bytes: int  # peak resident memory above the resident size before the input
    size: int  # bytes of the input
    what: str = ""  # the mutation
    detail: str = ""  # the error or the oracle's complaint
    cpu: float = 0.0  # this process's CPU time (all threads) spent on the input
    first: str = ""  # when the input was run again (over a bound the first time): the first run's figures
    index: int = -1  # the input's number in a long run (bench/fuzz.py --start reproduces it)


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Interrupted(BaseException):
    """An input still running after INTERRUPT_SECONDS of CPU time (a BaseException: readers'
    ``except Exception`` must not swallow it)."""


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(f"still running after {INTERRUPT_SECONDS:g} s of CPU time")


def run_input(fn: Callable[[], str | None], size: int, what: str) -> Outcome:
    """Run one input's load + oracle; classify it, time it (wall and CPU), measure its peak memory.
    On the main thread an input is interrupted after INTERRUPT_SECONDS of CPU time (a hang that
    runs Python code; a compiled loop is interrupted when it returns), so a long run goes on."""
    from llmpress.errors import LlmpressError

    timer = threading.current_thread() is threading.main_thread()
    if timer:
        old = signal.signal(signal.SIGPROF, _interrupt)
        signal.setitimer(signal.ITIMER_PROF, INTERRUPT_SECONDS)
    _reset_peak()
    before = _rss_kib("VmRSS")
    c0, t0 = time.process_time(), time.perf_counter()
    try:
        complaint = fn()
        kind, detail = ("wrong", complaint) if complaint else ("accepted", "")
    except LlmpressError as e:
        kind, detail = "refused", f"{type(e).__name__}: {e}"
    except (Exception, Interrupted) as e:  # noqa: BLE001 - exactly what the harness counts
        kind, detail = "crash", "".join(traceback.format_exception_only(type(e), e)).strip() + "\n" + traceback.format_exc(limit=-4)
    finally:
        if timer:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, old)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = max(0, _rss_kib("VmHWM") - before) * 1024
    return Outcome(kind, dt, peak, size, what, detail[:2000], cpu)


def over_bound(o: Outcome, clean_peak: int) -> bool:
    """The input's peak exceeded the clean input's by more than 2× its size (+ SLACK_BYTES)."""
    return o.peak_bytes - clean_peak > 2 * o.size + SLACK_BYTES


# ---------------------------------------------------------------------------- the folder target
def tiny_source(root: Path) -> Path:
    """A one-block Llama with random weights, saved as a checkpoint folder (the source every base is made from)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root, safe_serialization=True)
    return root


def build_bases(root: Path) -> dict[str, Any]:
    """Real inputs written by llmpress: lossy folders (rtn 4-bit g32; svd+q, lqer-free so no
    calibration) and ``.llmp`` files of the same checkpoint, one per policy."""
    from llmpress.lossless.container import pack
    from llmpress.pipeline import compress
    from llmpress.recipe import Recipe

    src = tiny_source(root / "src")
    folders = {}
    for name, recipe in {"rtn": Recipe.uniform("rtn", bits=4, group_size=32),
                         "svdq": Recipe.uniform("svd+q", rank=8, bits=4, group_size=32)}.items():
        compress(src, recipe, root / name, progress=False)
        folders[name] = {p.name: p.read_bytes() for p in (root / name).iterdir() if p.is_file()}
    packs = {}
    for policy in POLICIES:
        out = root / f"{policy}.llmp"
        pack(src, out, policy=policy, threads=1)
        packs[policy] = out.read_bytes()
    return {"folders": folders, "packs": packs}


def mutate_folder(files: dict[str, bytes], rng: Rng) -> tuple[dict[str, bytes], list[tuple[str, str]], str]:
    """One structure-aware mutation of a folder: (files, symlinks to make (name → target), what)."""
    files = dict(files)
    man = json.loads(files["llmpress.json"])
    links: list[tuple[str, str]] = []
    shard = "model.safetensors"
    reseal = rng.random() < 0.6
    op = rng.randint(0, 8)
    params = sorted(man["tensors"])
    if op == 0:  # any manifest field
        man = mutate_json(man, rng)
        what = f"manifest {LAST_EDIT[0]}"
    elif op == 1:  # a codec meta field
        p = rng.choice(params)
        paths = [("tensors", p, "meta") + q for q in _nodes(man["tensors"][p]["meta"])] + [("tensors", p, "codec"), ("tensors", p, "keys")]
        man = mutate_json(man, rng, paths)
        what = f"manifest {LAST_EDIT[0]}"
    elif op in (2, 3):  # the safetensors header
        header, data = split_safetensors(files[shard])
        k = rng.choice(sorted(k for k in header if k != "__metadata__"))
        field_name = rng.choice(["dtype", "shape", "data_offsets", "length", "drop"])
        length = None
        if field_name == "dtype":
            header[k]["dtype"] = rng.choice(ST_DTYPES)
        elif field_name == "shape":
            header[k]["shape"] = mutate_json(header[k]["shape"], rng)
        elif field_name == "data_offsets":
            header[k]["data_offsets"] = mutate_json(header[k]["data_offsets"], rng)
        elif field_name == "length":
            length = rng.choice(INTERESTING_INTS[:14] + [len(files[shard]), 1 << 60])
        else:
            del header[k]
        files[shard] = join_safetensors(header, data, length)
        what = f"header {field_name} of {k}"
    elif op in (4, 5):  # packed codes and other stored bytes
        header, data = split_safetensors(files[shard])
        keys = sorted(k for k in header if k != "__metadata__")
        q = [k for k in keys if k.endswith(".qweight")]
        k = rng.choice(q if q and rng.random() < 0.7 else keys)
        a, b = header[k]["data_offsets"]
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            if b > a:
                buf[rng.randint(a, b - 1)] = rng.randint(0, 255)
        files[shard] = join_safetensors(header, bytes(buf))
        what = f"bytes of {k}"
    elif op == 6:  # shard names and links
        name = rng.choice(BAD_NAMES)
        if rng.random() < 0.5 or not name:
            man["files"] = {name: man["files"][shard]}
        else:
            links.append((shard, rng.choice(["../outside.safetensors", "/proc/self/environ", "/dev/zero", "sub"])))
        what = f"shard name {name!r}" if not links else f"link to {links[0][1]}"
    elif op == 7:  # config.json
        cfg = json.loads(files["config.json"])
        cfg = mutate_json(cfg, rng, [(k,) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
                                                    "num_attention_heads", "num_key_value_heads", "model_type",
                                                    "max_position_embeddings", "head_dim", "quantization_config")])
        files["config.json"] = json.dumps(cfg).encode()
        what = f"config {LAST_EDIT[0]}"
    else:  # raw damage: truncation or a flipped byte in any file
        name = rng.choice(sorted(files))
        raw = bytearray(files[name])
        if rng.random() < 0.5 and raw:
            raw = raw[: rng.randint(0, len(raw) - 1)]
        elif raw:
            raw[rng.randint(0, len(raw) - 1)] ^= 1 << rng.randint(0, 7)
        files[name] = bytes(raw)
        what = f"raw damage to {name}"
        reseal = reseal and name == shard
    if reseal and isinstance(man, dict) and isinstance(man.get("files"), dict) and shard in man["files"]:
        man["files"][shard] = sha(files[shard])
    if op != 8 or what != "raw damage to llmpress.json":
        files["llmpress.json"] = json.dumps(man).encode()
    return files, links, what


def folder_oracle(root: Path, model: torch.nn.Module) -> str | None:
    """None if every tensor the model holds from the folder equals the one the shard stores."""
    from safetensors.torch import load_file

    from llmpress.io.folder import module_state_names
    from llmpress.tensor import CompressedTensor

    man = json.loads((root / "llmpress.json").read_text())
    for f, digest in man["files"].items():
        if sha((root / f).read_bytes()) != digest:
            return f"{f}: accepted with a sha256 that does not match"
    stored: dict[str, torch.Tensor] = {}
    for f in man["files"]:
        stored.update(load_file(str(root / f)))
    sd = model.state_dict()
    owned = set()
    for param, e in man["tensors"].items():
        mod = param.removesuffix(".weight")
        data = {k: stored[f"{param}.{k}"] for k in e["keys"]}
        owned |= {f"{param}.{k}" for k in e["keys"]}
        names, _ = module_state_names(CompressedTensor(e["codec"], data, e["meta"]))
        for k, n in names.items():
            if not _same(sd.get(f"{mod}.{n}"), data[k]):
                return f"{param}.{k}: the model holds another tensor than the shard"
    for k, t in stored.items():
        if k not in owned and k in sd and not _same(sd[k], t.to(sd[k].dtype)):
            return f"{k}: the model holds another tensor than the shard"
    return None


def _same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    """Bit for bit (a NaN equals itself)."""
    return (a is not None and a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def load_folder_input(files: dict[str, bytes], links: list[tuple[str, str]], work: Path) -> str | None:
    import llmpress

    root = work / "f"
    if root.exists() or root.is_symlink():
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (work / "outside.safetensors").write_bytes(files.get("model.safetensors", b""))
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "sub").mkdir()
    for name, target in links:
        (root / name).unlink(missing_ok=True)
        (root / name).symlink_to(target)
    model = llmpress.load(root)
    return folder_oracle(root, model)


# ---------------------------------------------------------------------------- the .llmp target
FOOTER = struct.Struct("<QQI8s")


def split_llmp(raw: bytes) -> tuple[bytes, Any, bytes]:
    """(preamble + payloads, the index JSON, the footer's end marker)."""
    off, ln, _, end = FOOTER.unpack(raw[-FOOTER.size:])
    index = json.loads(zstandard.ZstdDecompressor().decompress(raw[off:off + ln]))
    return raw[:off], index, end


def join_llmp(body: bytes, index: Any, end: bytes = b"LLMPIDX1") -> bytes:
    import zlib

    blob = zstandard.ZstdCompressor(level=3).compress(json.dumps(index).encode())
    return body + blob + FOOTER.pack(len(body), len(blob), zlib.crc32(blob) & 0xFFFFFFFF, end)


def mutate_llmp(raw: bytes, rng: Rng) -> tuple[bytes, str]:
    body, index, end = split_llmp(raw)
    op = rng.randint(0, 6)
    if op in (0, 1, 2):  # the index, re-sealed so the mutation reaches the checks behind the crc
        segs = [("files", i, "segments", j) for i, f in enumerate(index["files"]) for j in range(len(f["segments"]))]
        if op == 0 or not segs:
            paths = None
        else:
            s = rng.choice(segs)
            paths = [s + q for q in _nodes(_get(index, s))]
        index = mutate_json(index, rng, paths)
        return join_llmp(body, index, end), f"index {LAST_EDIT[0]}"
    if op == 3:  # payload bytes
        b = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            b[rng.randint(12, len(b) - 1)] ^= 1 << rng.randint(0, 7)
        return join_llmp(bytes(b), index, end), "payload bytes"
    if op == 4:  # footer fields
        off, ln, crc, e = FOOTER.unpack(raw[-FOOTER.size:])
        fields = [off, ln, crc]
        i = rng.randint(0, 2)
        fields[i] = rng.choice(INTERESTING_INTS[:16] + [fields[i] + 1, fields[i] - 1]) % (1 << (64 if i < 2 else 32))
        return raw[:-FOOTER.size] + FOOTER.pack(*fields, e), f"footer field {i}"
    if op == 5:  # preamble version
        return raw[:8] + struct.pack("<I", rng.choice([0, 1, 2, 3, 4, 5, 6, 99, 1 << 31])) + raw[12:], "version"
    cut = rng.randint(0, len(raw) - 1)
    return (raw[:cut], "truncated") if rng.random() < 0.5 else (raw + raw[cut:cut + 64], "extended")


def load_llmp_input(raw: bytes, work: Path) -> str | None:
    from llmpress.lossless.container import verify
    from llmpress.lossless.reader import Packed

    p = work / "x.llmp"
    p.write_bytes(raw)
    verify(p, threads=1)
    with Packed(p) as pk:  # the oracle decodes again, independently of verify's own checks
        for f in pk.index["files"]:
            if sha(pk.file_bytes(f["path"])) != f["sha256"]:
                return f"{f['path']}: accepted with bytes whose sha256 is not the index's"
    return None


# ---------------------------------------------------------------------------- a run
WARM_INPUTS = 200  # random inputs per target run before the clean peak is measured (Fuzzer.warm)

Input = tuple[Callable[[], "str | None"], int, str]  # (load + oracle, bytes of the input, the mutation)


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=lambda: {"refused": 0, "accepted": 0, "wrong": 0, "crash": 0})
    hangs: int = 0  # inputs over HANG_SECONDS of CPU time (on their second run too)
    slowest: float = 0.0  # the most CPU seconds an input took
    slowest_wall: float = 0.0  # the most wall seconds (the machine's other processes included)
    peak_over: int = 0  # the largest peak memory above the clean input's, in bytes
    over_2x: int = 0  # inputs whose peak exceeded the clean input's by more than 2× their size + SLACK_BYTES
    rerun: int = 0  # inputs over a bound on their first run, run again (within it the second time: a one-time cost)
    failures: list[Outcome] = field(default_factory=list)

    def add(self, o: Outcome, clean_peak: int) -> None:
        self.counts[o.kind] += 1
        self.slowest = max(self.slowest, o.cpu)
        self.slowest_wall = max(self.slowest_wall, o.seconds)
        self.hangs += o.cpu > HANG_SECONDS
        self.peak_over = max(self.peak_over, o.peak_bytes - clean_peak)
        self.over_2x += over_bound(o, clean_peak)
        self.rerun += bool(o.first)
        if o.kind in ("wrong", "crash") or over_bound(o, clean_peak) or o.cpu > HANG_SECONDS:
            self.failures.append(o)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "failures"},
                "failures": [o.__dict__ for o in self.failures]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Tally":
        return cls(**{**d, "failures": [Outcome(**o) for o in d["failures"]]})


def _field_headers(payload: bytes) -> list[int]:
    """Offsets of each field's backend id in a chunk payload (u8 nfields | (u8 id | u32 len | bytes)*)."""
    out, pos = [], 1
    for _ in range(payload[0] if payload else 0):
        if pos + 5 > len(payload):
            break
        out.append(pos)
        pos += 5 + struct.unpack_from("<I", payload, pos + 1)[0]
    return out


def backend_sweep(raw: bytes) -> list[tuple[bytes, str]]:
    """Inputs that send each field of the first chunk of the largest and the smallest tensor
    (the 32-lane and the four-lane/raw streams) through every backend id, with the stream intact
    and with a byte of it flipped: every decoder's entry point and error path."""
    body, index, end = split_llmp(raw)
    segs = sorted((s for f in index["files"] for s in f["segments"] if s["kind"] == "tensor" and s["chunks"]),
                  key=lambda s: s["length"])
    out = []
    for s in {id(s): s for s in (segs[0], segs[-1])}.values():
        o, ln = s["chunks"][0][:2]
        for at in _field_headers(body[o:o + ln]):
            for bid in range(8):
                for flip in (False, True):
                    b = bytearray(body)
                    b[o + at] = bid
                    if flip and at + 6 < ln:
                        b[o + at + 6] ^= 0x10
                    out.append((join_llmp(bytes(b), index, end), f"backend {bid} in {s['name']}{' (flipped)' if flip else ''}"))
    return out


class Fuzzer:
    """Both targets over one set of bases, in a scratch folder (``/dev/shm`` where there is one)."""

    def __init__(self, root: Path | None = None, warm_inputs: int = WARM_INPUTS):
        self._tmp = tempfile.TemporaryDirectory(prefix="llmpress-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.work = Path(self._tmp.name)
        self.bases = build_bases(root or self.work / "bases")
        self.warm(warm_inputs)
        self.clean_peak = {"folder": self._clean_peak("folder"), "llmp": self._clean_peak("llmp")}

    def close(self) -> None:
        self._tmp.cleanup()

    def warm(self, n: int) -> None:
        """Load the code every input may reach before anything is measured: each base, the
        backend sweep of each ``.llmp`` base, ``n`` random inputs per target (outcomes unused)."""
        import random

        for files in self.bases["folders"].values():
            run_input(lambda: load_folder_input(files, [], self.work), 0, "warm")
        for raw in self.bases["packs"].values():
            run_input(lambda: load_llmp_input(raw, self.work), 0, "warm")
            for x, what in backend_sweep(raw):
                run_input(lambda: load_llmp_input(x, self.work), len(x), what)
        rng = random.Random("warm")
        for _ in range(n):
            run_input(*self.make_folder(rng))
            run_input(*self.make_llmp(rng))

    def _clean_peak(self, target: str) -> int:
        """The peak memory of loading the unmutated inputs (the cost every input pays), warm."""
        peaks = []
        for _ in range(3):
            if target == "folder":
                for files in self.bases["folders"].values():
                    o = run_input(lambda: load_folder_input(files, [], self.work), 0, "clean")
                    assert o.kind == "accepted", o.detail
                    peaks.append(o.peak_bytes)
            else:
                for raw in self.bases["packs"].values():
                    o = run_input(lambda: load_llmp_input(raw, self.work), 0, "clean")
                    assert o.kind == "accepted", o.detail
                    peaks.append(o.peak_bytes)
        return max(peaks)

    def run(self, target: str, inp: Input) -> Outcome:
        """One input, judged: run again when over the time or memory bound, and judged on that
        run (the first run's figures kept in ``first``); a different outcome the second time is a crash."""
        o = run_input(*inp)
        if not (over_bound(o, self.clean_peak[target]) or o.cpu > HANG_SECONDS):
            return o
        again = run_input(*inp)
        again.first = f"first run: {o.kind}, {o.cpu:.3f} s CPU, {o.seconds:.3f} s wall, peak {o.peak_bytes >> 10} KiB"
        if again.kind != o.kind:
            again.detail = f"outcome {o.kind} then {again.kind} on the same input\n{o.detail}\n{again.detail}"[:2000]
            again.kind = "crash"
        return again

    def make_folder(self, rng: Rng) -> Input:
        name = rng.choice(sorted(self.bases["folders"]))
        files, links, what = mutate_folder(self.bases["folders"][name], rng)
        return (lambda: load_folder_input(files, links, self.work)), sum(map(len, files.values())), f"{name}: {what}"

    def make_llmp(self, rng: Rng) -> Input:
        policy = rng.choice(list(POLICIES))
        raw, what = mutate_llmp(self.bases["packs"][policy], rng)
        return (lambda: load_llmp_input(raw, self.work)), len(raw), f"{policy}: {what}"

    def folder(self, rng: Rng) -> Outcome:
        return self.run("folder", self.make_folder(rng))

    def llmp(self, rng: Rng) -> Outcome:
        return self.run("llmp", self.make_llmp(rng))
