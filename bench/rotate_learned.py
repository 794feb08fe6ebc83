"""A learned residual rotation (SpinQuant-style) against the randomized Hadamard it starts from: GPTQ's KL to the original, side by side.

    OMP_NUM_THREADS=1 python bench/rotate_learned.py --bits 3 --steps 100 --label h16learn

Issue 16 asks GPTQ + rotation for KL ≤ 0.7× GPTQ without it (3-bit g64, 2-bit g64); the fused
randomized Hadamard (``bench/rotate.py``, best ``keep+mlp+dyn``) leaves the rotated weights at the
Gaussian floor of a scalar grid (``bench/rotate_floor.py``). This tries the one thing a random
rotation cannot do: choose R1 (hidden × hidden, the residual stream's rotation) for the
quantized model's output. The rotation stays the ``keep+mlp`` one of ``bench/rotate.py`` (the
per-head V→O Hadamard fused, an online Hadamard before down_proj, embedding / final norm / head as
stored with the stream rotated online at its ends); only R1 changes:

- R1 = R0 · exp(A − Aᵀ), R0 the randomized Hadamard (seed ``--seed``), A (hidden × hidden) from 0,
  so R1 stays orthogonal exactly (a skew matrix's exponential) and starts where the Hadamard is;
- the model with every block linear fake-quantized after rotation (readers W diag(γ) R1, writers
  R1ᵀ W; round to nearest on the codec's bit width and group size, each group's min–max range,
  the rounding's gradient passed straight through) is run on the calibration windows (GPTQ's own:
  the calibration mix, ``--samples`` × ``--seq-len``), and A follows Adam on the mean KL from the
  original model's next-token distribution to the fake-quantized one's (cosine-decayed rate);
- the learned R1 then replaces the Hadamard one in ``llmpress.quantize(..., rotate=keep+mlp)`` (the
  rotation module's ``orthogonal`` is patched for this process: order hidden, seed ``--seed``), so
  GPTQ quantizes the fused learned-rotated model exactly as it does the Hadamard one, and
  ``llmpress.evaluate`` judges it on the held-out texts (debian-handbook, linux-doc), as
  ``bench/rotate.py`` does.

Rows: ``none`` (unrotated, the codec's defaults), ``hadamard`` (this script's path with
0 steps: R1 = R0; with ``static_groups=false`` it is ``bench/rotate.py``'s ``keep+mlp+dyn``), ``learned``
(R1 after ``--steps``), ``identity`` (R1 = I: the norm scales folded into the readers and the heads' and
down_proj's Hadamards alone, a diagnostic). The fake quantization learned on is RTN at ``--train-bits``
(default ``--bits`` + 1: RTN min–max at 3 bits leaves SmolLM2-135M at KL ≈ 5, GPTQ at 3 bits ≈ 0.4, near
RTN's at 4). ``--method rtn`` judges the rows with RTN instead (the learning's own kind of codec),
``--method keep`` with none (the rotation alone: KL ≈ 0 checks that the learned R1 is fused exactly). ``--dyn`` (default on) gives the rotated rows ``static_groups=false``, as
``keep+mlp+dyn``. Also printed: the fake-quantized (RTN) KL on the calibration windows at R0 and at the
learned R1, and the optimisation's seconds. Writes ``bench/out/rotate-learned[-LABEL].json`` (rows cached,
a re-run resumes) with command, commit and date; the learned matrix goes to
``bench/out/rotate-learned[-LABEL]-bBITS-gG-sSTEPS.pt``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from _record import record  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402


def fake_quant(w: Tensor, bits: int, group: int) -> Tensor:
    """(out, in) w rounded to a min–max asymmetric grid per group of ``group`` inputs (-1: per row);
    the rounding's gradient passed straight through (the range's flows)."""
    o, i = w.shape
    g = w.reshape(o, -1, i if group == -1 else group)  # (out, groups, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    top = 2 ** bits - 1
    scale = (hi - lo).clamp_min(1e-8) / top
    x = (g - lo) / scale
    x = x + (x.round().clamp(0, top) - x).detach()
    return (x * scale + lo).reshape(o, i)


def kl(ref_logp: Tensor, logits: Tensor) -> Tensor:
    """Mean over tokens of KL(ref ‖ q): (tokens, vocab) each."""
    logq = torch.log_softmax(logits.float(), -1)
    return (ref_logp.exp() * (ref_logp - logq)).sum(-1).mean()


def norm_readers(cfg) -> dict[str, list[str]]:
    """{a block norm's weight key: the full names of the linears reading it} (``fold.FOLDS``' norm patterns)."""
    from llmpress import skeleton as sk
    from llmpress.quant.fold import patterns_for

    blocks_name, blocks = sk.blocks_of(sk.build_meta(cfg))
    return {f"{blocks_name}.{i}.{p.producer}.weight": [f"{blocks_name}.{i}.{c}" for c in p.consumers]
            for i in range(len(blocks)) for p in patterns_for(cfg) if p.kind == "norm"}


class Learner:
    """The keep+mlp rotated model with R1 left open: its block linears as read with R1 = I (norm scales
    folded, heads' and down_proj's Hadamards fused), the online hooks, and the stream's ends rotated by
    the current R1."""

    def __init__(self, model: str, seed: int):
        import llmpress.quant.rotate as rot
        from llmpress import skeleton as sk
        from llmpress.models import TensorStore, resolve
        from llmpress.quant.hadamard import Orthogonal

        src = resolve(model)
        self.store = TensorStore(src)
        cfg = sk.folder_config(src.folder)
        self.hidden = cfg.hidden_size
        self.r0 = rot.orthogonal(self.hidden, seed).matrix  # (hidden, hidden) float64: the Hadamard start
        orig = rot.orthogonal
        eye = Orthogonal(torch.eye(self.hidden, dtype=torch.float64), "random", "identity", seed)
        rot.orthogonal = lambda n, s=0, kind="auto": eye if (n, s) == (self.hidden, seed) else orig(n, s, kind)
        try:
            skel = sk.build_meta(cfg)
            self.plan = rot.plan(skel, self.store, rot.RotateSpec(seed=seed, keep_head=True, mlp=True))
        finally:
            rot.orthogonal = orig
        base = self.plan.wrap(self.store)
        self.original = self._load(cfg, self.store)
        self.model = self._load(cfg, base)
        rot.install_online(self.model, self.plan.online)
        self.readers, self.writers = rot._stream_linears(self.model)
        self.w0 = {n: self.model.get_submodule(n).weight.detach().clone() for n in self.readers + self.writers}
        self.r: Tensor | None = None  # the current R1 (float32), read by the stream hooks
        self.norms = norm_readers(cfg)  # norm key -> its readers
        self.reader_norm = {n: k for k, ns in self.norms.items() for n in ns}
        emb, norm = self.plan.stream.embedding, self.plan.stream.final_norm
        self.model.get_submodule(emb).register_forward_hook(lambda _m, _a, out: out @ self.r)
        self.model.get_submodule(norm).register_forward_pre_hook(lambda _m, a: (a[0] @ self.r.T, *a[1:]), prepend=True)

    @staticmethod
    def _load(cfg, store) -> torch.nn.Module:
        from llmpress import skeleton as sk

        m = sk.build_meta(cfg)
        emb_key = next(n for n, mod in m.named_modules() if mod is m.get_input_embeddings()) + ".weight"
        sk.fill(m, "", lambda k: store.get(k if k in store.where else emb_key), torch.float32)
        sk.tie(m)
        for p in m.parameters():
            p.requires_grad_(False)
        return m.eval()

    def params(self, r: Tensor, bits: int, group: int, scales: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """{weight name: fake-quantized rotated weight} for R1 = ``r`` (float32); with ``scales`` each block
        norm's weight s (its readers W diag(γ) R1 diag(1/s))."""
        out = dict(scales or {})
        for n in self.readers:
            w = self.w0[n] @ r
            out[f"{n}.weight"] = fake_quant(w if scales is None else w / scales[self.reader_norm[n]], bits, group)
        for n in self.writers:
            out[f"{n}.weight"] = fake_quant(r.T @ self.w0[n], bits, group)
        return out

    def loss(self, r: Tensor, ids: Tensor, ref: Tensor, bits: int, group: int,
             scales: dict[str, Tensor] | None = None) -> Tensor:
        self.r = r
        logits = torch.func.functional_call(self.model, self.params(r, bits, group, scales), (ids,),
                                            {"use_cache": False}, strict=False).logits
        return kl(ref, logits.reshape(-1, logits.shape[-1]))


