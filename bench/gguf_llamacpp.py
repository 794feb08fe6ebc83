"""Better GGUFs than llama.cpp makes? llmpress's K-quant mixes against llama-quantize + imatrix,
judged by llama.cpp's own KL tool.

    OMP_NUM_THREADS=2 .venv/bin/python bench/gguf_llamacpp.py                    # Q4_K_M, Q3_K_M, Q2_K; ~1 h on 2 cores
    .venv/bin/python bench/gguf_llamacpp.py --mixes q4_k_m --methods gptq --chunks 4   # quicker

On SmolLM2-135M, side by side in one run:

1. The reference is the original as an F32 GGUF (``llmpress export --type f32``).
2. The calibration text is the one llmpress calibrates on: the very windows ``quantize`` takes
   (``--samples`` × ``--seq-len`` tokens of the calibration mix), decoded and written one after
   another to a text file; ``llama-imatrix`` reads it in chunks of ``--seq-len`` tokens.
3. For each mix: ``llama-quantize`` of the F32 GGUF without and with that importance matrix, and
   ``llmpress quantize --gguf-mix MIX --method M`` for each method, exported with
   ``export --format gguf --type q8_0`` (the tied embedding as Q8_0: llama.cpp's own pick for
   SmolLM2). Every tensor then has the same type in both files, so the sizes match to the metadata.
   For the mixes of ``--alloc-mixes``, also ``llmpress compress --target-bytes`` (the size of
   llama.cpp's file) ``--menu gguf --method gptq``: llmpress's allocator choosing each linear's type.
   Each quantization is one fresh process: wall time and peak RSS (of llama-imatrix plus
   llama-quantize for llama.cpp; of quantize plus export for llmpress).
4. KL of every file against the reference by ``llama-perplexity --kl-divergence`` on the evaluation
   texts (debian-handbook, linux-doc; neither is in the calibration mix), ``--chunks`` chunks of
   ``--ctx`` tokens each.
5. ``llama-bench`` prompt and generation tokens/s of llmpress's Q4_K_M file against llama.cpp's.

Prints one table per mix (size, bpw, KL per text, KL relative to llama.cpp + imatrix, time, peak
memory) with command, commit and date, and writes ``bench/out/gguf.json``. (Issue 15 asked for
``bench/gguf.py``; a module of that name in bench/ would shadow gguf-py for anything that puts
bench/ on ``sys.path``, as the tests do.)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

from capped import make_cap, run as run_capped  # noqa: E402
from export import eval_text_file, git_commit, llama_bin, llama_kl  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # bench/ holds no package of its own

from llmpress.integrations.llama_cpp import calibration_text  # noqa: E402

OUT = HERE / "out"
WORK = OUT / "gguf"
MODEL = "smollm2-135m"
MIX_FTYPE = {"q4_k_m": "Q4_K_M", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K"}
GiB = 1 << 30


def timed(argv: list, what: str) -> tuple[float, int, str]:
    """Run ``argv`` as a fresh process: (seconds, peak RSS bytes, stdout)."""
    argv = [str(a) for a in argv]
    print("$", " ".join(argv), file=sys.stderr, flush=True)
    r = run_capped(argv, make_cap("none", 0))
    if r.rc != 0:
        raise RuntimeError(f"{what} failed ({r.rc}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.seconds, r.peak_rss_bytes, r.stdout


class Case:
    """One quantized GGUF: how it was made, its size, what it cost to make."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.seconds = 0.0
        self.peak = 0
        self.kl: dict[str, dict] = {}

    def add(self, secs: float, peak: int) -> None:
        self.seconds += secs
        self.peak = max(self.peak, peak)

    @property
    def _cost_file(self) -> Path:
        return self.path.with_suffix(".cost.json")

    def save_cost(self) -> None:
        """What making the file cost, kept beside it (a later run that reuses the file reports it)."""
        self._cost_file.write_text(json.dumps({"seconds": self.seconds, "peak_rss_bytes": self.peak}))

    def load_cost(self) -> None:
        if self._cost_file.exists():
            c = json.loads(self._cost_file.read_text())
            self.seconds, self.peak = c["seconds"], c["peak_rss_bytes"]

    def row(self, n_weights: int) -> dict:
        size = self.path.stat().st_size
        return {"case": self.name, "file": str(self.path), "bytes": size, "bpw": 8 * size / n_weights,
                "seconds": self.seconds, "peak_rss_bytes": self.peak, "kl": self.kl}


