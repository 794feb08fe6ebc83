"""Rotation before quantizing: KL to the original with and without it, side by side, every stored byte counted.

    OMP_NUM_THREADS=1 python bench/rotate.py --label h16rot  # SmolLM2-135M: GPTQ 3-bit g64 and 2-bit g64 (8×512 calibration)
    OMP_NUM_THREADS=1 python bench/rotate.py --cases gptq2-g64 --variants none,inputs+mlp+dyn+asym --opts range=mse2 \
        --seed 0,1,2 --label h16rot --table h16mse2     # issue 16's 2-bit row: both rows searched end by end, 3 seeds
    OMP_NUM_THREADS=2 python bench/rotate.py --cases gptq3-g64 --variants none,keep,keep+mlp --opts damp=0.01

Each case is quantized once per variant — ``none`` (no rotation), ``residual`` (the residual
stream alone, ``rotate={"heads": False}``), ``full`` (residual + each head's V→O rotation, fused:
``--rotate``; a tied head whose final norm is not 1 is untied and stored whole), ``full+mlp`` (and an
online Hadamard before down_proj, ``--rotate-mlp``), ``keep`` / ``keep+mlp`` (the same with the
embedding, final norm and tied head as stored and the stream rotated online at its ends,
``--rotate-keep-head``) — and judged by ``llmpress.evaluate`` (KL to the original, cached reference)
on each held-out text (debian-handbook, linux-doc). ``--opts k=v,...`` adds codec options to every
case (e.g. ``damp=0.01``, ``act_order=false``); ``--seed`` is the rotation's. Cases: GPTQ at 3 and 2 bits with
groups of 64 (``gptq3-g64``), 128 (``-g128``) or per channel (``-pc``), llama.cpp's Q3_K_M mix, RTN 3-bit g64.
``keep+mlp+dyn``: ``keep+mlp`` with each group's range fitted as GPTQ reaches it (``static_groups=false``,
better on the rotated model, worse on the unrotated one), against the plain unrotated row. ``inputs``,
``inputs+mlp``, ``inputs+mlp+dyn``: no residual rotation and no norm folded (``--rotate-inputs``): the
linears reading each block norm's output read it rotated online; each head's V→O rotation fused as in ``full``. ``inputs+mlp+dyn+asym``: ``inputs+mlp+dyn`` on the float-offset grid
(``--grid asym``: levels anywhere, no exact zero), against the plain unrotated row; ``none+asym``: that grid without
the rotation (far worse than the default integer-zero grid unrotated: the fair baseline stays ``none``). ``--label L`` keeps the rows in ``bench/out/rotate-L.json`` and the table in ``rotate-table-L….json``.

Prints one table: case, variant, bpw of the linears (the runner's), bpw of every stored byte
(8 × the folder's tensor bytes / the original's parameters, a tied table once), KL per text,
their mean, the ratio to the case's unrotated mean (issue 16's target: ≤ 0.7), the quantization's
seconds and the bench process's peak RSS after it. Rows are cached in ``bench/out/rotate.json``
keyed by case, options, variant and protocol (a re-run resumes); the table goes to
``bench/out/rotate-table.json`` with command, commit and date (``_record``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from _record import record  # noqa: E402

CASES: dict[str, dict] = {
    "gptq3-g64": {"method": "gptq", "bits": 3, "group_size": 64},
    "gptq2-g64": {"method": "gptq", "bits": 2, "group_size": 64},
    "gptq3-g128": {"method": "gptq", "bits": 3, "group_size": 128},
    "gptq2-g128": {"method": "gptq", "bits": 2, "group_size": 128},
    "gptq3-pc": {"method": "gptq", "bits": 3, "group_size": -1},
    "gptq2-pc": {"method": "gptq", "bits": 2, "group_size": -1},
    "gptq-q3_k_m": {"method": "gptq", "gguf_mix": "q3_k_m"},
    "rtn3-g64": {"method": "rtn", "bits": 3, "group_size": 64},
}
VARIANTS: dict[str, object] = {"none": False, "residual": {"heads": False}, "full": True, "full+mlp": {"mlp": True},
                               "keep": {"keep_head": True}, "keep+mlp": {"keep_head": True, "mlp": True}}
# variants that also change the codec's options (the rotated model's own best settings), compared with the
# case's plain unrotated row: keep+mlp+dyn fits each group's range as GPTQ reaches it (static_groups false)
VARIANTS["keep+mlp+dyn"] = VARIANTS["keep+mlp"]
# no residual rotation and no norm folded: each block norm's readers read its output rotated online (--rotate-inputs)
VARIANTS.update({"inputs": {"inputs": True}, "inputs+mlp": {"inputs": True, "mlp": True}})
VARIANTS["inputs+mlp+dyn"] = VARIANTS["inputs+mlp"]
# ...+asym: and the float-offset grid (no exact zero; none+asym: the same grid without the rotation)
VARIANTS.update({"inputs+mlp+dyn+asym": VARIANTS["inputs+mlp"], "none+asym": False})
VARIANT_OPTS: dict[str, dict[str, object]] = {"keep+mlp+dyn": {"static_groups": False}, "inputs+mlp+dyn": {"static_groups": False},
                                              "inputs+mlp+dyn+asym": {"static_groups": False, "grid": "asym"},
                                              "none+asym": {"grid": "asym"}}
# the CLI flags of a rotation (a variant's VARIANTS value), in the order the recorded commands use
CLI_FLAGS = (("keep_head", "--rotate-keep-head"), ("inputs", "--rotate-inputs"), ("mlp", "--rotate-mlp"))


def _flags(rot: object) -> str:
    if not rot:
        return ""
    spec = rot if isinstance(rot, dict) else {}
    flags = [f for k, f in CLI_FLAGS if spec.get(k)] or ["--rotate"]
    return " " + " ".join(flags) + (" (heads=False: API)" if spec.get("heads") is False else "")


def _value(s: str) -> object:
    return {"true": True, "false": False}.get(s.lower(), json.loads(s) if s[:1].isdigit() or s[:1] == "-" else s)


def _options(text: str) -> dict[str, object]:
    return {k: _value(v) for k, v in (kv.split("=", 1) for kv in text.split(",") if kv)}


def _command(model: str, case: dict, variant: str, seed: int) -> str:
    flags = ("method", "bits", "group_size", "gguf_mix", "grid", "range")
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in case.items() if k in flags)
    extra = {k: v for k, v in case.items() if k not in flags}
    api = f" (API: {extra})" if extra else ""
    return f"llmpress quantize {model} -o OUT {opts}{_flags(VARIANTS[variant])}{f' (seed {seed})' if VARIANTS[variant] else ''}{api}"


def _params(model: str) -> int:
    """The original's parameters, each stored tensor once (a tied head is not stored)."""
    from safetensors import safe_open

    from llmpress.models import TensorStore, resolve

    n = 0
    for f in TensorStore(resolve(model)).files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                size = 1
                for d in shape:
                    size *= d
                n += size
    return n


