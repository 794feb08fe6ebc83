"""Quantization benchmark: llmpress RTN / GPTQ / AWQ against peers on SmolLM2-135M.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quant.py --configs 8:128,4:128,3:128,2:64 --samples 8 --tokens 1024
    .venv/bin/python bench/quant.py --configs 4:128,3:128 --methods rtn,gptq,awq --peers hqq,llmc-gptq

For each (bits, group size) and each contender: quantize SmolLM2-135M, then measure with
``llmpress.evaluate`` (top-128 KL to the original and perplexity, cached reference) on each
evaluation text separately — by default the two held-out domains ``llmpress.text.EVAL_DEFAULTS``
(debian-handbook, linux-doc), neither of which is in the calibration mix (python-doc, fortunes,
wordnet). Wall time is that of the quantization run only (llmpress: the whole sequential
pipeline incl. calibration forward passes and writing; per-linear peers: their quantize call
over all block linears; llm-compressor: its model load and ``oneshot`` call, calibration included,
not writing), all with
the same torch thread count (``--threads``, reported).

Peers (``PEERS``), each in its own virtual environment under ``bench/.venvs/`` (created here:
torch pinned first, then the peer with a torch pin): HQQ, optimum-quanto, torchao
(``IntxWeightOnlyConfig``, asymmetric, PerGroup), llm-compressor RTN (``QuantizationModifier``)
and GPTQ (``GPTQModifier``, its defaults otherwise), asymmetric int weights in groups like
llmpress's default grid. llm-compressor calibrates on the very windows llmpress uses (written
once to ``bench/out/quant/calib-*.json``); compressed-tensors refuses groups that do not divide
a layer's width (576 % 128 on SmolLM2), so there it runs with the largest power-of-two group
that divides every width (64), marked ``*`` in the table. This same file is each peer's worker
(``--worker``): it quantizes every block linear with the peer's own code, dequantizes and saves
the dense weights; the main process loads them into the model and evaluates with OUR protocol.

Results are cached in ``bench/out/quant.json`` keyed by contender, bits, group size and the
protocol (samples, seq_len, calibration text, tokens, texts, threads): a re-run resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))
from _record import record as provenance  # noqa: E402
VENVS = HERE / ".venvs"
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")

# ============================================================================ peer workers
# Each peer's worker runs inside its own venv and returns the dequantized weight of every block
# linear (so that OUR judge evaluates it), its quantization wall time, and the bytes it stores.
# Two kinds: per-linear peers quantize one nn.Linear at a time (timed around their quantize
# call); whole-model peers (llm-compressor) run their own pipeline on the whole model with OUR
# calibration windows (timed from their model load through their oneshot call, calibration included).


def _hqq_quantizer(bits: int, gs: int):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=gs, axis=1)

    def q(lin):
        import torch

        hl = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu", del_orig=False)
        w = hl.dequantize().float().reshape(lin.weight.shape)
        nbytes = hl.W_q.numel() * hl.W_q.element_size() + sum(
            v.numel() * v.element_size() for k, v in hl.meta.items() if k in ("scale", "zero") and hasattr(v, "numel"))
        return w, nbytes

    return q


def _quanto_quantizer(bits: int, gs: int):
    from optimum.quanto import freeze, qint2, qint4, qint8, quantize

    qtype = {2: qint2, 4: qint4, 8: qint8}.get(bits)
    if qtype is None:
        raise SystemExit(f"optimum-quanto has no int{bits} weights")

    def q(lin):
        m = __import__("torch").nn.Sequential(lin)
        quantize(m, weights=qtype)
        freeze(m)
        qw = m[0].weight  # WeightQBytesTensor (int8) or WeightQBitsTensor (int2/int4: _data, _scale, _shift)
        w = qw.dequantize().float()
        # codes at `bits` each (quanto packs int2/int4 two or four to a byte) + its float scales/shifts
        nbytes = qw._data.numel() * bits / 8 + sum(
            t.numel() * t.element_size() for t in (qw._scale, getattr(qw, "_shift", None)) if t is not None)
        return w, nbytes

    return q


def _torchao_quantizer(bits: int, gs: int):
    """torchao ``IntxWeightOnlyConfig`` (int1..int8 weights, asymmetric, PerGroup): the CPU path
    (``Int4WeightOnlyConfig`` needs CUDA). PerGroup needs ``in % gs == 0``; a ragged width is
    zero-padded to whole groups and cropped after: exact, since torchao's asymmetric range
    always contains 0, so the zero columns change no group's scale or zero point."""
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
    from torchao.quantization.granularity import PerGroup

    cfg = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(gs),
                               mapping_type=MappingType.ASYMMETRIC)

    def q(lin):
        out_f, in_f = lin.weight.shape
        pad = -in_f % gs
        m = torch.nn.Sequential(torch.nn.Linear(in_f + pad, out_f, bias=False))
        with torch.no_grad():
            m[0].weight.copy_(torch.nn.functional.pad(lin.weight, (0, pad)))
        quantize_(m, cfg)
        qw = m[0].weight
        w = qw.dequantize().float()[:, :in_f]
        groups = out_f * -(-in_f // gs)  # real groups only: the padding is not stored
        nbytes = out_f * in_f * bits / 8 + groups * (qw.scale.element_size() + qw.zero_point.element_size())
        return w, nbytes

    return q


def _llmc_scheme(bits: int, gs: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    # asymmetric int, groups along the input dimension: as llmpress's default grid
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=gs)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}


