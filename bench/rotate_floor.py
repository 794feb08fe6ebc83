"""How much can a rotation lower the grid's error at all? Weight-space relative error of SmolLM2-135M's linears, unrotated, rotated, and i.i.d. Gaussian.

    OMP_NUM_THREADS=1 python bench/rotate_floor.py --label h16rot

A rotation before a scalar grid helps by changing the distribution inside each group: heavy tails
(outliers) become Gaussian, and a Gaussian group wastes less of its range. This measures that
mechanism alone, without calibration: for every block linear (every ``--every``-th block) the
relative error ‖Ŵ − W‖²/‖W‖² of round-to-nearest on the codec's default GPTQ grid (``asymz``,
each group's range chosen by the clipping search, ``range: mse``) — the geometric mean over the
linears — for the unrotated weights, the rotated ones (the residual rotation with the per-head V→O
rotation fused, and with an online Hadamard before down_proj: ``keep+mlp``) and i.i.d. Gaussian
weights of the same shapes and per-row variance (what a rotation that made every group Gaussian
would reach: the floor of this mechanism on this grid). Also the weights' excess kurtosis (a
Gaussian's is 0) and the mean group max/rms. The ratio rotated / unrotated bounds what the rotation
can give through the grid; GPTQ and the error's path to the logits move it further
(``bench/rotate.py`` measures KL).

Writes ``bench/out/rotate-floor[-LABEL].json`` with command, commit and date.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from _record import record  # noqa: E402

CONFIGS = [(3, 64), (2, 64), (3, 128), (2, 128), (3, -1), (2, -1)]


def _gmean(xs: list[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-30)) for x in xs) / len(xs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--every", type=int, default=3, help="every N-th block (1: all)")
    ap.add_argument("--configs", default=",".join(f"{b}:{g}" for b, g in CONFIGS), help="bits:group_size,...")
    ap.add_argument("--seed", type=int, default=0, help="the rotation's seed")
    ap.add_argument("--label", default="")
    a = ap.parse_args()

    import torch

    from llmpress import skeleton as sk
    from llmpress.models import TensorStore, resolve
    from llmpress.quant import grids
    from llmpress.quant.grids import GridSpec
    from llmpress.quant.rotate import RotateSpec, plan

    rec = record()
    configs = [tuple(int(x) for x in c.split(":")) for c in a.configs.split(",")]
    src = resolve(a.model)
    store = TensorStore(src)
    skel = sk.build_meta(sk.folder_config(src.folder))
    rotated = plan(skel, store, RotateSpec(seed=a.seed, keep_head=True, mlp=True)).wrap(store)
    blocks_name, _ = sk.blocks_of(skel)
    keys = [k for k in store.keys() if k.startswith(blocks_name + ".") and k.endswith(".weight")
            and store.get(k).dim() == 2 and int(k[len(blocks_name) + 1:].split(".")[0]) % a.every == 0]
    gen = torch.Generator().manual_seed(0)

    def weights(variant: str, k: str) -> torch.Tensor:
        if variant == "gaussian":
            w = store.get(k).to(torch.float32)  # (out, in)
            return torch.randn(w.shape, generator=gen) * w.pow(2).mean(1, keepdim=True).sqrt()
        return (rotated if variant == "rotated" else store).get(k).to(torch.float32)

    variants = ["unrotated", "rotated", "gaussian"]
    shape_rows = {}
    for v in variants:
        ws = [weights(v, k) for k in keys]
        kurt = [float(((w - w.mean()) ** 4).mean() / ((w - w.mean()) ** 2).mean() ** 2) - 3 for w in ws]
        g = [grids.group_weights(w, 64) for w in ws]
        gmr = [float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean()) for x in g]
        shape_rows[v] = {"excess_kurtosis": sum(kurt) / len(kurt), "group64_max_over_rms": sum(gmr) / len(gmr)}
    rows = []
    print(f"# {rec['command']}\n# commit {rec['commit']}, {rec['date']}; {len(keys)} linears (every {a.every}-th block), "
          f"rotation keep+mlp seed {a.seed}")
    for bits, gs in configs:
        spec = GridSpec(bits=bits, group_size=gs, grid="asymz", range="mse").validate()
        err = {}
        for v in variants:
            errs = []
            for k in keys:
                w = weights(v, k)
                wg = grids.group_weights(w, gs)
                p = grids.fit(wg, spec)
                d = grids.dequantize(grids.quantize(wg, p, spec), p, spec) - wg
                errs.append(float(d.nan_to_num().pow(2).sum() / wg.nan_to_num().pow(2).sum()))
            err[v] = _gmean(errs)
        row = {"bits": bits, "group_size": gs, "rel_err": err, "rotated_over_unrotated": err["rotated"] / err["unrotated"],
               "gaussian_over_unrotated": err["gaussian"] / err["unrotated"]}
        rows.append(row)
        print(f"# {bits}-bit g{gs}: {row}", flush=True)
    out = {**rec, "model": a.model, "linears": len(keys), "every": a.every, "seed": a.seed, "shape": shape_rows, "rows": rows}
    name = "rotate-floor" + (f"-{a.label}" if a.label else "")
    tmp = HERE / "out" / f"{name}.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(HERE / "out" / f"{name}.json")
    print("\n| weights | excess kurtosis | group-64 max/rms |\n|---|---|---|")
    for v in variants:
        print(f"| {v} | {shape_rows[v]['excess_kurtosis']:.2f} | {shape_rows[v]['group64_max_over_rms']:.2f} |")
    print("\n| bits | group | rel. error unrotated | rotated | i.i.d. Gaussian | rotated / unrotated | Gaussian / unrotated |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        e = r["rel_err"]
        print(f"| {r['bits']} | {'per channel' if r['group_size'] == -1 else r['group_size']} | {e['unrotated']:.5f} "
              f"| {e['rotated']:.5f} | {e['gaussian']:.5f} | {r['rotated_over_unrotated']:.3f} | {r['gaussian_over_unrotated']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
