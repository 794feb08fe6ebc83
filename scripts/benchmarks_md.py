"""Write docs/BENCHMARKS.md from the bench outputs under bench/out/: every figure with its command, commit and date.

    python scripts/benchmarks_md.py                      # bench/out → docs/BENCHMARKS.md
    python scripts/benchmarks_md.py --out-dir DIR -o FILE

README.md's one results table (between its ``results`` markers) is written here too. Nothing is typed by hand: each section is made by a renderer from one bench's JSON (the
table ``BENCHES``: output file → renderer, the command that makes it and what it measures). A bench
whose output is absent is listed with the command that records it. Rows written before the benches
recorded their provenance (``bench/_record.py``) say so instead of a commit.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out"
DOC = REPO / "docs" / "BENCHMARKS.md"
UNRECORDED = "not recorded"


def _f(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "—"
    if isinstance(v, int) and not isinstance(v, bool) and spec == ".4g":
        return str(v)
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _gib(b: Any) -> str:
    return "—" if not b else f"{b / 2**30:.2f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]


def _prov(d: dict[str, Any], path: Path | None = None) -> list[str]:
    """The command, commit and date of one output (or the file's own date where they were not recorded)."""
    if d.get("command"):
        return [f"- command: `{d['command']}`", f"- commit: `{d.get('commit', UNRECORDED)}`, date: {d.get('date', UNRECORDED)}", ""]
    when = f"file written {_mtime(path)}" if path else UNRECORDED
    return [f"- command, commit: {UNRECORDED} (written before the bench recorded them; {when})", ""]


def _mtime(path: Path) -> str:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")


def _cell_prov(r: dict[str, Any]) -> str:
    return f"`{r['commit']}` {str(r.get('date', ''))[:16]}" if r.get("commit") else UNRECORDED


# --- renderers: (path, data) → markdown lines -------------------------------------------------------

def frontier(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/frontier.py: rows keyed by point + protocol; each row records its own provenance."""
    groups: dict[str, list[dict]] = {}
    for key, row in data.items():
        proto = json.loads(key)
        proto.pop("label", None)
        groups.setdefault(json.dumps(proto, sort_keys=True), []).append(row)
    lines: list[str] = []
    for pk, rows in sorted(groups.items()):
        p = json.loads(pk)
        texts = p.get("texts", [])
        lines += [f"Model `{p.get('model')}`; calibration {p.get('samples')}×{p.get('seq_len')} tokens of the calibration "
                  f"mix; KL (top-128 estimate, nats per token) on {p.get('tokens')} tokens of each of {', '.join(texts)} "
                  f"(ctx {p.get('ctx')}).", ""]
        cmds = sorted({r["command"] for r in rows if r.get("command")})
        for c in cmds:
            lines.append(f"- command: `{c}`")
        old = [r for r in rows if not r.get("command")]
        mixed = [mt for r in old if (mt := _menu_target(r["label"]))]
        points = [r["label"].split("-") for r in old if r.get("bpw") is not None and not _menu_target(r["label"])]
        uniform = sorted({f"{b[1:]}:{g[1:]}" for _, b, g in points})
        if old:
            lines.append(f"- rows marked {UNRECORDED}: measured before the bench recorded its provenance; to measure "
                         f"them again, remove them from bench/out/frontier/results.json and run `python bench/frontier.py "
                         f"--model {p.get('model')} --samples {p.get('samples')} --seq-len {p.get('seq_len')} --ctx "
                         f"{p.get('ctx')} --tokens {p.get('tokens')}"
                         + (f" --menus {','.join(sorted({m for m, _ in mixed}))} --targets "
                            f"{','.join(sorted({f'{t:g}' for _, t in mixed}, key=float))}" if mixed else "")
                         + (f" --uniform-methods {','.join(sorted({m for m, _, _ in points}))} --uniform {','.join(uniform)}"
                            if points else "") + "`")
        lines.append("")
        points = [r for r in rows if r.get("bpw") is not None]
        head = ["point", "bpw", *[f"KL {t}" for t in texts], "KL mean", "predicted ΔKL", "time s", "peak RSS GiB", "commit, date"]
        body = []
        for r in sorted(points, key=lambda r: r["bpw"]):
            a = r.get("alloc") or {}
            body.append([f"`{r['label']}`", _f(r["bpw"], ".3f"), *[_f(r.get(f"kl:{t}"), ".4f") for t in texts],
                         _f(r.get("kl"), ".4f"), _f(a.get("predicted_dkl"), ".4f"), _f(r.get("seconds"), ".0f"),
                         _gib(r.get("peak_rss_bytes")), _cell_prov(r)])
        lines += _table(head, body) + _frontier_menus(rows)
    return lines


def _menu_target(label: str) -> tuple[str, float] | None:
    """``mixed-<menu>-<target>`` → (menu, target); None for any other label."""
    if not label.startswith("mixed-"):
        return None
    menu, target = label[len("mixed-"):].rsplit("-", 1)
    return menu, float(target)


def _frontier_menus(rows: list[dict[str, Any]]) -> list[str]:
    """Each menu's mixed point beside the best uniform point at equal or lower bpw (ratio of mean KLs; ✓ at ≤ 0.85),
    the sensitivity tables measured, and the targets a menu cannot reach."""
    uniform = [r for r in rows if r.get("bpw") is not None and r.get("kl") is not None
               and not r["label"].startswith(("mixed-", "sensitivity-"))]
    mixed: dict[float, dict[str, dict]] = {}
    for r in rows:
        mt = _menu_target(r["label"])
        if mt:
            mixed.setdefault(mt[1], {})[mt[0]] = r
    menus = sorted({m for by in mixed.values() for m in by})
    lines: list[str] = []
    if menus and uniform:
        lines += [f"Each menu's mixed point against the best uniform point ({', '.join(sorted({r['label'].split('-', 1)[0] for r in uniform}))}) "
                  "at equal or lower bpw: bpw, KL mean (KL / the uniform point's KL; ✓ at ≤ 0.85).", ""]
        body = []
        for t, by in sorted(mixed.items()):
            cells = []
            for m in menus:
                r = by.get(m)
                if r is None:
                    cells.append("—")
                elif "infeasible" in r or r.get("kl") is None:
                    cells.append("not reachable" if "infeasible" in r else "—")
                else:
                    u = min((x for x in uniform if x["bpw"] <= r["bpw"] + 1e-9), key=lambda x: x["kl"], default=None)
                    ratio = r["kl"] / u["kl"] if u else None
                    mark = "" if ratio is None else (" ✓" if ratio <= 0.85 else " ✗")
                    cells.append(f"{_f(r['bpw'], '.3f')}, {_f(r['kl'], '.4f')} ({_f(ratio, '.2f')}{mark}) vs `{u['label'] if u else '—'}`")
            body.append([f"{t:g}", *cells])
        lines += _table(["target bpw", *[f"menu `{m}`" for m in menus]], body)
    sens = [r for r in rows if r["label"].startswith("sensitivity-")]
    if sens:
        lines += _table(["sensitivity table", "options measured", "time s", "peak RSS GiB", "commit, date"],
                        [[f"`{r['label'][len('sensitivity-'):]}`", _f(r.get("options")), _f(r.get("seconds"), ".0f"),
                          _gib(r.get("peak_rss_bytes")), _cell_prov(r)] for r in sorted(sens, key=lambda r: r["label"])])
    lines += [f"- `{r['label']}`: not reachable: {r['infeasible']}" for r in rows if "infeasible" in r]
    return lines + ([""] if lines and lines[-1] != "" else [])


def gguf(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/gguf_llamacpp.py: llama.cpp's K-quant mixes beside llmpress's, judged by llama-perplexity."""
    lines = _prov(data) + [
        f"Model `{data.get('model')}`, {data.get('threads')} threads; calibration {data.get('samples')}×{data.get('seq_len')} "
        f"tokens; KL and PPL by llama.cpp's `llama-perplexity --kl-divergence` on {data.get('chunks')} chunks of "
        f"{data.get('ctx')} tokens of each text; importance matrix in {_f(data.get('imatrix_seconds'), '.0f')} s.", ""]
    texts: list[str] = []
    for cases in data.get("mixes", {}).values():
        for c in cases:
            texts += [t for t in c.get("kl", {}) if t not in texts]
    head = ["mix", "case", "bytes", "bpw", *[f"KL {t}" for t in texts], *[f"same top-1 {t}" for t in texts],
            *[f"PPL {t} (original)" for t in texts], "time s", "peak RSS GiB"]
    body = []
    for mix, cases in data.get("mixes", {}).items():
        for c in cases:
            kl = c.get("kl", {})
            body.append([mix, c["case"], _f(c.get("bytes"), ","), _f(c.get("bpw"), ".3f"),
                         *[_f(kl.get(t, {}).get("kl_mean"), ".4f") for t in texts],
                         *[_f(kl.get(t, {}).get("same_top"), ".4f") for t in texts],
                         *[f"{_f(kl.get(t, {}).get('ppl'), '.3f')} ({_f(kl.get(t, {}).get('ppl_base'), '.3f')})" for t in texts],
                         _f(c.get("seconds") or None, ".0f"), _gib(c.get("peak_rss_bytes"))])
    lines += _table(head, body)
    bench = data.get("llama_bench") or {}
    if bench:
        lines += ["`llama-bench` (tokens/s; prompt processing, generation):", ""]
        lines += _table(["case", "pp tok/s", "tg tok/s"], [[k, _f(v.get("pp_tok_s"), ".1f"), _f(v.get("tg_tok_s"), ".1f")]
                                                          for k, v in bench.items()])
    return lines


def scale(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/scale.py: each step a fresh process under a memory cap."""
    lines = _prov(data) + [f"Memory cap: {_gib(data.get('cap_bytes'))} GiB ({data.get('cap')}); {data.get('threads')} threads.", ""]
    body = []
    for r in data.get("rows", []):
        extra = f"; {r['blocks']} blocks run, whole run extrapolated to {_f(r['extrapolated_seconds'], '.0f')} s" \
            if r.get("extrapolated_seconds") else ""
        body.append([r["step"], r.get("model", ""), _f(r.get("bytes") and r["bytes"] / 1e9, ".2f"), _f(r.get("seconds"), ".0f"),
                     _f(r.get("work_seconds"), ".0f"), _f(r.get("mb_per_s"), ".1f"), _gib(r.get("peak_rss_bytes")),
                     (r.get("note") or "") + extra])
    return lines + _table(["step", "model", "size GB", "seconds", "work s", "MB/s", "peak RSS GiB", "note"], body)


def fuzz(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/fuzz.py --state: malformed inputs per reader and what each reader did with them."""
    lines = _prov(data, path) + [f"Seed {data.get('seed')}.", ""]
    body = []
    for reader, st in data.get("readers", {}).items():
        t = st.get("tally", {})
        c = t.get("counts", {})
        body.append([reader, _f(st.get("next")), _f(st.get("seconds"), ".0f"), _f(st.get("cpu"), ".0f"),
                     *[_f(c.get(k)) for k in ("refused", "accepted", "wrong", "crash")], _f(t.get("hangs")),
                     _f(t.get("slowest"), ".3f"), _f(len(t.get("failures", [])))])
    lines += _table(["reader", "inputs", "wall s", "CPU s", "refused", "accepted", "wrong", "crash", "hangs",
                     "slowest CPU s", "failures kept"], body)
    for reader, st in data.get("readers", {}).items():
        for f in st.get("tally", {}).get("failures", []):
            lines.append(f"- {reader} input {f.get('index')}: {f.get('kind')}: {f.get('what')}: {f.get('detail')}")
    return lines + ([""] if lines[-1] != "" else [])


def lossless(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/lossless.py: ratio and throughput of each tool on the same files (best of the reps)."""
    lines = _prov(data, path) + [f"{data.get('cpus')} CPUs; best of {data.get('reps', '?')} interleaved reps; MB/s of the "
                                 "original file; ratio = compressed / original bytes.", ""]
    body = [[r["file"], r["tool"], _f(r["threads"]), _f(r["bytes_in"], ","), _f(r["ratio"], ".5f"), _f(r["enc_MBps"], ".1f"),
             _f(r["dec_MBps"], ".1f"), _f(r.get("dec_sha_MBps"), ".1f")] for r in data.get("rows", [])]
    return lines + _table(["file", "tool", "threads", "bytes", "ratio", "encode MB/s", "decode MB/s", "decode + sha256 MB/s"], body)


def lossless_fp8(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/lossless.py on FP8 inputs: ratio beside its entropy bound, decode speed against the BF16 input's."""
    lines = lossless(path, data)
    bounds = data.get("bounds") or {}
    if bounds:
        lines += ["Entropy bound of each FP8 input (chunk-adaptive, fraction of the file), and its decode MB/s over the BF16 "
                  "input's (same tool and threads; by wall time and by the process's CPU time):", ""]
        body = [[label, _f(b.get("bound_chunk_ratio"), ".4f")] for label, b in bounds.items()]
        lines += _table(["file", "bound"], body) + _dec_vs_bf16(data)
    return lines


def _dec_vs_bf16(data: dict[str, Any]) -> list[str]:
    body = [[r["file"], r["tool"], _f(r["threads"]), _f(r.get("dec_vs_BF16"), ".2f"), _f(r.get("dec_cpu_vs_BF16"), ".2f")]
            for r in data.get("rows", []) if r.get("dec_vs_BF16")]
    return _table(["file", "tool", "threads", "decode / BF16, wall", "decode / BF16, CPU"], body) if body else []


def lossless_gguf(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/lossless.py on GGUF files: ratio beside the entropy bound, decode speed against the BF16 input's, and
    each block type's fields (scales, mins, codes) packed against their bound."""
    lines = lossless(path, data)
    files = data.get("gguf") or {}
    if not files:
        return lines
    ratio = {r["file"]: r["ratio"] for r in data.get("rows", []) if r["tool"].startswith("llmpress")}
    lines += ["Entropy bound of each GGUF file (fraction of the file) beside llmpress's ratio, and decode MB/s over the "
              "BF16 input's (same tool and threads; by wall time and by the process's CPU time):", ""]
    lines += _table(["file", "llmpress ratio", "bound"], [[f, _f(ratio.get(f), ".4f"), _f(g.get("bound_ratio"), ".4f")]
                                                       for f, g in files.items()]) + _dec_vs_bf16(data)
    fields = sorted(dict.fromkeys(k for g in files.values() for t in g.get("types", {}).values() for k in t.get("packed_bpw", {})),
                    key=lambda k: k == "codes")  # scales first, codes last
    lines += ["Per block type: bits a weight as stored, and each field's bits a weight packed (its bound in brackets); "
              "a field a type lacks is —.", ""]
    body = []
    for f, g in files.items():
        for name, t in g.get("types", {}).items():
            packed, bound = t.get("packed_bpw", {}), t.get("bound_bpw", {})
            body.append([f, name, _f(t.get("weights"), ","), _f(t.get("bits_per_weight"), ".5g"),
                         *[f"{_f(packed[k], '.3f')} ({_f(bound.get(k), '.3f')})" if k in packed else "—" for k in fields],
                         _f(sum(packed.values()), ".3f"), _f(sum(packed.values()) / t["bits_per_weight"], ".4f")
                         if t.get("bits_per_weight") else "—"])
    return lines + _table(["file", "type", "weights", "stored bits", *fields, "packed bits", "packed / stored"], body)


def delta(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/delta.py: a fine-tuned checkpoint packed alone and against its base (``pack --base``)."""
    lines = _prov(data, path) + [
        f"{data.get('threads')} threads; ratio = .llmp / the checkpoint's bytes; × smaller = alone / with the base; "
        "shares: of the chunks, coded alone, as the XOR with the base, as the difference from it; MB/s of the original "
        "bytes; decode × plain = decode MB/s with the base over without.", ""]
    rows = data.get("rows", [])
    body = []
    for r in rows:
        sh = r.get("share", {})
        body.append([r["case"], _f(r.get("bytes_in"), ","), _f(r.get("alone_bytes"), ","), _f(r.get("alone_ratio"), ".4f"),
                     _f(r.get("delta_bytes"), ","), _f(r.get("delta_ratio"), ".4f"), _f(r.get("x_smaller"), ".2f"),
                     _f(r.get("alone_bits_per_param"), ".2f"), _f(r.get("delta_bits_per_param"), ".2f"),
                     " / ".join(_f(sh.get(k), ".0%") for k in ("alone", "xor", "diff")),
                     f"{_f(r.get('encode_mbs_alone'), '.0f')} / {_f(r.get('encode_mbs_delta'), '.0f')}",
                     f"{_f(r.get('decode_mbs_alone'), '.0f')} / {_f(r.get('decode_mbs_delta'), '.0f')}",
                     _f(r.get("decode_vs_plain"), ".2f")])
    lines += _table(["case", "bytes", "pack", "ratio", "pack --base", "ratio", "× smaller", "bits/param", "bits/param --base",
                     "shares alone / xor / diff", "enc MB/s plain / --base", "dec MB/s plain / --base", "dec × plain"], body)
    train = [[r["case"], _f(t.get("steps")), _f(t.get("lr"), ".0e"), f"{t.get('batch')}×{t.get('seq')}", str(t.get("corpus")),
              _f(t.get("seconds"), ".0f"), f"`{t.get('commit', UNRECORDED)}`"] for r in rows if (t := r.get("training"))]
    if train:
        lines += ["The fine-tunes (AdamW, FP32 master weights, from the base):", ""]
        lines += _table(["case", "steps", "lr", "batch×seq", "corpus", "train s", "trained at commit"], train)
    return lines


def rotate(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/rotate.py: each case quantized unrotated and under each rotation variant, judged by KL."""
    opts = data.get("options") or {}
    lines = _prov(data, path) + [
        f"Protocol `{data.get('protocol')}`; rotation seed{'s' if len(data.get('seeds', [0])) > 1 else ''} "
        f"{', '.join(map(str, data.get('seeds', [data.get('seed')])))}, kind `{data.get('kind')}`"
        + (f"; options {', '.join(f'{k}={v}' for k, v in opts.items())}" if opts else "")
        + ". KL in nats per token; × unrotated = KL mean / the same case's unrotated KL mean; calibration loss: the "
        "geometric mean over the layers of each layer's relative output error on the calibration tokens; time and "
        "peak RSS of the quantization as `llmpress.quantize` reports them"
        + ("; with several seeds a rotated row is the mean over them, each seed's KL mean (× unrotated) beside it"
           if len(data.get("seeds", [0])) > 1 else "") + ".", ""]
    rows = data.get("rows", {})
    texts = list(dict.fromkeys(t for r in rows.values() for t in r.get("kl", {})))
    seeded = len(data.get("seeds", [0])) > 1
    body = []
    for key, r in rows.items():
        case, *_, variant = key.split("|")
        base = rows.get(key.rsplit("|", 1)[0] + "|none", {}).get("kl_mean")  # the same case and options, unrotated
        per = ", ".join(f"{s}: {k:.4f}" + (f" ({k / base:.3f})" if base else "") for s, k in r["per_seed"].items()) \
            if seeded and len(r.get("per_seed", {})) > 1 else "—"
        body.append([case, variant, _f(r.get("bpw"), ".3f"), *[_f(r.get("kl", {}).get(t), ".4f") for t in texts],
                     _f(r.get("kl_mean"), ".4f"), _f(r.get("ratio_to_unrotated"), ".3f"), *([per] if seeded else []),
                     _f(r.get("calib_loss"), ".5f"), _f(r.get("seconds"), ".0f"), _gib(r.get("peak_rss_bytes"))])
    return lines + _table(["case", "rotation", "bpw", *[f"KL {t}" for t in texts], "KL mean", "× unrotated",
                           *(["per seed"] if seeded else []), "calibration loss", "time s", "peak RSS GiB"], body)


def rotate_floor(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/rotate_floor.py: the grid's weight-space error, unrotated / rotated / i.i.d. Gaussian."""
    lines = _prov(data, path) + [
        f"Model `{data.get('model')}`, {data.get('linears')} block linears (every {data.get('every')}-th block); rotation "
        f"`keep+mlp`, seed {data.get('seed')}. Relative error ‖Ŵ − W‖²/‖W‖² of round-to-nearest on GPTQ's default grid "
        "(asymz, clipping search), geometric mean over the linears; i.i.d. Gaussian: weights of the same shapes and "
        "per-row variance (what a rotation that made every group Gaussian reaches).", ""]
    shape = data.get("shape", {})
    lines += _table(["weights", "excess kurtosis", "group-64 max/rms"],
                    [[v, _f(r.get("excess_kurtosis"), ".2f"), _f(r.get("group64_max_over_rms"), ".2f")]
                     for v, r in shape.items()])
    body = [[_f(r["bits"]), "per channel" if r["group_size"] == -1 else _f(r["group_size"]),
             *[_f(r["rel_err"].get(v), ".5f") for v in ("unrotated", "rotated", "gaussian")],
             _f(r.get("rotated_over_unrotated"), ".3f"), _f(r.get("gaussian_over_unrotated"), ".3f")]
            for r in data.get("rows", [])]
    return lines + _table(["bits", "group", "unrotated", "rotated", "i.i.d. Gaussian", "rotated / unrotated",
                           "Gaussian / unrotated"], body)


def rotate_learned(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/rotate_learned.py: one case unrotated, under the Hadamard R1 and under learned R1s, judged by KL."""
    lines = _prov(data, path) + [
        f"Protocol `{data.get('protocol')}`. Rotated rows are `keep+mlp` (per-head V→O and down_proj's Hadamards, "
        "embedding and head as stored) with R1 = I (identity), the randomized Hadamard R0 (hadamard) or R0·exp(A − Aᵀ) "
        "learned by Adam on the KL of the RTN-fake-quantized model on the calibration windows (learned; tb: the bits "
        "learned on, scales: the block norms' weights learned too); dyn: `static_groups=false`. KL in nats per token; "
        "× unrotated against the `none` row; fake-quant KL: the learning's objective on the calibration windows "
        "at R0 and at the learned R1.", ""]
    rows = data.get("rows", {})
    texts = list(dict.fromkeys(t for r in rows.values() for t in r.get("kl", {})))
    body = []
    for label, r in rows.items():
        lrn = r.get("learning") or {}
        body.append([data.get("case", ""), label, *[_f(r.get("kl", {}).get(t), ".4f") for t in texts],
                     _f(r.get("kl_mean"), ".4f"), _f(r.get("ratio_to_unrotated"), ".3f"),
                     f"{lrn['start']:.4f} → {lrn['end']:.4f}" if lrn else "—", _f(lrn.get("seconds"), ".0f"),
                     _f(r.get("seconds"), ".0f")])
    lines += _table(["case", "R1", *[f"KL {t}" for t in texts], "KL mean", "× unrotated",
                     "fake-quant KL R0 → R1", "learning s", "quantization s"], body)
    made = [f"- {label}: `{r['command']}` at `{r.get('commit', UNRECORDED)}`" for label, r in rows.items() if r.get("command")]
    return lines + (["Each row made by:", "", *made, ""] if made else [])


def finetune(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/finetune.py: each case's KL, PPL and top-1 before and after recovery training, with its cost."""
    rows = [r for r in data.get("results", []) if isinstance(r, dict)]
    lines = [f"- command: `{c}`" for c in dict.fromkeys(r.get("command") or UNRECORDED for r in rows)]
    lines += ["- commit and date: per row", "", f"Model `{data.get('model')}`; recovered = the share of the KL gap "
              "won back, (KL before − KL after) / KL before; time s: the whole case, wall (training, evaluations and the reference "
              "model); peak RSS: the bench process's high-water mark up to the end of the case.", ""]
    body = [[r.get("case", ""), _f(r.get("bpw_after"), ".3f"), _f(r.get("minutes"), ".0f"), _f(r.get("steps")),
             _f(r.get("tokens_trained"), ","), f"{_f(r.get('kl_before'), '.4f')} → {_f(r.get('kl_after'), '.4f')}",
             _f(r.get("recovered"), ".1%"), f"{_f(r.get('ppl_before'), '.2f')} → {_f(r.get('ppl_after'), '.2f')} "
             f"({_f(r.get('ref_ppl'), '.2f')})", f"{_f(r.get('top1_before'), '.3f')} → {_f(r.get('top1_after'), '.3f')}",
             _f(r.get("threads")), str(r.get("clock", "—")), _f(r.get("seconds"), ".0f"), _gib(r.get("peak_rss_bytes")),
             _cell_prov(r)] for r in rows]
    return lines + _table(["case", "bpw", "budget min", "steps", "tokens", "KL", "recovered", "PPL (original)", "top-1",
                           "threads", "clock", "time s", "peak RSS GiB", "commit, date"], body)


def lossless_quantized(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/lossless.py --folders: quantized folders, llmpress against zstd -3, per part."""
    lines = _prov(data, path) + [
        f"{data.get('cpus')} CPUs, {data.get('threads')} threads; ratio = .llmp / the folder's bytes; without zero points: "
        "the codes coded alone (format 2's codes); codes: bits a code (4 stored); group: bits of scale + zero point a "
        "group (stored in brackets); rest: everything else, packed / stored. Codes decode: the codes segments alone, one "
        f"thread, MB/s by CPU time, and over the BF16 MiniLM tensors' ({_f(data.get('bf16_tensors_dec_1t_cpu_MBps'), '.0f')} "
        "MB/s).", ""]
    body = [[r["folder"], _f(r["bytes_in"], ","), _f(r["ratio"], ".4f"), _f(r["ratio_no_zero"], ".4f"),
             _f(r["zstd3_ratio"], ".4f"), _f(r["codes_bits_per_code"], ".3f"), _f(r["codes_bits_per_code_no_zero"], ".3f"),
             f"{_f(r['group_params_bits'], '.1f')} ({_f(r['group_params_stored_bits'], '.0f')})", _f(r["rest_ratio"], ".4f"),
             _f(r.get("codes_dec_1t_cpu_MBps"), ".0f"), _f(r.get("codes_dec_vs_BF16_cpu"), ".2f")]
            for r in data.get("rows", [])]
    return lines + _table(["folder", "bytes", "ratio", "without zero points", "zstd -3", "codes bits", "without zero points",
                           "group bits", "rest", "codes decode MB/s", "/ BF16"], body)


def grid(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/grid.py: a dequantized checkpoint packed with and without its grids, against its source GGUF."""
    g = data.get("gguf", {})
    lines = _prov(data, path) + [f"Source GGUF `{g.get('file')}`: {_f(g.get('tensor_bits_per_param'), '.3f')} bits/param in "
                                 f"its tensor data ({_f(g.get('file_bits_per_param'), '.3f')} the whole file). MB/s of the "
                                 "original bytes, best of the reps; decode / BF16 against the BF16 MiniLM in the same run.", ""]
    thr = sorted({t for r in data.get("rows", {}).values() for t in r.get("dec_mb_s", {})})
    head = ["case", "bits/param", "tensors only", "bound", "bit-exact"] + [f"{w} {t}t" for t in thr
                                                                            for w in ("enc MB/s", "dec MB/s", "dec / BF16")]
    body = [[name, _f(r.get("bits_per_param"), ".3f"), _f(r.get("tensor_bits_per_param"), ".3f"),
             _f(r.get("bound_bits_per_param"), ".3f"), "yes" if r.get("bit_exact") else "NO"]
            + [c for t in thr for c in (_f(r["enc_mb_s"].get(t), ".0f"), _f(r["dec_mb_s"].get(t), ".0f"),
                                        _f(r["dec_vs_bf16"].get(t), ".2f"))]
            for name, r in data.get("rows", {}).items()]
    return lines + _table(head, body)


def demo(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/demo.py: the main job as a new user runs it, in a fresh process, timed whole."""
    m = data.get("machine", {})
    lines = _prov(data, path) + [
        f"{m.get('cpus')} CPUs, load average at the end {_f((m.get('load_avg_at_end') or [None])[0], '.1f')}. The whole "
        f"sweep: **{_f(data.get('cpu_s'), '.0f')} CPU seconds** (user + sys), {_f(data.get('wall_s'), '.0f')} s wall; "
        f"the first report after {_f(data.get('first_report_cpu_s'), '.0f')} CPU seconds "
        f"({_f(data.get('first_report_wall_s'), '.0f')} s wall).", "", f"Recommendation: {data.get('recommendation')}", ""]
    body = [[f"`{p.get('label')}`", _f(p.get("bpw"), ".3f"), _f(p.get("kl_mean")), _f(p.get("cpu_seconds"), ".0f"),
             _f(p.get("seconds"), ".0f")] for p in data.get("points", [])]
    return lines + _table(["point (run order)", "bpw", "KL mean", "CPU s", "wall s"], body)


def eval_original(path: Path, data: dict[str, Any]) -> list[str]:
    """``llmpress eval MODEL --json``: the original's perplexity per text, with its protocol."""
    lines = _prov(data, path) + [f"Protocol `{data.get('protocol_label')}`; ± is one standard error of ln PPL.", ""]
    body = [[name, _f(t.get("ppl"), ".3f"), _f(t.get("ln_ppl_se"), ".3f")] for name, t in (data.get("texts") or {}).items()]
    body.append(["all", _f(data.get("ppl"), ".3f"), _f(data.get("ln_ppl_se"), ".3f")])
    return lines + _table(["text", "PPL", "± (ln)"], body)


def lowrank(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/lowrank.py: each factorization (and GPTQ ± a low-rank correction) judged against the original."""
    rows = [r for r in data.get("rows", []) if isinstance(r, dict)]
    st = data.get("settings", {})
    lines = [f"- command: `{c}`" for c in dict.fromkeys(r.get("command") or UNRECORDED for r in rows)]
    lines += ["- commit and date: per row", "", f"Model `{data.get('model')}`, {st.get('threads')} threads; calibration "
              f"{st.get('samples')}×{st.get('seq_len')} tokens of the calibration mix; evaluation {st.get('tokens')} tokens "
              f"(ctx {st.get('ctx')}) of debian-handbook + linux-doc; the original's PPL on this protocol "
              f"{_f(rows[0].get('ref_ppl'), '.3f') if rows else '—'}.", ""]
    body = [[r.get("method", r.get("kind", "")), _f(r.get("removed"), ".0%") if r.get("removed") is not None else "—",
             _f(r.get("bpw"), ".3f"), _f(r.get("ppl")), _f(r.get("kl_mean")), _f(r.get("kl_p99")), _f(r.get("top1"), ".3f"),
             _f(r.get("seconds"), ".0f"), _cell_prov(r)] for r in rows]
    return lines + _table(["method", "removed", "bpw", "PPL", "KL mean", "KL p99", "top-1", "time s", "commit, date"], body)


def startup(path: Path, data: dict[str, Any]) -> list[str]:
    """bench/startup.py: whole fresh processes, alternating, median of the reps."""
    lines = _prov(data, path) + [f"{data.get('cpus')} CPUs; input {_f(data.get('input_bytes'), ',')} bytes; median of "
                                 f"{data.get('reps')} alternating fresh processes; load average before/after "
                                 f"{_f((data.get('load_before') or [None])[0], '.1f')} / "
                                 f"{_f((data.get('load_after') or [None])[0], '.1f')}. `baseline` is another source tree "
                                 f"run alongside ({data.get('baseline') or 'none'}).", ""]
    med, ratio = data.get("median_s", {}), data.get("ratio_to_zipnn", {})
    tools = list(dict.fromkeys(t for m in med.values() for t in m))
    body = [[op] + [_f(med[op].get(t), ".2f") for t in tools] + [_f(ratio.get(op, {}).get(t), ".2f") for t in tools if t != "zipnn"]
            for op in med]
    lines += _table(["operation"] + [f"{t} s" for t in tools] + [f"{t} / zipnn" for t in tools if t != "zipnn"], body)
    files = data.get("unpack_files") or {}
    if files:
        first = next(iter(files))
        lines += [f"`llmpress unpack` alone on each input (`--files`), fresh processes alternating over the files, "
                  f"median of {data.get('reps')}; s per MB against {first}'s.", ""]
        lines += _table(["input", "bytes", "unpack s", "MB/s", f"s per MB / {first}", "restored"],
                        [[k, _f(v.get("bytes"), ","), _f(v.get("median_s"), ".3f"), _f(v.get("mb_s"), ".0f"),
                          _f(v["s_per_mb"] / files[first]["s_per_mb"], ".2f"), str(v.get("restored"))]
                         for k, v in files.items()])
    return lines


def limit_rows(path: Path, data: Any) -> list[str]:
    """A sweep's results.jsonl (``llmpress limit -o bench/out/limit``): one row per point, with its protocol."""
    rows = data
    lines = [f"- command: `llmpress limit smollm2-135m -o {path.parent.relative_to(REPO) if path.is_relative_to(REPO) else path.parent} "
             f"--budget quick` (rows' own commands in its report.md); commit: {UNRECORDED} (the sweep records the "
             f"model and protocol, not the commit); file written {_mtime(path)}", ""]
    body = [[f"`{r.get('label')}`", _f(r.get("bpw"), ".3f"), _f(r.get("kl_mean")), _f(r.get("top1"), ".4f"),
             _f(r.get("ppl"), ".3f"), f"`{r.get('protocol_label') or UNRECORDED}`"] for r in sorted(rows, key=lambda r: r.get("bpw", 0))]
    return lines + _table(["point", "bpw", "KL mean", "top-1", "PPL", "protocol"], body)


def rows_generic(path: Path, data: Any) -> list[str]:
    """Any other bench output: its provenance and the scalar columns of its rows."""
    rows = data if isinstance(data, list) else next((data[k] for k in ("rows", "results") if isinstance(data.get(k), list)), [])
    lines = _prov(data if isinstance(data, dict) else (rows[0] if rows and isinstance(rows[0], dict) else {}), path)
    rows = [r for r in rows if isinstance(r, dict)]
    cols = [k for k in dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, (int, float, str)))
            if k not in ("command", "commit", "date")]
    if not rows:  # one result: its scalar fields
        scalars = [[k, _f(v)] for k, v in (data.items() if isinstance(data, dict) else [])
                   if isinstance(v, (int, float, str)) and k not in ("command", "commit", "date")]
        return lines + (_table(["field", "value"], scalars) if scalars else ["(no rows)", ""])
    return lines + _table(cols + ["commit, date"], [[_f(r.get(k)) for k in cols] + [_cell_prov(r)] for r in rows])


def _read(path: Path) -> Any:
    """A bench output: JSON, or JSON lines (a sweep's results.jsonl; torn lines skipped)."""
    if path.suffix != ".jsonl":
        return json.loads(path.read_text())
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict):
            rows.append(r)
    return rows


@dataclass(frozen=True)
class Bench:
    pattern: str  # glob under bench/out
    title: str
    what: str
    command: str  # the command that records it (documented default)
    render: Callable[[Path, Any], list[str]] = rows_generic


BENCHES = [
    Bench("frontier/results.json", "Allocation against uniform GPTQ and AWQ (SmolLM2-135M)",
          "Mixed-precision allocation (`compress --target-bpw`, one row per menu and target: `mixed-MENU-TARGET`) beside "
          "uniform GPTQ and AWQ points, same calibration. "
          "Peak RSS is the bench process's high-water mark up to that point (the sensitivity pass included).",
          "python bench/frontier.py --targets 3.0,3.5,4.0", frontier),
    Bench("gguf.json", "llama.cpp's K-quant mixes: llama.cpp against llmpress",
          "The same GGUF mixes made by `llama-quantize` (with and without an importance matrix) and by llmpress "
          "(`quantize --gguf-mix`), judged by llama.cpp itself.",
          "python bench/gguf_llamacpp.py --methods gptq,awq+gptq,awq --alloc-mixes q4_k_m --bench-reps 5", gguf),
    Bench("scale.json", "Scale: an 8B-shaped checkpoint under a memory cap",
          "pack/unpack/verify and GPTQ on a synthetic checkpoint of Llama-3-8B's shapes, each step a fresh process "
          "under a 6 GiB cap.", "python bench/scale.py", scale),
    Bench("lossless.json", "Lossless: llmpress against ZipNN and zstd",
          "Ratio and encode/decode throughput on all-MiniLM-L6-v2 (FP32 as shipped, and BF16).",
          "OMP_NUM_THREADS=1 python bench/lossless.py --reps 5", lossless),
    Bench("lossless-fp8.json", "Lossless: FP8 checkpoints",
          "MiniLM and SmolLM2-135M cast to FP8 (per-channel F32 scales beside each weight, as compressed-tensors "
          "stores them), against zstd; the entropy bound, and decode speed against the BF16 path.",
          "python bench/lossless.py --files BF16 FP8 SmolLM2-FP8 FP8-E5M2 --tools 'llmpress (rans)' 'zstd -3' --reps 5 "
          "--out lossless-fp8.json", lossless_fp8),
    Bench("lossless-quantized.json", "Lossless: quantized folders (GPTQ, compressed-tensors)",
          "An llmpress GPTQ 4-bit g128 SmolLM2-135M folder (unquantized tensors FP32 as written, and in BF16 as a release "
          "ships them) and its compressed-tensors export, packed with their codes against their zero points (format 6).",
          "python bench/lossless.py --folders GPTQ-4b-g128 GPTQ-4b-g128-BF16 CT-4b-g128 --reps 3", lossless_quantized),
    Bench("lossless-gguf.json", "Lossless: GGUF files",
          "The embedded SmolLM2-135M as GGUF Q4_1 and Q4_K_M files packed by llmpress (each block type's fields as "
          "streams of their own; `smallest`: the near-uniform codes rANS-coded too) and by zstd, beside the BF16 "
          "MiniLM; the entropy bound per file and per field.",
          "python bench/lossless.py --files BF16 GGUF-Q4_1 GGUF-Q4_K_M --tools 'llmpress (rans)' 'llmpress (smallest)' "
          "'zstd -3' --reps 3 "
          "--out lossless-gguf.json", lossless_gguf),
    Bench("delta.json", "Lossless: fine-tunes against their base (`pack --base`)",
          "SmolLM2-135M fine-tuned for a few steps, packed alone and as a delta against the original checkpoint.",
          "python bench/delta.py", delta),
    Bench("grid.json", "Lossless: a checkpoint dequantized from a GGUF grid",
          "The embedded SmolLM2-135M (Q4_1 linears and a Q8_0 embedding widened to FP32) packed with its grids found "
          "and without, bit for bit.", "python bench/grid.py --reps 2 --threads 1 2", grid),
    Bench("startup.json", "Lossless start-up: whole fresh processes against ZipNN",
          "`llmpress pack/unpack/verify` of the BF16 MiniLM file as a user runs them (a fresh process each) beside "
          "ZipNN's, alternating.", "python bench/startup.py --reps 5 --files BF16,GGUF-Q4_1,GGUF-Q4_K_M", startup),
    Bench("fuzz-*.json", "Malformed inputs (fuzzing the readers)",
          "Mutated `.llmp` files and output folders fed to the readers: each must be refused or read correctly, "
          "never crash, hang or return wrong bytes.",
          "python bench/fuzz.py --seed 7 --readers llmp --state bench/out/fuzz-seed7-llmp.json", fuzz),
    Bench("demo.json", "`make demo`: the quick sweep's time as a user sees it",
          "`llmpress limit smollm2-135m --budget quick` in a fresh process with cold caches, timed whole, with the "
          "time until the first report.md appears.", "python bench/demo.py", demo),
    Bench("limit/results.jsonl", "The compression limit sweep (SmolLM2-135M, quick budget)",
          "`make demo`'s sweep, written under bench/out so that this page shows it.",
          "llmpress limit smollm2-135m -o bench/out/limit --budget quick", limit_rows),
    Bench("eval-smollm2.json", "Perplexity of the embedded SmolLM2-135M (default protocol)",
          "`llmpress eval` of the original alone: PPL per text under the default protocol.",
          "llmpress eval smollm2-135m --json | tail -n 1 > bench/out/eval-smollm2.json", eval_original),
    Bench("quant.json", "Quantization methods against peers",
          "RTN/GPTQ/AWQ/HQQ beside optimum-quanto, torchao and llm-compressor on SmolLM2-135M, same windows.",
          "OMP_NUM_THREADS=1 python bench/quant.py --configs 8:128,8:64,4:128,4:64,3:128,3:64,2:64"),
    Bench("lowrank.json", "Low-rank factorization",
          "Plain, randomized, activation-aware and whitened SVD at 10/20/40 % of linear parameters removed; GPTQ ± a "
          "low-rank error correction.", "python bench/lowrank.py --tokens 1024", lowrank),
    Bench("rotate-table.json", "Rotations before quantization",
          "GPTQ of SmolLM2-135M unrotated and under Hadamard rotations (the residual stream with the head kept, and "
          "an online rotation before `mlp.down_proj`), same calibration.",
          "python bench/rotate.py --cases gptq3-g64,gptq2-g64 --variants none,keep,keep+mlp", rotate),
    Bench("rotate-table-gridnf.json", "Rotations before quantization, on the NF grid",
          "The same comparison with GPTQ on the normal-float grid (`grid=nf`).",
          "python bench/rotate.py --cases gptq3-g64 --variants none,keep+mlp --opts grid=nf", rotate),
    Bench("rotate-table-h16rot.json", "Rotations before quantization, by group size",
          "GPTQ unrotated and rotated (`keep+mlp`) at 3 and 2 bits with groups of 64, 128 and per channel, and RTN "
          "at 3-bit g64: where the rotation's gain lies.",
          "python bench/rotate.py --cases gptq3-g64,gptq2-g64,gptq3-g128,gptq2-g128,gptq3-pc,gptq2-pc,rtn3-g64 "
          "--variants none,keep+mlp --label h16rot", rotate),
    Bench("rotate-table-h16rot-best.json", "Rotations before quantization, each with its best GPTQ groups",
          "GPTQ at g64: unrotated (static groups, the default), rotated (`keep+mlp`) with static groups, and rotated "
          "with each group fitted as GPTQ reaches it (`keep+mlp+dyn`, `static_groups=false`: better on the rotated "
          "model, worse on the unrotated one); × unrotated against the default unrotated row.",
          "python bench/rotate.py --cases gptq3-g64,gptq2-g64 --variants none,keep+mlp,keep+mlp+dyn --label h16rot "
          "--table h16rot-best", rotate),
    Bench("rotate-learned-h16learn-table-gptq3-g64.json", "A learned residual rotation, 3-bit g64",
          "GPTQ 3-bit g64 unrotated, under the randomized Hadamard R1 and under R1 learned SpinQuant-style (R0·exp(A − Aᵀ), "
          "Adam on the KL of the RTN-fake-quantized model), the rest of the rotation `keep+mlp+dyn`; same calibration.",
          "OMP_NUM_THREADS=1 python bench/rotate_learned.py --bits 3 --train-bits 3 --steps 80 --lr 1e-3 "
          "--label h16learn", rotate_learned),
    Bench("rotate-learned-h16learn-table-gptq2-g64.json", "A learned residual rotation, 2-bit g64",
          "The same at 2-bit g64 (R1 learned on 3-bit RTN: RTN at 2 bits leaves nothing to learn from).",
          "OMP_NUM_THREADS=1 python bench/rotate_learned.py --bits 2 --train-bits 3 --steps 80 --lr 1e-3 "
          "--label h16learn", rotate_learned),
    Bench("rotate-learned-h16learn-table-rtn4-g64.json", "A learned residual rotation, judged by RTN 4-bit g64",
          "The learning's own kind of codec on the held-out texts: RTN 4-bit g64 with R1 learned on 4-bit RTN.",
          "OMP_NUM_THREADS=1 python bench/rotate_learned.py --method rtn --bits 4 --train-bits 4 --steps 80 --lr 1e-3 "
          "--label h16learn", rotate_learned),
    Bench("rotate-table-h16in.json", "Rotations before quantization, without folding the norms",
          "GPTQ at g64 unrotated, under the fused rotation (`keep+mlp+dyn`) and under `--rotate-inputs --rotate-mlp` "
          "(no residual rotation, no norm folded: each block norm's readers read its output rotated online), with "
          "static groups and with groups fitted as GPTQ goes (`+dyn`); × unrotated against the default unrotated row.",
          "python bench/rotate.py --cases gptq3-g64,gptq2-g64 --variants none,keep+mlp+dyn,inputs+mlp,inputs+mlp+dyn "
          "--label h16rot --table h16in", rotate),
    Bench("rotate-table-h16in-s32.json", "Rotations before quantization, without folding the norms, 32 calibration windows",
          "The 2-bit g64 rows of the table above with four times the calibration (32×512 tokens), both rows.",
          "python bench/rotate.py --cases gptq2-g64 --variants none,inputs+mlp+dyn --samples 32 --label h16rot "
          "--table h16in-s32", rotate),
    Bench("rotate-table-h16asym.json", "Rotations before quantization, on the float-offset grid",
          "GPTQ at g64, unrotated and under `--rotate-inputs --rotate-mlp` (groups fitted as GPTQ goes), each on the "
          "default integer-zero grid and on the float-offset grid (`--grid asym`: no level at 0); × unrotated "
          "against the default unrotated row.",
          "python bench/rotate.py --cases gptq3-g64,gptq2-g64 --variants none,none+asym,inputs+mlp+dyn,"
          "inputs+mlp+dyn+asym --label h16rot --table h16asym", rotate),
    Bench("rotate-table-h16asym-s32.json", "Rotations before quantization, on the float-offset grid, 32 calibration windows",
          "The 2-bit g64 rows with four times the calibration (32×512 tokens), every row.",
          "python bench/rotate.py --cases gptq2-g64 --variants none,inputs+mlp+dyn,inputs+mlp+dyn+asym --samples 32 "
          "--label h16rot --table h16asym-s32", rotate),
    Bench("rotate-table-h16rot-seed0_1_2.json", "Rotations before quantization, 2-bit on the float-offset grid, three seeds",
          "The 2-bit g64 rotated row of the table above with rotation seeds 0, 1 and 2, against the same unrotated row.",
          "python bench/rotate.py --cases gptq2-g64 --variants none,inputs+mlp+dyn+asym --seed 0,1,2 --label h16rot",
          rotate),
    Bench("rotate-table-h16s64-seed0_1_2.json", "Rotations before quantization, 2-bit, the full sweep's calibration, three seeds",
          "The 2-bit float-offset rows with 64 calibration windows (the full budget's, `limit --budget full`) and "
          "rotation seeds 0, 1 and 2.",
          "python bench/rotate.py --cases gptq2-g64 --variants none,none+asym,inputs+mlp+dyn+asym "
          "--seed 0,1,2 --samples 64 --label h16rot --table h16s64", rotate),
    Bench("rotate-table-h16s64.json", "Rotations before quantization, 3-bit, the full sweep's calibration",
          "The 3-bit float-offset rows with 64 calibration windows, rotation seed 0.",
          "python bench/rotate.py --cases gptq3-g64 --variants none,none+asym,inputs+mlp+dyn+asym "
          "--samples 64 --label h16rot --table h16s64", rotate),
    Bench("rotate-table-h16mse2-rangemse2-seed0_1_2.json",
          "Rotations before quantization, 2-bit, each group's range searched end by end, three seeds",
          "GPTQ 2-bit g64 unrotated and under `--rotate-inputs --rotate-mlp --grid asym` (groups fitted as GPTQ goes), "
          "both rows with the clipping search shrinking each end of a group's range on its own (`range=mse2`); "
          "rotation seeds 0, 1 and 2.",
          "python bench/rotate.py --cases gptq2-g64 --variants none,inputs+mlp+dyn+asym --opts range=mse2 --seed 0,1,2 "
          "--label h16rot --table h16mse2", rotate),
    Bench("rotate-table-h16mse2-rangemse2.json", "Rotations before quantization, 3-bit, ranges searched end by end",
          "The same comparison at 3-bit g64 (the full budget's other rotated point), rotation seed 0.",
          "python bench/rotate.py --cases gptq3-g64 --variants none,inputs+mlp+dyn+asym --opts range=mse2 "
          "--label h16rot --table h16mse2", rotate),
    Bench("rotate-table-h16s64-rangemse2-seed0_1_2.json",
          "Rotations before quantization, 2-bit, ranges searched end by end, the full sweep's calibration, three seeds",
          "The table above with 64 calibration windows (the full budget's).",
          "python bench/rotate.py --cases gptq2-g64 --variants none,inputs+mlp+dyn+asym --opts range=mse2 --seed 0,1,2 "
          "--samples 64 --label h16rot --table h16s64", rotate),
    Bench("rotate-table-h16rot-static_groupsFalse.json", "Rotations before quantization, groups fitted as GPTQ goes",
          "The same comparison at g64 with each group's range fitted when GPTQ reaches it, from the weights as updated "
          "by the errors before it (`static_groups=false`), as QuaRot's GPTQ does.",
          "python bench/rotate.py --cases gptq3-g64,gptq2-g64 --variants none,keep+mlp --opts static_groups=false "
          "--label h16rot", rotate),
    Bench("rotate-table-h16rot-act_orderFalse-static_groupsFalse.json",
          "Rotations before quantization, groups fitted as GPTQ goes, natural column order",
          "The same with the columns in their natural order (`act_order=false`): groups stay consecutive columns, "
          "no group index stored (QuaRot's GPTQ setting).",
          "python bench/rotate.py --cases gptq3-g64,gptq2-g64 --variants none,keep+mlp "
          "--opts static_groups=false,act_order=false --label h16rot", rotate),
    Bench("rotate-floor-h16rot.json", "What a rotation can give through the grid",
          "Weight-space error of GPTQ's grid on SmolLM2-135M's linears, unrotated, rotated and i.i.d. Gaussian.",
          "python bench/rotate_floor.py --every 6 --label h16rot", rotate_floor),
    Bench("finetune.json", "Recovery training",
          "How much of the KL gap a fixed CPU budget of distillation wins back.",
          "python bench/finetune.py --cases gptq2 --minutes 20 --threads 1", finetune),
    Bench("generate.json", "Generation speed", "Tokens/s and resident memory of packed kernels against the dense model.",
          "python bench/generate.py"),
    Bench("export.json", "Exports run in their engines", "Each export in its engine; llama.cpp's KL beside llmpress's.",
          "python bench/export.py"),
    Bench("pack_ray.json", "Packing with Ray workers", "pack MB/s with --workers against one process.",
          "python bench/pack_ray.py"),
]


BEGIN, END = "<!-- results:begin", "<!-- results:end -->"


def readme_results(out_dir: Path) -> list[str] | None:
    """README's one table: llama.cpp's K-quant mixes as llama-quantize and as llmpress make them, the
    same file size, judged by llama.cpp itself (bench/gguf_llamacpp.py). None without that output."""
    path = out_dir / "gguf.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    mixes = list(d.get("mixes", {}))
    table: dict[str, dict[str, str]] = {}
    for mix in mixes:
        m = mix.upper()
        for c in d["mixes"][mix]:
            kls = [t.get("kl_mean") for t in c.get("kl", {}).values()]
            name = c["case"].replace(f"{m}-mix", "mix").replace(f"{m}'s size", "the mix's size").replace(f" {m}", "")
            table.setdefault(name, {})[mix] = _f(sum(kls) / len(kls), ".4f") if kls and None not in kls else "—"
    sizes = {mix: min(c["bytes"] for c in d["mixes"][mix]) for mix in mixes}
    texts = sorted({t for cs in d["mixes"].values() for c in cs for t in c.get("kl", {})})
    head = ["made by", *[f"{mix.upper()} ({sizes[mix] / 1e6:.1f} MB)" for mix in mixes]]
    return [f"Mean KL to the original (nats per token; lower is better) of `{d.get('model')}` GGUF files of the same "
            f"size: llama.cpp's K-quant mixes made by `llama-quantize` and by llmpress (`quantize --gguf-mix`), judged "
            f"by llama.cpp's own `llama-perplexity --kl-divergence` on {d.get('chunks')} × {d.get('ctx')} tokens of each "
            f"of {', '.join(texts)}.", "",
            *_table(head, [[k, *[v.get(mix, "—") for mix in mixes]] for k, v in table.items()]),
            f"`{d.get('command')}` · commit `{d.get('commit')}` · {str(d.get('date'))[:10]}"]


def update_readme(readme: Path, lines: list[str]) -> bool:
    """Replace what lies between README's results markers; False where the markers are missing."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    marker, _ = rest.split("\n", 1)
    tail = rest.split(END, 1)[1]
    new = head + BEGIN + marker + "\n" + "\n".join(lines) + "\n" + END + tail
    if new != text:
        tmp = readme.with_suffix(".tmp")
        tmp.write_text(new)
        tmp.replace(readme)
    return True


def render(out_dir: Path) -> str:
    lines = ["# Benchmarks", "",
             "<!-- Generated by scripts/benchmarks_md.py from bench/out/*.json (make benchmarks); do not edit. -->", "",
             "Every figure below was printed by a bench script under `bench/` and is shown with the command, the commit "
             "and the date that produced it. Figures measured under different protocols (texts, windows, tokenizer, "
             "KL estimator) are not comparable across sections. The machine: 2 cores shared with other jobs unless a "
             "section says otherwise; speeds drift with the load.", ""]
    missing, seen = [], set()
    for b in BENCHES:
        paths = sorted(p for p in out_dir.glob(b.pattern) if p.is_file() and p.name not in seen)
        if not paths:
            missing.append(b)
            continue
        lines += [f"## {b.title}", "", b.what, ""]
        for p in paths:
            seen.add(p.name)
            if len(paths) > 1:
                lines += [f"### `{p.relative_to(out_dir)}`", ""]
            lines += b.render(p, _read(p))
    if missing:
        lines += ["## Not yet recorded", "",
                  "These benches have no output in this tree yet; each row is the command that records it.", ""]
        lines += _table(["bench", "what", "run"], [[b.title, b.what, "`" + b.command.replace("|", "\\|") + "`"] for b in missing])
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR, help="the bench outputs (default: bench/out)")
    ap.add_argument("-o", "--out", type=Path, default=DOC)
    ap.add_argument("--readme", type=Path, default=REPO / "README.md", help="whose results table to rewrite")
    args = ap.parse_args()
    if not args.out_dir.is_dir():
        print(f"{args.out_dir}: no bench outputs (run a bench first)", file=sys.stderr)
        return 2
    text = render(args.out_dir)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    table = readme_results(args.out_dir)
    if table is not None and update_readme(args.readme, table):
        print(f"wrote the results table of {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