def cached_kl(bin_dir: Path, ref: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int, redo: bool) -> dict:
    """llama_kl, kept beside the file (keyed by the text, the windows and the file's own mtime)."""
    side = gguf.with_suffix(".kl.json")
    key = f"{text.name}:{ctx}:{chunks}:{gguf.stat().st_mtime_ns}:{ref.stat().st_mtime_ns}"
    known = json.loads(side.read_text()) if side.exists() else {}
    if redo or key not in known:
        known[key] = llama_kl(bin_dir, ref, gguf, text, ctx, chunks, threads)
        side.write_text(json.dumps(known))
    return known[key]


def n_params(gguf_path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(gguf_path).tensors)


def llama_bench(bin_dir: Path, files: dict[str, Path], threads: int, reps: int, passes: int = 2) -> dict:
    """Prompt (pp256) and generation (tg128) tokens/s of each file: one llama-bench run over the files
    listed ``passes`` times in turn (so a drift of the shared machine falls on every file alike), each
    figure the mean of its passes' means, with the spread of those means."""
    argv = [bin_dir / "llama-bench", "-p", "256", "-n", "128", "-t", threads, "-r", reps, "--repack", "0", "-o", "json"]
    for _ in range(passes):
        for p in files.values():
            argv += ["-m", p]
    _, _, out = timed(argv, "llama-bench")
    names = {str(p): n for n, p in files.items()}
    seen: dict[str, dict[str, list[float]]] = {}
    for r in json.loads(out):
        kind = "pp" if r["n_prompt"] else "tg"
        seen.setdefault(names[r["model_filename"]], {}).setdefault(kind, []).append(r["avg_ts"])
    return {n: {f"{k}_tok_s": sum(v) / len(v) for k, v in d.items()} | {f"{k}_passes": v for k, v in d.items()}
            for n, d in seen.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mixes", default="q4_k_m,q3_k_m,q2_k")
    ap.add_argument("--methods", default="gptq,awq", help="llmpress methods per mix")
    ap.add_argument("--alloc-mixes", default="q4_k_m", help="mixes at whose file size llmpress's allocator runs too ('': none)")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows (both tools)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16, help="llama-perplexity chunks per text")
    ap.add_argument("--texts", default="debian-handbook,linux-doc")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--bench-reps", type=int, default=3, help="llama-bench repetitions (0: skip)")
    ap.add_argument("--redo", action="store_true", help="remake every file")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": git_commit(),
                 "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": MODEL,
                 "threads": args.threads, "samples": args.samples, "seq_len": args.seq_len,
                 "ctx": args.ctx, "chunks": args.chunks, "mixes": {}}
    bin_dir = llama_bin()
    py = [sys.executable, "-m", "llmpress"]
    ref = WORK / "ref-f32.gguf"
    if args.redo or not ref.exists():
        timed([*py, "export", MODEL, "-o", ref, "--format", "gguf", "--type", "f32", "--force"], "reference export")
    n_weights = n_params(ref)

    calib = WORK / f"calib-{args.samples}x{args.seq_len}.txt"
    imatrix = WORK / f"imatrix-{args.samples}x{args.seq_len}.gguf"
    res["calib_tokens"] = calibration_text(MODEL, None, args.samples, args.seq_len, calib)
    imat_cost_file = imatrix.with_suffix(".cost.json")
    if args.redo or not imatrix.exists():
        imat_cost = timed([bin_dir / "llama-imatrix", "-m", ref, "-f", calib, "-o", imatrix, "-c", args.seq_len,
                           "--chunks", args.samples, "-b", args.seq_len, "-t", args.threads, "--no-repack",
                           "--no-ppl"], "llama-imatrix")[:2]
        imat_cost_file.write_text(json.dumps(imat_cost))
    imat_cost = tuple(json.loads(imat_cost_file.read_text())) if imat_cost_file.exists() else (0.0, 0)
    res["imatrix_seconds"], res["imatrix_peak_rss_bytes"] = imat_cost
    texts = {name: eval_text_file(name, args.ctx * args.chunks * 6, WORK) for name in args.texts.split(",")}

    env_threads = ["--device", "cpu"]
    for mix in args.mixes.split(","):
        cases: list[Case] = []
        for imat in (False, True):
            c = Case(f"llama.cpp {MIX_FTYPE[mix]}" + (" + imatrix" if imat else ""),
                     WORK / f"llamacpp-{mix}{'-imat' if imat else ''}.gguf")
            if args.redo or not c.path.exists():
                if imat:  # the importance matrix is part of what this file cost
                    c.add(*imat_cost)
                extra = ["--imatrix", imatrix] if imat else []
                c.add(*timed([bin_dir / "llama-quantize", *extra, ref, c.path, MIX_FTYPE[mix], args.threads],
                             "llama-quantize")[:2])
                c.save_cost()
            c.load_cost()
            cases.append(c)
        for method in args.methods.split(","):
            folder = WORK / f"llmpress-{mix}-{method}"
            c = Case(f"llmpress {MIX_FTYPE[mix]}-mix, {method}", WORK / f"llmpress-{mix}-{method}.gguf")
            if args.redo or not c.path.exists():
                c.add(*timed([*py, "quantize", MODEL, "-o", folder, "--method", method, "--gguf-mix", mix,
                              "--samples", args.samples, "--seq-len", args.seq_len, *env_threads, "--force"],
                             "llmpress quantize")[:2])
                c.add(*timed([*py, "export", folder, "-o", c.path, "--format", "gguf", "--type", "q8_0", "--force"],
                             "llmpress export")[:2])
                c.save_cost()
            c.load_cost()
            cases.append(c)
        if mix in args.alloc_mixes.split(","):  # the allocator, its menu llama.cpp's types, at the mix's file size
            base = next(c for c in cases if c.name.endswith("imatrix"))
            folder = WORK / f"llmpress-alloc-{mix}"
            c = Case(f"llmpress allocation at {MIX_FTYPE[mix]}'s size, gptq", WORK / f"llmpress-alloc-{mix}.gguf")
            if args.redo or not c.path.exists():
                c.add(*timed([*py, "compress", MODEL, "-o", folder, "--target-bytes", base.path.stat().st_size,
                              "--menu", "gguf", "--method", "gptq", "--kept-type", "q8_0", "--samples", args.samples,
                              "--seq-len", args.seq_len, *env_threads, "--force"], "llmpress compress")[:2])
                c.add(*timed([*py, "export", folder, "-o", c.path, "--format", "gguf", "--type", "q8_0", "--force"],
                             "llmpress export")[:2])
                c.save_cost()
            c.load_cost()
            cases.append(c)
        for c in cases:
            for name, text in texts.items():
                c.kl[name] = cached_kl(bin_dir, ref, c.path, text, args.ctx, args.chunks, args.threads, args.redo)
        res["mixes"][mix] = [c.row(n_weights) for c in cases]
        _save(res)
        show_mix(mix, res["mixes"][mix], list(texts), file=sys.stderr)
    if args.bench_reps and "q4_k_m" in res["mixes"]:
        rows = res["mixes"]["q4_k_m"]
        files = {r["case"]: Path(r["file"]) for r in rows if r["case"].endswith("imatrix") or "llmpress" in r["case"]}
        res["llama_bench"] = llama_bench(bin_dir, files, args.threads, args.bench_reps)
    res["seconds"] = time.time() - t0
    _save(res)
    show(res, list(texts))