def _tensor_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--cases", default="gptq3-g64,gptq2-g64")
    ap.add_argument("--variants", default="none,none+asym,inputs+mlp+dyn,inputs+mlp+dyn+asym")
    ap.add_argument("--opts", default="", help="codec options for every case, k=v,... (e.g. damp=0.01)")
    ap.add_argument("--texts", default="debian-handbook,linux-doc")
    ap.add_argument("--tokens", type=int, default=8192, help="scored tokens per text")
    ap.add_argument("--samples", type=int, default=8, help="calibration windows (bench/quant.py's protocol)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", default="0", help="the rotation's seed, or several (0,1,2): each rotated row then "
                    "quantized once per seed, its KL the mean over them (each seed's mean KL shown beside)")
    ap.add_argument("--kind", default="auto", help="the rotation's matrices: auto (randomized Hadamard) | random")
    ap.add_argument("--label", default="", help="names the row cache bench/out/rotate-LABEL.json and the table "
                    "bench/out/rotate-table-LABEL….json (default: rotate.json, rotate-table….json)")
    ap.add_argument("--table", default=None, help="names the table bench/out/rotate-table-TABLE….json (default: the label)")
    a = ap.parse_args()

    import torch

    import llmpress

    cases, variants, texts = a.cases.split(","), a.variants.split(","), a.texts.split(",")
    seeds = [int(x) for x in str(a.seed).split(",")]
    extra = _options(a.opts)
    tag = "".join(f"|{k}={v}" for k, v in sorted(extra.items()))
    cache_file = HERE / "out" / (f"rotate-{a.label}.json" if a.label else "rotate.json")
    cache_file.parent.mkdir(exist_ok=True)
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    protocol = f"{a.model}|s{a.samples}|l{a.seq_len}|t{a.tokens}|threads{torch.get_num_threads()}"
    rec = record()
    params = _params(a.model)
    print(f"# {rec['command']}\n# commit {rec['commit']}, {rec['date']}, {torch.get_num_threads()} threads, "
          f"calibration {a.samples}×{a.seq_len}, {a.tokens} tokens per text, rotation seed(s) {a.seed}, kind {a.kind}")

    def key(c: str, v: str, seed: int) -> str:
        return f"{c}{tag}|{v}|{protocol}" + (f"|seed{seed}" + (f"|{a.kind}" if a.kind != "auto" else "")
                                              if VARIANTS[v] else "")

    def runs(v: str) -> list[int]:
        """The seeds a variant is quantized with (an unrotated one once)."""
        return seeds if VARIANTS[v] else seeds[:1]

    for c, v, seed in ((c, v, seed) for c in cases for v in variants for seed in runs(v)):
        if key(c, v, seed) in cache and all(t in cache[key(c, v, seed)]["kl"] for t in texts):
            continue
        rot = VARIANTS[v]
        spec = {"seed": seed, **({"kind": a.kind} if a.kind != "auto" else {})}
        rot = {**rot, **spec} if isinstance(rot, dict) else (spec if rot else False)
        with tempfile.TemporaryDirectory(dir=HERE / "out") as tmp:
            out = Path(tmp) / "q"
            res = llmpress.quantize(a.model, out, samples=a.samples, seq_len=a.seq_len, rotate=rot, progress=False,
                                    **CASES[c], **extra, **VARIANT_OPTS.get(v, {}))
            tensor_bytes = _tensor_bytes(out)
            # decode_once: the same figures, each quantized linear decoded once instead of at every forward
            kl = {t: llmpress.evaluate(out, a.model, t, tokens=a.tokens, decode_once=True)["kl_mean"] for t in texts}
        errs = [r["rel_out_err"] for r in res["layers"].values() if "rel_out_err" in r]
        row = {"bpw": res["bpw"], "bpw_all": 8 * tensor_bytes / params, "tensor_bytes": tensor_bytes,
               # the calibration set's layer-wise loss (geometric mean of ‖ΔW X‖²/‖W X‖²): what a choice may use
               "calib_loss": math.exp(sum(math.log(max(e, 1e-30)) for e in errs) / len(errs)) if errs else None,
               "params": params, "bytes_out": res["bytes_out"], "seconds": res["seconds"],
               "peak_rss_bytes": res["peak_rss_bytes"], "kl": kl,
               "command": _command(a.model, {**CASES[c], **extra, **VARIANT_OPTS.get(v, {})}, v, seed)
               + (f" (kind {a.kind})" if a.kind != "auto" and VARIANTS[v] else ""), "rotation": res.get("rotation"),
               **{k: rec[k] for k in ("commit", "date")}}
        cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}  # another run may have added rows
        cache[key(c, v, seed)] = row
        tmp_file = cache_file.with_suffix(".tmp")
        tmp_file.write_text(json.dumps(cache, indent=1))
        tmp_file.replace(cache_file)
        print(f"# done {c}{tag} {v} seed {seed}: {kl}", flush=True)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    rows: dict[str, dict] = {}
    for c in cases:
        for v in variants:
            per = [cache[key(c, v, seed)] for seed in runs(v)]
            # one row per variant: the first seed's record, its KL per text the mean over the seeds
            rows[f"{c}{tag}|{v}"] = {**per[0], "kl": {t: mean([r["kl"][t] for r in per]) for t in texts},
                                     "seconds": mean([r["seconds"] for r in per]),
                                     "calib_loss": mean([r["calib_loss"] for r in per]) if per[0].get("calib_loss") else None,
                                     "peak_rss_bytes": max(r.get("peak_rss_bytes", 0) for r in per),
                                     "command": per[0]["command"].replace(f"(seed {seeds[0]})", f"(seeds {a.seed})") if len(per) > 1
                                     else per[0]["command"],
                                     "per_seed": {str(s): mean([r["kl"][t] for t in texts]) for s, r in zip(runs(v), per)}}
    for c in cases:
        base = rows.get(f"{c}{tag}|none")
        for v in variants:
            r = rows[f"{c}{tag}|{v}"]
            r["kl_mean"] = mean([r["kl"][t] for t in texts])
            if base:
                r["ratio_to_unrotated"] = r["kl_mean"] / mean([base["kl"][t] for t in texts])
    table = {**rec, "protocol": protocol, "options": extra, "seeds": seeds, "kind": a.kind, "rows": rows}
    table_label = a.label if a.table is None else a.table
    name = "rotate-table" + (f"-{table_label}" if table_label else "") + "".join(f"-{k}{v}" for k, v in sorted(extra.items())) + (f"-seed{a.seed.replace(',', '_')}" if a.seed != "0" else "") \
        + (f"-{a.kind}" if a.kind != "auto" else "")
    tmp_table = HERE / "out" / f"{name}.tmp"
    tmp_table.write_text(json.dumps(table, indent=1))
    tmp_table.replace(HERE / "out" / f"{name}.json")
    print(f"\n| case | rotation | bpw linears | bpw all | {' | '.join(f'KL {t}' for t in texts)} | KL mean | × unrotated "
          f"| per seed: KL mean (× unrotated) | calibration loss | seconds | peak RSS GiB |")
    print(f"|---|---|---|---|{'---|' * len(texts)}---|---|---|---|---|---|")
    for c in cases:
        for v in variants:
            r = rows[f"{c}{tag}|{v}"]
            ratio = f"{r['ratio_to_unrotated']:.3f}" if "ratio_to_unrotated" in r else "—"
            kls = " | ".join(f"{r['kl'][t]:.4f}" for t in texts)
            loss = f"{r['calib_loss']:.4f}" if r.get("calib_loss") is not None else "—"
            base = rows[f"{c}{tag}|none"]["kl_mean"] if f"{c}{tag}|none" in rows else None
            per = ", ".join(f"{s_}: {k:.4f}" + (f" ({k / base:.3f})" if base else "") for s_, k in r["per_seed"].items()) \
                if VARIANTS[v] and len(seeds) > 1 else "—"
            print(f"| {c}{tag} | {v} | {r['bpw']:.3f} | {r.get('bpw_all', float('nan')):.3f} | {kls} | {r['kl_mean']:.4f} "
                  f"| {ratio} | {per} | {loss} | {r['seconds']:.0f} | {r.get('peak_rss_bytes', 0) / 2**30:.2f} |")
    print("\nbpw linears: the runner's, over the linears it stores (an untied head kept whole counts at its dtype's "
          "width); bpw all: every stored tensor byte over the original's parameters; calibration loss: the geometric mean "
          "over quantized linears of ‖ΔW X‖²/‖W X‖² on the calibration windows. full / full+mlp on a tied model "
          "whose final norm is not 1 store an untied head; keep / keep+mlp store the original's embedding and head. "
          "With several seeds a rotated row's KL is the mean over them (seconds: mean; peak RSS: the largest).")
    print("\ncommands:")
    for c in cases:
        for v in variants:
            print(f"  {c}{tag}/{v}: {rows[f'{c}{tag}|{v}']['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