def learn(lr: Learner, windows: Tensor, refs: list[Tensor], a: argparse.Namespace
          ) -> tuple[Tensor, dict[str, Tensor] | None, dict]:
    """R1 after ``a.steps`` Adam steps on A (R1 = R0 exp(A − Aᵀ)), one window a step, in turn; with
    ``a.learn_scales`` each block norm's weight s = exp(σ) too (σ from 0, rate ``a.scale_lr``)."""
    n = lr.hidden
    A = torch.zeros(n, n, dtype=torch.float64, requires_grad=True)
    sigma = {k: torch.zeros(n, requires_grad=True) for k in lr.norms} if a.learn_scales else {}
    opt = torch.optim.Adam([{"params": [A], "lr": a.lr}] + ([{"params": list(sigma.values()), "lr": a.scale_lr}]
                                                             if sigma else []))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, a.steps))))
    r0 = lr.r0

    def rot() -> Tensor:
        return r0 @ torch.linalg.matrix_exp(A - A.T)

    def scales() -> dict[str, Tensor] | None:
        return {k: v.exp() for k, v in sigma.items()} if sigma else None

    def full_loss(r: Tensor, sc: dict[str, Tensor] | None = None) -> float:
        with torch.no_grad():
            return sum(float(lr.loss(r.float(), w[None], ref, a.train_bits, a.group_size, sc))
                       for w, ref in zip(windows, refs)) / len(windows)

    log = {"start": full_loss(r0), "curve": []}
    print(f"# fake-quant ({a.train_bits}-bit) KL at R0 (all {len(windows)} windows): {log['start']:.4f}", flush=True)
    t0 = time.perf_counter()
    for s in range(a.steps):
        i = s % len(windows)
        loss = lr.loss(rot().float(), windows[i][None], refs[i], a.train_bits, a.group_size, scales())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log["curve"].append(loss.item())
        if s % 10 == 0 or s == a.steps - 1:
            print(f"# step {s} window {i} loss {float(loss):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    log["seconds"] = time.perf_counter() - t0
    with torch.no_grad():
        r = rot().detach()
        sc = {k: v.detach() for k, v in scales().items()} if sigma else None
    log["end"] = full_loss(r, sc) if a.steps else log["start"]
    if sc:
        log["scale_range"] = [min(float(v.min()) for v in sc.values()), max(float(v.max()) for v in sc.values())]
    log["orthogonality"] = float((r @ r.T - torch.eye(n, dtype=r.dtype)).abs().max())
    print(f"# fake-quant KL at the learned R1: {log['end']:.4f} ({log['seconds']:.0f} s)", flush=True)
    return r, sc, log


def _mul(t: Tensor, v: Tensor) -> Tensor:
    """t ⊙ v over the last axis: a weight's columns, or a norm's scale."""
    return t * v


def _with_scales(orig_plan, scales: dict[str, Tensor], readers: dict[str, list[str]]):
    """``rotate.plan`` whose block norms keep the scales s (as stored: s rounded to the norm's dtype first)
    and whose readers take diag(1/s) on the right: (x̂ R1 diag(s)) (W diag(γ) R1 diag(1/s))ᵀ = x̂ diag(γ) Wᵀ."""
    def plan(skel, store, spec):
        p = orig_plan(skel, store, spec)
        for key, s in scales.items():
            s = s.to(store.get(key).dtype).to(torch.float64)
            p.steps[key].append(("mul", {"v": s}))
            for n in readers[key]:
                p.steps[f"{n}.weight"].append(("mul", {"v": 1 / s}))
        return p
    return plan


def gptq_row(model: str, r: Tensor | None, seed: int, case: dict, a: argparse.Namespace,
             scales: dict[str, Tensor] | None = None) -> dict:
    """GPTQ (``case``) of ``model`` rotated keep+mlp with R1 = ``r`` (None: unrotated), judged on the texts;
    ``scales``: the block norms' weights kept (their readers divided)."""
    import llmpress
    import llmpress.quant.hadamard as had
    import llmpress.quant.rotate as rot
    from llmpress.quant.hadamard import Orthogonal

    orig_rot, orig_had, orig_plan = rot.orthogonal, had.orthogonal, rot.plan
    if scales:
        from llmpress import skeleton as sk
        from llmpress.models import resolve

        rot.STEPS["mul"] = _mul
        rot.ROW_WISE.add("mul")
        rot.plan = _with_scales(orig_plan, scales, norm_readers(sk.folder_config(resolve(model).folder)))
    if r is not None:
        learned = Orthogonal(r, "random", "learned", seed)

        def patched(n: int, s: int = 0, kind: str = "auto") -> Orthogonal:
            return learned if (n, s) == (r.shape[0], seed) else orig_had(n, s, kind)

        rot.orthogonal = had.orthogonal = patched  # the plan's R1 and the loaders' (Orthogonal.of_record)
    try:
        with tempfile.TemporaryDirectory(dir=HERE / "out") as tmp:
            out = Path(tmp) / "q"
            res = llmpress.quantize(model, out, samples=a.samples, seq_len=a.seq_len, progress=False,
                                    rotate={"keep_head": True, "mlp": True, "seed": seed} if r is not None else False,
                                    **case)
            kls = {t: llmpress.evaluate(out, model, t, tokens=a.tokens, decode_once=True)["kl_mean"] for t in a.texts.split(",")}
    finally:
        rot.orthogonal, had.orthogonal, rot.plan = orig_rot, orig_had, orig_plan
    return {"bpw": res["bpw"], "seconds": res["seconds"], "kl": kls, "kl_mean": sum(kls.values()) / len(kls),
            "rotation": res.get("rotation")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--method", default="gptq", choices=("gptq", "rtn", "keep"),
                    help="the codec of the judged rows (keep: none, the rotation alone: a check that the fused model is the original)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--train-bits", type=int, default=None, help="bits of the fake quantization learned on (default "
                    "--bits + 1: GPTQ's error at b bits is near RTN's at b + 1, where RTN at b leaves the model broken)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam's rate on A (cosine-decayed to 0)")
    ap.add_argument("--learn-scales", action="store_true", help="learn each block norm's weight too (kept in the "
                    "norm, its readers divided by it: still a plain model)")
    ap.add_argument("--scale-lr", type=float, default=5e-3, help="Adam's rate on the scales' logarithms")
    ap.add_argument("--train-windows", type=int, default=8, help="calibration windows used for learning (of --samples)")
    ap.add_argument("--train-len", type=int, default=256, help="tokens of each window used for learning")
    ap.add_argument("--samples", type=int, default=8, help="calibration windows (GPTQ's; bench/rotate.py's protocol)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--texts", default="debian-handbook,linux-doc")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="none,hadamard,learned")
    ap.add_argument("--no-dyn", dest="dyn", action="store_false", help="rotated rows with static groups (default: static_groups=false)")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    a.train_bits = a.bits + 1 if a.train_bits is None else a.train_bits

    from llmpress.models import resolve
    from llmpress.pipeline import _calib_text, calib_ids
    from llmpress.models import load_tokenizer

    rec = record()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"# {rec['command']}\n# commit {rec['commit']}, {rec['date']}, {threads} threads", flush=True)
    name = "rotate-learned" + (f"-{a.label}" if a.label else "")
    cache_file = HERE / "out" / f"{name}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    protocol = f"{a.model}|s{a.samples}|l{a.seq_len}|t{a.tokens}|threads{threads}"
    case = {"method": a.method, **({"bits": a.bits, "group_size": a.group_size} if a.method != "keep" else {})}
    learn_tag = f"tb{a.train_bits}|steps{a.steps}|lr{a.lr}|" + (f"scales{a.scale_lr}|" if a.learn_scales else "") + f"w{a.train_windows}x{a.train_len}|seed{a.seed}"

    def save() -> None:
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(cache_file)

    rows = {}
    r_learned = None
    for row in a.rows.split(","):
        dyn = a.dyn and row != "none" and a.method == "gptq"
        key = f"{a.method}{a.bits}-g{a.group_size}|{row}|{protocol}" + ("|dyn" if dyn else "") \
            + (f"|seed{a.seed}" if row in ("hadamard", "identity") else f"|{learn_tag}" if row == "learned" else "")
        if key in cache:
            rows[row] = cache[key]
            continue
        extra: dict = {}
        r = sc = None
        if row == "hadamard":
            import llmpress.quant.rotate as rot

            r = rot.orthogonal(hidden_of(a.model), a.seed).matrix
        elif row == "identity":  # R1 = I: the norm scales folded, heads' and down_proj's Hadamards, the stream as is
            r = torch.eye(hidden_of(a.model), dtype=torch.float64)
        elif row == "learned":
            # the learned R1 depends on the learning's settings alone (not on the judged codec): kept and reused
            r_file = HERE / "out" / f"{name}-g{a.group_size}-{learn_tag.replace('|', '-')}.pt"
            if r_file.exists():
                saved = torch.load(r_file)
                r_learned, sc, extra = saved["r"], saved.get("scales"), saved["log"]
            else:
                lr = Learner(a.model, a.seed)
                src = resolve(a.model)
                ids = calib_ids(load_tokenizer(src.name if src.kind == "embedded" else src.folder), _calib_text(None),
                                a.samples, a.seq_len)[: a.train_windows, : a.train_len]  # (windows, len): GPTQ's windows
                with torch.no_grad():
                    refs = [torch.log_softmax(lr.original(w[None], use_cache=False).logits[0].float(), -1) for w in ids]
                r_learned, sc, extra = learn(lr, ids, refs, a)
                del lr, refs
                torch.save({"r": r_learned, "scales": sc, "log": extra}, r_file.with_suffix(".tmp"))
                r_file.with_suffix(".tmp").replace(r_file)
            r = r_learned
        t0 = time.perf_counter()
        res = gptq_row(a.model, r, a.seed, {**case, **({"static_groups": False} if dyn else {})}, a, sc)
        res.update(learning=extra or None, dyn=dyn, eval_seconds=time.perf_counter() - t0, commit=rec["commit"], date=rec["date"],
                   command=rec["command"])
        cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
        cache[key] = rows[row] = res
        save()
        print(f"# done {row}: {res['kl']}", flush=True)

    # the table: every row of this case and protocol in the cache (each learning's settings its own row)
    case_name = f"{a.method}{a.bits}-g{a.group_size}"
    every = {}
    for key, r in cache.items():
        c, row, rest = key.split("|", 2)
        if c == case_name and rest.startswith(protocol):
            every[f"{row} ({rest[len(protocol):].strip('|').replace('|', ', ')})" if rest != protocol else row] = r
    base = every.get("none")
    texts = a.texts.split(",")
    print(f"\n| case | R1 | {' | '.join(f'KL {t}' for t in texts)} | KL mean | × unrotated "
          f"| fake-quant KL R0 → R1 (calibration, bits learned on) | learning s | quantization s |")
    print(f"|---|---|{'---|' * len(texts)}---|---|---|---|---|")
    for row, r in every.items():
        if base:
            r["ratio_to_unrotated"] = r["kl_mean"] / base["kl_mean"]
        lrn = r.get("learning") or {}
        fq = f"{lrn['start']:.4f} → {lrn['end']:.4f}" if lrn else "—"
        kls = " | ".join(f"{r['kl'][t]:.4f}" for t in texts)
        print(f"| {case_name} | {row} | {kls} | {r['kl_mean']:.4f} | "
              f"{r.get('ratio_to_unrotated', float('nan')):.3f} | {fq} | {lrn.get('seconds', 0):.0f} | {r['seconds']:.0f} |")
    print("\nR1: none (unrotated); identity / hadamard / learned: keep+mlp (per-head V→O and down_proj's Hadamards, "
          "embedding and head as stored) with R1 = I, the randomized Hadamard R0, or R0 exp(A − Aᵀ) learned; dyn: "
          "static_groups=false; tb: the bits of the fake quantization learned on; scales: block norms' weights learned too.")
    table = {**rec, "protocol": protocol, "case": case_name, "rows": every}
    tmp = HERE / "out" / f"{name}-table-{case_name}.tmp"
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(tmp.with_suffix(".json"))
    return 0


def hidden_of(model: str) -> int:
    from llmpress import skeleton as sk
    from llmpress.models import resolve

    return sk.folder_config(resolve(model).folder).hidden_size


if __name__ == "__main__":
    sys.exit(main())
