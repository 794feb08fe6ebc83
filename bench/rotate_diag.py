"""Where does a rotated GPTQ model lose? In-process diagnosis of ``--rotate`` on SmolLM2-135M.

    nice -n 19 .venv/bin/python bench/rotate_diag.py --bits 3

For the original model, the fused rotation (residual + heads) and the fused rotation plus an
online Hadamard before down_proj: the float KL of the rotated model to the original; per kind of
linear the input activations' kurtosis and max/rms and the weights' max/rms per group; GPTQ
(the codec as the runner calls it, but on Gram matrices of the float model: no error propagation)
per-layer relative output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ); the KL with every linear quantized and
with one kind of linear alone quantized. Prints tables; a diagnosis aid, not the issue's benchmark
(that is ``bench/rotate.py``).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def kl(ref: torch.Tensor, logits: torch.Tensor) -> float:
    lp, lq = F.log_softmax(ref.double(), -1), F.log_softmax(logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(input_ids=ids[i : i + 1]).logits[0] for i in range(ids.shape[0])])


def linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def grams(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    acts: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for n, m in linears(model).items():
        def hook(mod, args, n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            out[n] = out.get(n, 0) + x.T @ x
            if n.startswith("model.layers.") and len(acts.setdefault(n, [])) < 1:
                acts[n].append(x[:2048].float())
        hooks.append(m.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for i in range(ids.shape[0]):
            model(input_ids=ids[i : i + 1])
    for h in hooks:
        h.remove()
    return out, {n: a[0] for n, a in acts.items()}


def kurt(x: torch.Tensor) -> float:
    x = x.flatten().double()
    x = x - x.mean()
    return float((x ** 4).mean() / (x ** 2).mean() ** 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--variants", default="none,fused,fused+online")
    ap.add_argument("--per-kind", action="store_true", help="KL with one kind of linear alone quantized")
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import llmpress  # noqa: F401
    from llmpress import skeleton as sk
    from llmpress.models import TensorStore, load_tokenizer, resolve
    from llmpress.pipeline import calib_ids
    from llmpress.quant.hadamard import orthogonal
    from llmpress.quant.rotate import RotateSpec, plan
    from llmpress.tensor import Stats, decode, get_codec
    from llmpress.text import load_text

    torch.manual_seed(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"# {' '.join(sys.argv)}\n# commit {commit}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}")
    src = resolve("smollm2-135m")
    tok = load_tokenizer(src.name)
    base = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32).eval()
    calib = calib_ids(tok, load_text("calib-mix"), a.samples, 512)
    ev = calib_ids(tok, load_text("debian-handbook"), a.eval_windows, 512)
    ref = logits_of(base, ev)

    store = TensorStore(src)
    skel = sk.build_meta(sk.folder_config(src.folder))
    rot = plan(skel, store, RotateSpec())
    rstate = dict(rot.wrap(store).items())
    cfg = copy.deepcopy(base.config)
    cfg.tie_word_embeddings = not rot.untie
    fused = AutoModelForCausalLM.from_config(cfg).eval()
    missing = fused.load_state_dict({k: v.float() for k, v in rstate.items()}, strict=False)
    print(f"# fused rotation {rot.record()}; load: {missing}")

    inter = base.config.intermediate_size
    h = orthogonal(inter, 7).matrix.float()  # (inter, inter)
    online = copy.deepcopy(fused)
    for m in online.model.layers:
        m.mlp.down_proj.weight.data = m.mlp.down_proj.weight.data @ h
        m.mlp.down_proj.register_forward_pre_hook(lambda mod, args: (args[0] @ h,))
    models = {"none": base, "fused": fused, "fused+online": online}
    models = {k: models[k] for k in a.variants.split(",")}
    for name, m in models.items():
        if name != "none":
            print(f"float KL {name} vs original: {kl(ref, logits_of(m, ev)):.3e}")

    codec = get_codec("gptq")
    params = {"bits": a.bits, "group_size": a.group_size}
    stats_rows = []
    res: dict[str, dict] = {}
    for name, m in models.items():
        G, acts = grams(m, calib)
        err: dict[str, float] = {}
        qw: dict[str, torch.Tensor] = {}
        st: dict[tuple, Stats] = {}
        for n, lin in linears(m).items():
            W = lin.weight.data.double()
            key = id(G[n])
            s = st.get(key)
            if s is None:
                s = st[key] = Stats(gram=G[n], n=1)
            ct = codec.encode(lin.weight.data, s, **params)
            Wq = decode(ct).double()
            H = G[n]
            d = Wq - W
            err[n] = float(torch.trace(d @ H @ d.T) / torch.trace(W @ H @ W.T))
            qw[n] = Wq.float()
        # activations and weight shape stats per kind
        for k in KINDS:
            ns = [n for n in qw if n.endswith(k)]
            ak = sum(kurt(acts[n]) for n in ns) / len(ns)
            amr = sum(float(acts[n].abs().max() / acts[n].pow(2).mean().sqrt()) for n in ns) / len(ns)
            chan = [acts[n].pow(2).mean(0).sqrt() for n in ns]
            cmr = sum(float(c.max() / c.pow(2).mean().sqrt()) for c in chan) / len(ns)
            W = [linears(m)[n].weight.data for n in ns]
            wk = sum(kurt(w) for w in W) / len(ns)
            gmr = sum(float((g := w.reshape(w.shape[0], -1, a.group_size)).abs().amax(-1).div(
                g.pow(2).mean(-1).sqrt()).mean()) for w in W) / len(ns)
            e = sum(err[n] for n in ns) / len(ns)
            stats_rows.append((name, k, ak, amr, cmr, wk, gmr, e))
        # KL all quantized and per kind
        orig = {n: lin.weight.data.clone() for n, lin in linears(m).items()}
        lins = linears(m)

        def with_q(sel) -> float:
            for n in lins:
                lins[n].weight.data = qw[n] if sel(n) else orig[n]
            out = kl(ref, logits_of(m, ev))
            for n in lins:
                lins[n].weight.data = orig[n]
            return out

        res[name] = {"all": with_q(lambda n: True)}
        if a.per_kind:
            for k in KINDS:
                res[name][k] = with_q(lambda n, k=k: n.endswith(k))
        worst = sorted(err.items(), key=lambda kv: -kv[1])[:5]
        print(f"# {name}: KL all {res[name]['all']:.4f}; worst relative output errors {[(n, round(e, 4)) for n, e in worst]}",
              flush=True)
        for r in stats_rows[-len(KINDS):]:  # as it goes: a long run cut short keeps what it measured
            print(f"#   {r[1]}: act kurtosis {r[2]:.1f}, max/rms {r[3]:.1f}, channel rms max/mean {r[4]:.1f}; "
                  f"W kurtosis {r[5]:.2f}, group max/rms {r[6]:.2f}; GPTQ rel. out err {r[7]:.4f}"
                  + (f"; KL alone {res[name][r[1]]:.4f}" if r[1] in res[name] else ""), flush=True)

    print("\n| variant | kind | act kurtosis | act max/rms | channel rms max/mean | W kurtosis | W group max/rms | GPTQ rel. out err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in stats_rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.4f} |")
    cols = ["all"] + (KINDS if a.per_kind else [])
    print(f"\n| variant | {' | '.join('KL ' + c for c in cols)} |")
    print(f"|---|{'---|' * len(cols)}")
    for name, r in res.items():
        print(f"| {name} | {' | '.join(f'{r[c]:.4f}' for c in cols)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