def _llmc(method: str):
    """llm-compressor ``oneshot``: RTN = QuantizationModifier, GPTQ = GPTQModifier (its defaults
    otherwise), asymmetric int weights in groups, lm_head ignored; calibration = our windows."""

    def run(bits: int, gs: int, src: str, calib: str):
        import torch
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
        from transformers import AutoModelForCausalLM

        t, c = time.perf_counter(), time.process_time()  # from the load, as llmpress's time counts its own
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        widths = {m.in_features for n, m in model.named_modules() if LINEAR.match(f"{n}.weight")}
        g = gs
        while any(w % g for w in widths):  # compressed-tensors refuses ragged groups (576 % 128 on SmolLM2)
            g //= 2
        if g != gs:
            print(f"llm-compressor: group size {gs} does not divide widths {sorted(widths)}; using {g}", file=sys.stderr)
        cls = {"rtn": QuantizationModifier, "gptq": GPTQModifier}[method]
        mod = cls(config_groups=_llmc_scheme(bits, g), ignore=["lm_head"])
        kw = {}
        if method == "gptq":
            from datasets import Dataset

            ids = json.loads(Path(calib).read_text())
            kw = {"dataset": Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}),
                  "num_calibration_samples": len(ids), "max_seq_length": len(ids[0])}
        oneshot(model=model, recipe=[mod], **kw)
        secs, cpu = time.perf_counter() - t, time.process_time() - c
        out, nbytes, n = {}, 0.0, 0
        with torch.no_grad():
            for name, m in model.named_modules():
                k = f"{name}.weight"
                if not LINEAR.match(k):
                    continue
                args = m.quantization_scheme.weights
                w = fake_quantize(m.weight.float(), m.weight_scale, m.weight_zero_point, args)
                out[k] = w.float().contiguous()
                n += w.numel()
                nbytes += w.numel() * bits / 8 + m.weight_scale.numel() * m.weight_scale.element_size() + m.weight_zero_point.numel() * bits / 8
        return out, secs, nbytes, n, {"cpu_seconds": cpu, **({"group_size_used": g} if g != gs else {})}

    return run


