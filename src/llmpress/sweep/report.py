"""The sweep's report: ``report.md`` (tables, the recommendation, the protocol) and
``frontier.png`` (KL and PPL on log scales against bits per weight)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_file

def _fmt(v: Any, spec: str = ".4g") -> str:
    return "—" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def protocol_label(r: dict[str, Any]) -> str:
    """A row's evaluation protocol in one short string (``eval``'s ``protocol_label``; for rows written
    before it was recorded, made again from the row's ``protocol``)."""
    if r.get("protocol_label"):
        return str(r["protocol_label"])
    from ..eval.windows import Protocol

    try:
        return Protocol(**(r.get("protocol") or {})).label()
    except (TypeError, KeyError):
        return "unrecorded"


def table_rows(rows: list[dict[str, Any]], frontier: set[str], with_protocol: bool = False) -> list[list[str]]:
    out = []
    for r in sorted(rows, key=lambda r: r["bpw"]):
        out.append([r["label"] + (" *" if r["label"] in frontier else ""), _fmt(r["bpw"], ".3f"), _fmt(r.get("kl_mean")),
                    _fmt(r.get("kl_p99")), _fmt(r.get("top1"), ".4f"), _fmt(r.get("ppl"), ".3f"), _fmt(r.get("ratio"), ".3f"),
                    _fmt(r.get("seconds"), ".0f")] + ([f"`{protocol_label(r)}`"] if with_protocol else []))
    return out


HEADER = ["point", "bpw", "KL mean", "KL p99", "top-1", "PPL", "bytes ratio", "s"]


def write_report(out: Path, rows: list[dict[str, Any]], s: dict[str, Any]) -> None:
    front = set(s["frontier"])
    labels = sorted({protocol_label(r) for r in rows})
    one = len(labels) == 1  # else each row names its own: figures of two protocols are not comparable
    title = f"# Compression limit · protocol `{labels[0]}`" if one else "# Compression limit · several protocols"
    lines = [title, "", f"Model: `{s['model']}`. Budget: {s['budget']}. Points: {len(rows)}. "
             + (f"Every KL and PPL below was measured under protocol `{labels[0]}`." if one else
                "Rows measured under different protocols (column `protocol`) are not comparable."), ""]
    if s.get("progress"):
        lines += [f"**The sweep is in progress** ({s['progress']}): this report and the plot are rewritten as each "
                  "point finishes; the recommendation may still change.", ""]
    rec = s.get("recommendation")
    if rec:
        lines += ["## Recommendation", "", f"**{rec['label']}**: {rec['why']}: {_fmt(rec['bpw'], '.3f')} bits per weight, "
                  f"mean KL {_fmt(rec['kl_mean'])} nats, PPL {_fmt(rec['ppl'], '.3f')}.", "", "```sh", rec["command"], "```", ""]
    ll = s.get("lossless")
    lines += ["## Limits", ""]
    if ll:
        lines.append(f"- **Lossless limit**: `pack` stores {_fmt(ll['bpw'], '.3f')} bits per parameter (ratio {_fmt(ll['ratio'], '.4f')}); "
                     f"the chunk-adaptive entropy bound is {_fmt(ll['bpw_bound'], '.3f')}; KL {_fmt(ll['kl_mean'])} (bit-exact).")
    lines.append(f"- **Near-lossless (mean KL ≤ {s['max_kl']:g})**: {s['near_lossless_kl'] or 'none reached'}")
    lines.append(f"- **Near-lossless (PPL within 1 %)**: {s['near_lossless_ppl'] or 'none reached'}")
    lines.append(f"- **Knee**: {s['knee'] or 'none (fewer than three lossy frontier points, or none of them on the bend side of the chord)'} ({s['knee_method']})")
    found = s.get("search")
    if found:
        lines += ["", "## Near-lossless search", "",
                  f"{len(found['tried'])} point{'' if len(found['tried']) == 1 else 's'} run in {found['seconds']:.0f} CPU seconds"
                  + ("" if found["complete"] else " (time ran out before every ladder was searched)") + ": "
                  + (", ".join(f"`{t}`" for t in found["tried"]) or "none") + "."]
        if found["skipped"]:
            lines.append("Skipped: " + "; ".join(found["skipped"]) + ".")
    head = HEADER + ([] if one else ["protocol"])
    lines += ["", "## All points" + (f" (protocol `{labels[0]}`)" if one else ""), "",
              "`*` marks the Pareto frontier of bits per weight against mean KL.", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows, front, with_protocol=not one)]
    lines += ["", "## Protocol", "",
              "Bits per weight count every stored byte (codes, scales, zeros, factors, metadata) of the linear "
              "layers; embeddings and norms are kept as they were and counted in the bytes ratio. The lossless "
              "point counts all tensors.", "", "```json", json.dumps(s.get("protocol"), indent=1, default=str), "```", ""]
    _write_recipes(out / "recipes", rows)
    with atomic_file(out / "report.md", force=True) as tmp:
        tmp.write_text("\n".join(lines))
    plot(out / "frontier.png", rows, s)