def _save(res: dict) -> None:
    tmp = OUT / "gguf.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(OUT / "gguf.json")


def _kl(row: dict, text: str) -> float | None:
    return row["kl"][text]["kl_mean"]


def show_mix(mix: str, rows: list[dict], texts: list[str], file=sys.stdout) -> None:
    base = next(r for r in rows if r["case"].endswith("imatrix"))
    print(f"\n## {MIX_FTYPE[mix]} (KL by llama-perplexity against the F32 GGUF; ratio to llama.cpp + imatrix)", file=file)
    head = "| case | MB | bpw | size ratio | " + " | ".join(f"KL {t} | ratio" for t in texts) + " | make s | peak GiB |"
    print(head, file=file)
    print("|" + "---|" * (head.count("|") - 1), file=file)
    for r in rows:
        cells = [r["case"], f"{r['bytes'] / 1e6:.2f}", f"{r['bpw']:.3f}", f"{r['bytes'] / base['bytes']:.4f}"]
        for t in texts:
            k, kb = _kl(r, t), _kl(base, t)
            cells += [f"{k:.4f}" if k is not None else "—", f"{k / kb:.3f}" if k and kb else "—"]
        cells += [f"{r['seconds']:.0f}" if r["seconds"] else "(kept)",
                  f"{r['peak_rss_bytes'] / GiB:.2f}" if r["peak_rss_bytes"] else "—"]
        print("| " + " | ".join(cells) + " |", file=file)


def show(res: dict, texts: list[str]) -> None:
    print(f"# {res['command']}\n# commit {res['commit']}, {res['date']}, {res['threads']} threads, "
          f"{res['calib_tokens']} calibration tokens, {res['chunks']}×{res['ctx']} tokens per text")
    for mix, rows in res["mixes"].items():
        show_mix(mix, rows, texts)
    if "llama_bench" in res:
        print("\n## llama-bench (tokens/s: mean over interleaved passes, each pass's mean in brackets)\n"
              "| file | pp256 | tg128 |\n|---|---|---|")
        for n, v in res["llama_bench"].items():
            cells = [f"{v.get(k + '_tok_s', 0):.1f} ({', '.join(f'{x:.1f}' for x in v.get(k + '_passes', []))})"
                     for k in ("pp", "tg")]
            print(f"| {n} | {cells[0]} | {cells[1]} |")
    print(f"\n{res['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