def _per_linear(factory):
    """A whole-model runner from a per-linear quantizer: every block linear, timed one by one."""

    def run(bits: int, gs: int, src: str, calib: str):
        import torch
        from safetensors import safe_open

        q = factory(bits, gs)
        out, secs, cpu, nbytes, n = {}, 0.0, 0.0, 0.0, 0
        for f in sorted(Path(src).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    if not LINEAR.match(k):
                        continue
                    w = h.get_tensor(k).float()
                    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                    lin.weight.data.copy_(w)
                    t, c = time.perf_counter(), time.process_time()
                    wq, nb = q(lin)
                    secs, cpu = secs + time.perf_counter() - t, cpu + time.process_time() - c
                    out[k] = wq.contiguous()
                    nbytes += nb
                    n += w.numel()
        return out, secs, nbytes, n, {"cpu_seconds": cpu}

    return run


# peer name -> (its venv, pip packages of that venv, its runner)
PEERS = {
    "hqq": ("hqq", ["hqq==0.2.8.post1", "safetensors"], _per_linear(_hqq_quantizer)),
    "quanto": ("quanto", ["optimum-quanto==0.2.7", "safetensors"], _per_linear(_quanto_quantizer)),
    "torchao": ("torchao", ["torchao==0.18.0", "safetensors", "numpy"], _per_linear(_torchao_quantizer)),
    "llmc-rtn": ("llmc", ["llmcompressor==0.14.0.1", "safetensors"], _llmc("rtn")),
    "llmc-gptq": ("llmc", ["llmcompressor==0.14.0.1", "safetensors"], _llmc("gptq")),
}


def worker(peer: str, bits: int, gs: int, src: str, dst: str, threads: int, calib: str) -> None:
    """Runs inside the peer's venv: quantize every block linear, save the dequantized weights."""
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    out, secs, nbytes, n, extra = PEERS[peer][2](bits, gs, src, calib)
    save_file(out, dst)
    print(json.dumps({"seconds": secs, "bpw": 8 * nbytes / max(1, n) if nbytes else None, **extra}))


def ensure_venv(peer: str) -> Path:
    """The peer's venv under bench/.venvs (created once: torch pinned first, then the peer)."""
    name, pkgs, _ = PEERS[peer]
    py, ok = VENVS / name / "bin" / "python", VENVS / name / ".installed"
    if ok.exists() or (py.exists() and name in ("hqq", "quanto")):  # hqq/quanto venvs predate the marker
        return py
    VENVS.mkdir(parents=True, exist_ok=True)
    pin = VENVS / "pin.txt"
    pin.write_text("torch==2.13.0\n")
    subprocess.run(["python3", "-m", "venv", str(VENVS / name)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(pin), *pkgs], check=True)
    ok.write_text(" ".join(pkgs) + "\n")
    return py


# ============================================================================ main process
def run_peer(peer: str, bits: int, gs: int, src: Path, threads: int, calib: Path) -> tuple[dict, Path] | None:
    py = ensure_venv(peer)
    dst = OUT / "quant" / f"{peer}-{bits}b-g{gs}.safetensors"
    dst.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([str(py), __file__, "--worker", peer, "--bits", str(bits), "--group-size", str(gs),
                        "--src", str(src), "--dst", str(dst), "--threads", str(threads), "--calib-ids", str(calib)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        log_path = dst.with_suffix(".log")
        log_path.write_text(r.stdout + r.stderr)
        print(f"  {peer} {bits}b g{gs}: failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]} (log: {log_path})",
              file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1]), dst


def load_with(src: Path, weights: Path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    sd = load_file(str(weights))
    with torch.no_grad():
        for k, w in sd.items():
            model.get_parameter(k).copy_(w)
    return model


def fidelity(model, texts: list[str], tokens: int, tokenizer=None) -> dict:
    from llmpress.eval import evaluate

    out = {}
    for t in texts:
        r = evaluate(model, "smollm2-135m", t, tokens=tokens, tokenizer=tokenizer)
        out[t] = {"kl_mean": r["kl_mean"], "ppl": r["ppl"], "ref_ppl": r.get("ref_ppl"), "top1": r.get("top1")}
    return out


def _value(x: str) -> int | float | str:
    for f in (int, float):
        try:
            return f(x)
        except ValueError:
            pass
    return x


def _num(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 1e5 else f"{x:.2e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="8:128,4:128,3:128,2:64", help="bits:group_size,...")
    ap.add_argument("--methods", default="rtn,gptq,awq", help="llmpress methods")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"peers (own venvs): {', '.join(PEERS)}; '' for none")
    ap.add_argument("--samples", type=int, default=8, help="calibration windows (gptq, awq)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", default=None, help="calibration text (default: llmpress.text.CALIB_DEFAULT)")
    ap.add_argument("--tokens", type=int, default=1024, help="evaluation tokens per text")
    ap.add_argument("--texts", default=None, help="evaluation texts (default: llmpress.text.EVAL_DEFAULTS)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--seed-grid", action="store_true", help="also the seed formula's grid (RTN, grid=seed / seed_rtn)")
    ap.add_argument("--variant", action="append", default=[],
                    help="extra llmpress contender NAME:METHOD:key=val,... e.g. gptq-ao:gptq:act_order=1,damp=0.05")
    ap.add_argument("--redo", default="", help="contenders to measure again although cached, e.g. llmpress-gptq,llmc-gptq")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--bits", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--group-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    ap.add_argument("--calib-ids", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.bits, a.group_size, a.src, a.dst, a.threads, a.calib_ids)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    import llmpress
    from llmpress.models import load_tokenizer, resolve
    from llmpress.pipeline import calib_ids
    from llmpress.text import CALIB_DEFAULT, EVAL_DEFAULTS, load_text

    texts = a.texts.split(",") if a.texts else list(EVAL_DEFAULTS)
    src = resolve("smollm2-135m").path
    tok = load_tokenizer(src)
    configs = [tuple(int(x) for x in c.split(":")) for c in a.configs.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    peers = [p for p in a.peers.split(",") if p]
    OUT.mkdir(parents=True, exist_ok=True)
    res_path = OUT / "quant.json"
    rows: list[dict] = json.loads(res_path.read_text()) if res_path.exists() else []
    # a cached row counts only if measured under this protocol (rows without one are re-run)
    protocol = {"samples": a.samples, "seq_len": a.seq_len, "calib": a.calib or CALIB_DEFAULT, "tokens": a.tokens,
                "texts": texts, "threads": a.threads}
    redo = set(a.redo.split(","))
    done = {(r["who"], r["bits"], r["group_size"]) for r in rows if r.get("protocol") == protocol and r["who"] not in redo}
    # the very calibration windows llmpress uses, for the peers that calibrate (llm-compressor GPTQ)
    calib_path = OUT / "quant" / f"calib-{protocol['calib']}-{a.samples}x{a.seq_len}.json"
    calib_path.parent.mkdir(parents=True, exist_ok=True)
    if not calib_path.exists():
        ids = calib_ids(tok, load_text(protocol["calib"]), a.samples, a.seq_len)
        calib_path.write_text(json.dumps(ids.tolist()))

    def record(row: dict) -> None:
        # re-read before writing: another bench process (e.g. peers only) may share the file
        fresh = json.loads(res_path.read_text()) if res_path.exists() else []
        row["protocol"] = protocol
        row.update(provenance())  # command, commit, date of the run that measured this row
        key = (row["who"], row["bits"], row["group_size"])
        rows[:] = [r for r in fresh if (r["who"], r["bits"], r["group_size"]) != key] + [row]
        res_path.write_text(json.dumps(rows, indent=1))
        f = " ".join(f"{t}: KL {v['kl_mean']:.4f} PPL {v['ppl']:.2f}" for t, v in row["eval"].items())
        print(f"  {row['who']:<16} {row['bits']}b g{row['group_size']:<4} bpw {row.get('bpw') or float('nan'):.3f}  "
              f"{row['seconds']:.1f}s  {f}", flush=True)

    extra = [("rtn", {"grid": "seed"}, "llmpress-seed"), ("rtn", {"grid": "seed_rtn"}, "llmpress-seed_rtn")] if a.seed_grid else []
    for v in a.variant:
        name, method, kv = (v.split(":", 2) + [""])[:3]
        opts = {k: _value(x) for k, x in (p.split("=") for p in kv.split(",") if p)}
        extra.append((method, opts, f"llmpress-{name}"))
    for bits, gs in configs:
        for m, opts, who in [(m, {}, f"llmpress-{m}") for m in methods] + extra:
            if (who, bits, gs) in done:
                continue
            out = OUT / "quant" / f"{who}-{bits}b-g{gs}"
            t, c = time.perf_counter(), time.process_time()
            r = llmpress.quantize(src, out, method=m, bits=bits, group_size=gs, calib=a.calib, samples=a.samples,
                                  seq_len=a.seq_len, force=True, progress=False, **opts)
            secs, cpu = time.perf_counter() - t, time.process_time() - c
            record({"who": who, "bits": bits, "group_size": gs, "bpw": r["bpw"], "seconds": secs, "cpu_seconds": cpu,
                    "eval": fidelity(out, texts, a.tokens)})
        for p in peers:
            if (p, bits, gs) in done:
                continue
            got = run_peer(p, bits, gs, src, a.threads, calib_path)
            if got is None:
                continue
            info, weights = got
            model = load_with(src, weights)
            record({"who": p, "bits": bits, "group_size": gs, "bpw": info.get("bpw"), "seconds": info["seconds"],
                    **{k: info[k] for k in ("group_size_used", "cpu_seconds") if k in info},
                    "eval": fidelity(model, texts, a.tokens, tok)})
            del model

    print(f"\nSmolLM2-135M, {a.threads} thread(s) (secs: wall time of the quantization; cpu s: its CPU time, "
          "less sensitive to a shared machine's load); calibration {a.samples}×{a.seq_len} tokens of "
          f"{a.calib or 'calib-mix'}; eval {a.tokens} tokens per text, top-128 KL to the original")
    head = f"{'contender':<22}{'bits':>5}{'g':>5}{'bpw':>7}{'secs':>8}{'cpu s':>8}" + "".join(f"{'KL ' + t[:10]:>16}{'PPL':>9}" for t in texts)
    print(head)
    rows = json.loads(res_path.read_text()) if res_path.exists() else rows
    stale = [r for r in rows if r.get("protocol") != protocol]
    rows = [r for r in rows if r.get("protocol") == protocol]
    for r in sorted(rows, key=lambda r: (-r["bits"], r["group_size"], r["who"])):
        cells = "".join(f"{r['eval'][t]['kl_mean']:>16.4f}{_num(r['eval'][t]['ppl']):>9}" if t in r["eval"] else " " * 25
                        for t in texts)
        bpw = f"{r['bpw']:.3f}" if r.get("bpw") else "-"
        g = f"{r['group_size_used']}*" if r.get("group_size_used") else str(r["group_size"])
        cpu = f"{r['cpu_seconds']:.1f}" if r.get("cpu_seconds") is not None else "-"
        print(f"{r['who']:<22}{r['bits']:>5}{g:>5}{bpw:>7}{r['seconds']:>8.1f}{cpu:>8}{cells}")
    if any(r.get("group_size_used") for r in rows):
        print("* the peer refused that group size (a width not divisible by it) and ran with the one shown")
    if stale:
        print(f"({len(stale)} row(s) of {res_path.name} measured under another protocol not shown)")
    print(f"\nresults: {res_path}")


if __name__ == "__main__":
    main()