def _write_recipes(folder: Path, rows: list[dict[str, Any]]) -> None:
    """Each lossy point's recipe as YAML, so every command in the report runs as printed."""
    from ..recipe import Recipe

    folder.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if r.get("recipe"):
            with atomic_file(folder / f"{r['label']}.yaml", force=True) as tmp:
                tmp.write_text(Recipe.from_dict(r["recipe"]).to_yaml())


def plot(path: Path, rows: list[dict[str, Any]], s: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = [r for r in sorted(rows, key=lambda r: r["bpw"]) if r["label"] in set(s["frontier"])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, name in ((axes[0], "kl_mean", "mean KL to the original (nats)"), (axes[1], "ppl", "perplexity")):
        positive = [r[key] for r in rows if r.get(key)]
        floor = min(positive) / 3 if positive else 1e-6  # where exact zeros (lossless) are drawn on a log axis
        fams = sorted({r["family"] for r in rows})
        for fam in fams:
            pts = [r for r in rows if r["family"] == fam and r.get(key) is not None]
            ys = [max(r[key], floor) for r in pts]
            ax.scatter([r["bpw"] for r in pts], ys, label=fam, s=28)
        for r in rows:
            if r.get(key) == 0:  # exact zeros cannot sit on a log axis: drawn at the floor, labelled
                ax.annotate(f"{r['label']}: {key} = 0 exactly", (r["bpw"], floor), textcoords="offset points",
                            xytext=(-8, -3), ha="right", va="top", fontsize=7)
        fp = [r for r in front if r.get(key) is not None]
        ax.plot([r["bpw"] for r in fp], [max(r[key], floor) for r in fp], "k--", lw=1, label="frontier (KL)")
        rec = next((r for r in rows if r["label"] == (s.get("recommendation") or {}).get("label")), None)
        if rec and rec.get(key) is not None:
            ax.scatter([rec["bpw"]], [max(rec[key], floor)], marker="o", s=160, facecolors="none", edgecolors="green",
                       linewidths=2, zorder=6, label="recommendation")
        knee = next((r for r in rows if r["label"] == s.get("knee")), None)
        if knee and knee.get(key) is not None:
            ax.scatter([knee["bpw"]], [max(knee[key], floor)], marker="*", s=250, c="red", zorder=5, label="knee")
        if key == "ppl" and rows and rows[0].get("ref_ppl"):
            ax.axhline(rows[0]["ref_ppl"], color="grey", lw=0.8, ls=":", label="original")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (everything stored)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    labels = sorted({protocol_label(r) for r in rows})
    fig.suptitle(f"{s['model']}: rate–quality frontier (protocol {labels[0] if len(labels) == 1 else 'mixed'})"
                 + (f" (in progress: {s['progress']})" if s.get("progress") else ""))
    fig.tight_layout()
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
