"""``llmpress limit``: sweep configurations over one rate axis and find the compression limit.

Results are appended to ``results.jsonl`` as each point finishes, keyed by the model's
fingerprint, the evaluation protocol and the point's recipe: a re-run skips finished points,
and a changed model or text gives new keys (the old rows are ignored, not mixed in).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from ..models import DEFAULT_CAUSAL, TensorStore, resolve
from .frontier import KNEE_METHOD, knee, pareto, smallest
from .points import CALIB_SAMPLES, MIXED_BPW, MIXED_MENU, Point, budget as budget_points, format_points, mixed
from .report import write_report
from .runner import EXECUTORS

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"


def _fingerprint(model: str) -> str:
    src = resolve(model)
    h = hashlib.sha256()
    for f in TensorStore(src).files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _text_digest(texts: list[str]) -> str:
    from ..text import load_text

    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(load_text(t).encode()).digest())
    return h.hexdigest()[:16]


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of ``results.jsonl``; a torn line (an interrupted write) or one that is not a row
    is skipped with a warning. Rows of other models and protocols are here too: callers pick
    theirs by key."""
    rows = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                row = None
            if isinstance(row, dict):
                rows.append(row)
            elif line.strip():
                log.warning("%s: skipping a torn line (an interrupted write)", path)
    return rows


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"  # a torn last line: end it, so this row starts a line of its own
        else:
            torn = False
        f.write((("\n" if torn else "") + json.dumps(row, sort_keys=True) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def limit(
    model: str | None = None,
    out: str | Path = "limit-report",
    *,
    budget: str = "quick",
    points: list[Point] | None = None,
    max_kl: float = 0.01,
    texts: list[str] | None = None,
    ctx: int = 512,
    tokens: int = 4096,
    calib: str | None = None,
    samples: int | None = None,
    seq_len: int = 512,
    workers: int = 1,
    address: str | None = None,
    threads: int | None = None,
    mixed_bpw: float | tuple[float, ...] | None | Literal["budget"] = "budget",
    mixed_menu: str | None = None,
    device: str | None = "cpu",
    formats: list[str] | None = None,
    search: bool = True,
) -> dict[str, Any]:
    """Sweep ``points`` (or the named ``budget``) on ``model`` and write the report to ``out``.

    Returns the summary: the frontier, the lossless limit, the near-lossless points, the knee
    and the recommendation. ``device``: cpu | cuda | auto, where each point is compressed and judged
    (a point's key names the device unless it is the CPU: figures differ within float tolerance).
    ``formats``: export formats whose own types join the sweep (``gguf``: llama.cpp's K-quant mixes as
    llama-quantize makes them and as llmpress makes them; the llama.cpp points are left out, with a
    warning, where its tools are not found). ``search``: after a budget's points, search for the
    smallest configuration with mean KL ≤ ``max_kl`` (:mod:`llmpress.sweep.search`; its points join
    the report).
    ``mixed_bpw``: target(s) of the mixed-precision points (allocation over ``mixed_menu``, by default
    the budget's ``MIXED_MENU``; "budget":
    the budget's ``MIXED_BPW``; None or () for none); their sensitivity table is measured once and
    kept in ``out/sensitivity/``."""
    from ..device import resolve_device
    from ..text import CALIB_DEFAULT, EVAL_DEFAULTS

    dev = resolve_device(device)
    t0, c0 = time.perf_counter(), time.process_time()
    model = model or DEFAULT_CAUSAL
    texts = texts or list(EVAL_DEFAULTS)
    threads = threads or max(1, (os.cpu_count() or 2) // max(1, workers))
    pts = list(points) if points is not None else budget_points(budget)
    if points is None:
        targets = MIXED_BPW.get(budget, ()) if mixed_bpw == "budget" else \
            (mixed_bpw,) if isinstance(mixed_bpw, (int, float)) else tuple(mixed_bpw or ())
        menu = mixed_menu or MIXED_MENU.get(budget, "gptq")
        if targets:
            from .menu import check_menu

            check_menu(menu, None)  # before any point runs
        pts += [mixed(float(t), menu) for t in targets]
    for f in formats or ():
        pts += format_points(f, budget)
    if any(p.family == "llama.cpp" for p in pts):
        from ..integrations.llama_cpp import find_tools, where_to_look

        if find_tools() is None:
            log.warning("llama.cpp's tools not found (looked in: %s): its points are left out", where_to_look())
            pts = [p for p in pts if p.family != "llama.cpp"]
    samples = samples or CALIB_SAMPLES.get(budget, 32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": model, "texts": texts, "ctx": ctx, "tokens": tokens, "calib": calib or CALIB_DEFAULT,
                "samples": samples, "seq_len": seq_len, "threads": threads, "recipes": str(out / "recipes"),
                "device": str(dev)}
    context = json.dumps({"model": _fingerprint(model), "text": _text_digest(texts), "ctx": ctx, "tokens": tokens,
                          "calib": settings["calib"], "samples": samples, "seq_len": seq_len, "threads": threads,
                          **({"device": str(dev)} if dev.type != "cpu" else {})},
                         sort_keys=True)
    settings["sensitivity"] = str(out / "sensitivity" / hashlib.sha256(context.encode()).hexdigest()[:16])
    results_path = out / RESULTS
    done = {r["key"]: r for r in read_results(results_path) if "key" in r}
    log.info("%d points, %d already in %s", len(pts), sum(p.key(context) in done for p in pts), results_path)
    execute = EXECUTORS["local" if workers <= 1 and not address else "ray"]

    shown: list[dict[str, Any]] = []  # this run's rows so far, in order, each once
    measured: list[dict[str, Any]] = []  # the rows this call measured (not reused)

    def show(row: dict[str, Any]) -> None:
        if all(r["key"] != row["key"] for r in shown):
            shown.append(row)

    def report(progress: str | None, searched: dict[str, Any] | None = None) -> dict[str, Any]:
        """The summary of the rows so far; report.md and frontier.png rewritten from it (each
        atomically, so a reader never sees half a file), saying ``progress`` while the sweep runs."""
        rows = list(shown)
        summary = summarize(rows, max_kl)
        if searched is not None:
            summary["search"] = {"tried": [r["label"] for r in searched["rows"]], "skipped": searched["skipped"],
                                 "seconds": searched["seconds"], "complete": searched["complete"]}
        summary["keys"] = [r["key"] for r in rows]
        summary.update(model=model, budget=budget if points is None else "custom", seconds=time.perf_counter() - t0,
                       results=str(results_path), report=str(out / "report.md"), plot=str(out / "frontier.png"),
                       protocol={**(rows[0].get("protocol") or {}), "settings": {k: v for k, v in settings.items()}})
        if progress is not None:
            summary["progress"] = progress
        write_report(out, rows, summary)
        return summary

    def run(points: list[Point], desc: str = "limit", stage: Any = None) -> list[dict[str, Any]]:
        """Rows of ``points``: measured now, or read from results.jsonl when already there; the
        report is rewritten after each point measured (``stage()``: what it says is in progress)."""
        from tqdm.auto import tqdm

        todo = [(p, settings) for p in points if p.key(context) not in done]
        for p in points:
            if p.key(context) in done:
                show(done[p.key(context)])
        bar = tqdm(total=len(todo), desc=desc, unit="point", disable=not todo)
        for point, row in execute(todo, workers, address):
            row["key"] = point.key(context)
            _append(results_path, row)
            done[row["key"]] = row
            measured.append(row)
            show(row)
            report(stage() if stage else "in progress")
            bar.set_postfix_str(f"{point.label}: bpw {row['bpw']:.2f} KL {row.get('kl_mean') or 0:.4f}")
            bar.update()
        bar.close()
        return [done[p.key(context)] for p in points]

    searching = search and points is None
    keys = {p.key(context) for p in pts}

    def budget_stage() -> str:
        n = sum(k in done for k in keys)
        return f"{n} of {len(pts)} points" + ("; the near-lossless search follows" if searching else "")

    rows = run(pts, stage=budget_stage)
    searched = None
    if searching:
        from .search import BUDGET_LADDERS, SEARCH_SECONDS, SWEEP_CPU_SECONDS, near_lossless

        ran: list[str] = []

        def search_run(p: list[Point]) -> list[dict[str, Any]]:
            got = run(p, "near-lossless search",
                      stage=lambda: f"{len(pts)} of {len(pts)} points; near-lossless search: {len(ran) + 1} run")
            ran.extend(r["label"] for r in got)
            return got

        allowance = SEARCH_SECONDS.get(budget, 0)
        if budget in SWEEP_CPU_SECONDS:  # what the budget's points left of the sweep's CPU time
            spent = max(time.process_time() - c0, sum(r.get("cpu_seconds") or 0 for r in measured))
            allowance = max(0.0, min(allowance, SWEEP_CPU_SECONDS[budget] - spent))
        searched = near_lossless(search_run, max_kl, allowance, rows, ladders=BUDGET_LADDERS.get(budget))
        for r in searched["rows"]:
            show(r)
    return report(None, searched)


def summarize(rows: list[dict[str, Any]], max_kl: float) -> dict[str, Any]:
    """Frontier, lossless limit, near-lossless points, knee and a recommendation."""
    front = pareto(rows, "bpw", "kl_mean")
    k = knee([r for r in front if r["family"] != "lossless"], "bpw", "kl_mean")
    ll = next((r for r in rows if r["family"] == "lossless"), None)
    # the lossless point is a configuration too: where packing finds a grid (a checkpoint dequantized
    # from one) it can be smaller than every lossy point within the threshold
    near_kl = smallest(rows, lambda r: r.get("kl_mean") is not None and r["kl_mean"] <= max_kl)
    near_ppl = smallest(rows, lambda r: r.get("ppl") and r.get("ref_ppl") and r["ppl"] <= 1.01 * r["ref_ppl"])
    rec = near_kl or k
    why = (f"the smallest configuration with mean KL ≤ {max_kl:g} nats" if near_kl else
           "the knee of the frontier (no configuration reached the KL threshold)")
    return {
        "frontier": [r["label"] for r in front],
        "lossless": {"bpw": ll["bpw"], "bpw_bound": ll.get("bpw_bound"), "ratio": ll["ratio"], "kl_mean": ll.get("kl_mean")} if ll else None,
        "near_lossless_kl": near_kl["label"] if near_kl else None,
        "near_lossless_ppl": near_ppl["label"] if near_ppl else None,
        "max_kl": max_kl,
        "knee": k["label"] if k else None,
        "knee_method": KNEE_METHOD,
        "recommendation": {"label": rec["label"], "why": why, "command": rec["command"], "bpw": rec["bpw"],
                           "kl_mean": rec.get("kl_mean"), "ppl": rec.get("ppl")} if rec else None,
    }
