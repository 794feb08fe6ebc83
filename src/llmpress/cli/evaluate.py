"""``llmpress eval``: perplexity, fidelity to the original and cost, with the protocol stated;
with ``--tasks``, lm-evaluation-harness tasks on the model and the original side by side."""
from __future__ import annotations

import os
from typing import Any, Optional

import typer
from rich import box
from rich.table import Table

from .app import DEVICE_OPT, JSON_OPT, app, console, emit

_ROWS = [  # (key, label, format)
    ("ppl", "perplexity", "{:.4f}"),
    ("ln_ppl_ratio", "ln(PPL ratio)", "{:+.5f}"),
    ("ln_ppl_ratio_se", "  ± std. error", "{:.5f}"),
    ("kl_mean", "KL mean (nats/token)", "{:.5f}"),
    ("kl_median", "KL median", "{:.5f}"),
    ("kl_p99", "KL p99", "{:.5f}"),
    ("kl_max", "KL max", "{:.5f}"),
    ("top1", "top-1 agreement", "{:.2%}"),
    ("cos_mean", "embedding cosine mean", "{:.6f}"),
    ("cos_min", "embedding cosine worst", "{:.6f}"),
    ("bpw", "bits per weight", "{:.3f}"),
    ("bytes", "bytes on disk", "{:,}"),
    ("peak_rss_bytes", "peak RSS while running", "{:,}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
]
_REF_KEY = {"ppl": "ref_ppl", "bpw": "ref_bpw", "bytes": "bytes_in", "peak_rss_bytes": "ref_peak_rss_bytes",
            "tokens_per_s": "ref_tokens_per_s"}


def _fmt(fmt: str, v: Any) -> str:
    return "" if v is None else fmt.format(v)


def _show(r: dict[str, Any]) -> None:
    label = f" · protocol {r['protocol_label']}" if r.get("protocol_label") else ""
    t = Table(title=f"llmpress eval · {r['model']}{label}")
    t.add_column("metric", style="bold")
    t.add_column("model", justify="right")
    has_ref = r.get("reference") is not None
    if has_ref:
        t.add_column("reference", justify="right")
    view = {**r, "bytes": r.get("bytes_out")}
    for key, label, fmt in _ROWS:
        if view.get(key) is None:
            continue
        row = [label, _fmt(fmt, view[key])]
        if has_ref:
            row.append(_fmt(fmt, view.get(_REF_KEY.get(key, ""))))
        t.add_row(*row)
    console.print(t)
    for name, s in (r.get("texts") or {}).items():
        line = f"  {name}: ppl {s['ppl']:.4f}"
        if "kl_mean" in s:
            line += f" (reference {s['ref_ppl']:.4f}), KL mean {s['kl_mean']:.5f}, top-1 {s['top1']:.2%}"
        console.print(line)
    p = r["protocol"]
    if "ctx" in p:
        texts = ", ".join(f"{x['name']} ({x['windows']} windows, sha256 {x['sha256'][:12]})" for x in p["texts"])
        console.print(f"protocol: {p['windows']} windows × {p['ctx']} tokens, {p['scored_tokens']} scored; {texts}; "
                      f"tokenizer {p['tokenizer']} {p['tokenizer_sha256'][:12]}; {p['threads']} threads")
    else:
        texts = ", ".join(f"{x['name']} ({x['sentences']} sentences)" for x in p["texts"])
        console.print(f"protocol: {p['sentences']} sentences, {p['pooling']}; {texts}; {p['threads']} threads")
    console.print(f"{r['seconds']:.1f} s")


def _pm(v: float | None, se: float | None, signed: bool = False) -> str:
    if v is None:
        return ""
    text = f"{v:+.3f}" if signed else f"{v:.3f}"
    return text + (f"±{se:.3f}" if se is not None else "")


def _show_tasks(r: dict[str, Any]) -> None:
    t = Table(title=f"llmpress eval --tasks · {r['model']}", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("task", style="bold", overflow="fold")
    t.add_column("metric", overflow="fold")
    t.add_column("n", justify="right", no_wrap=True)
    t.add_column("model", justify="right", no_wrap=True)
    has_ref = r.get("reference") is not None
    if has_ref:
        t.add_column("reference", justify="right", no_wrap=True)
        t.add_column("Δ±paired s.e.", justify="right", no_wrap=True)
    for name, task in r["tasks"].items():
        for i, (key, m) in enumerate(task["metrics"].items()):
            arrow = {True: " ↑", False: " ↓"}.get(m.get("higher_is_better"), "")
            row = [name if i == 0 else "", key + arrow, str(task.get("n") or "") if i == 0 else "",
                   _pm(m["model"], m["model_stderr"])]
            if has_ref:
                row += [_pm(m.get("reference"), m.get("reference_stderr")), _pm(m.get("delta"), m.get("delta_se"), True)]
            t.add_row(*row)
    console.print(t)
    p = r["protocol"]
    shots = "each task's own" if p["num_fewshot"] is None else p["num_fewshot"]
    threads = f"{p['threads']} thread" + ("s" if p["threads"] != 1 else "")
    console.print(f"reference: {r.get('reference') or 'none'}; few-shot: {shots}; limit: {p['limit'] or 'all items'}; "
                  f"batch {p['batch_size']}; seed {p['seed']}; {threads}; lm-eval {p['lm_eval']}")
    console.print(f"{r['seconds']:.1f} s")


def _run_tasks(model: str, reference: Optional[str], tasks: str, limit: Optional[float], num_fewshot: Optional[int],
               batch_size: int, seed: int, threads: int, as_json: bool, device: str = "cpu") -> None:
    from ..eval.tasks import evaluate_tasks

    n = None if limit is None else (int(limit) if limit >= 1 and float(limit).is_integer() else limit)
    r = evaluate_tasks(model, tasks, reference=reference, limit=n, num_fewshot=num_fewshot, batch_size=batch_size,
                       threads=threads, seed=seed, device=device)
    emit(r, as_json, _show_tasks)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Model: a path, an llmpress folder, a hub id, or smollm2-135m / minilm-l6."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r",
                                            help="The original to compare with (default: the source an llmpress folder names)."),
    text: Optional[list[str]] = typer.Option(None, "--text", "-t",
                                             help="Corpus name, text file or hf:NAME[:CONFIG][:SPLIT]; repeat for several "
                                                  "(default: debian-handbook and linux-doc)."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per window."),
    tokens: int = typer.Option(16384, "--tokens", help="Tokens in all (split evenly among the texts)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: OMP_NUM_THREADS or all cores)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the reference instead of using the disk cache."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-evaluation-harness tasks instead of the perplexity/KL judge: "
                                                             "comma-separated names, YAML files or task folders."),
    limit: Optional[float] = typer.Option(None, "--limit", help="With --tasks: the first N items of each task (a fraction if < 1)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="With --tasks: few-shot examples (default: each task's)."),
    batch_size: int = typer.Option(8, "--batch-size", help="With --tasks: sequences per forward pass (the same for both models)."),
    seed: int = typer.Option(0, "--seed", help="With --tasks: seed of Python, NumPy, torch and the few-shot sampler."),
    device: str = DEVICE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Perplexity, KL divergence and top-1 agreement against the original on real text, and the cost;
    or, with --tasks, lm-eval task scores of the model and the original side by side."""
    n_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0) or os.cpu_count() or 1)
    if tasks is not None:
        _run_tasks(model, reference, tasks, limit, num_fewshot, batch_size, seed, n_threads, as_json, device)
        return
    import torch

    from ..eval import evaluate

    torch.set_num_threads(n_threads)
    r = evaluate(model, reference=reference, text=(text if text and len(text) > 1 else (text[0] if text else None)),
                 ctx=ctx, tokens=tokens, cache=not no_cache, device=device)
    emit(r, as_json, _show)
