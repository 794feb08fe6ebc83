"""``llmpress limit``: the rate–quality frontier, its knee and the compression limit."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .app import DEVICE_OPT, JSON_OPT, app, console, emit, fail


@app.command("limit")
def limit_cmd(
    model: Optional[str] = typer.Argument(None, help="MODEL (default: the embedded smollm2-135m)."),
    out: Path = typer.Option(Path("limit-report"), "-o", "--out", help="Report folder (results.jsonl, report.md, frontier.png)."),
    budget: str = typer.Option("quick", "--budget", help="quick (RTN across the range, the lossless limit, then a "
                               "near-lossless search over packed RTN rungs: a few CPU-minutes for a 135M model) | full "
                               "(GPTQ, AWQ, low-rank and mixed points too; its search tries them all)"),
    max_kl: float = typer.Option(0.01, "--max-kl", help="Mean KL (nats) that counts as near-lossless."),
    text: Optional[list[str]] = typer.Option(None, "--text", help="Evaluation text(s); default: two real corpora."),
    ctx: int = typer.Option(512, "--ctx"),
    tokens: int = typer.Option(4096, "--tokens", help="Evaluation tokens per point."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text (default: the calibration mix)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Calibration windows (default: 16 quick, 64 full)."),
    mixed_bpw: Optional[list[float]] = typer.Option(None, "--mixed-bpw", help="Target bpw of a mixed-precision point (repeat for several; 0: none; default: the budget's)."),
    mixed_menu: Optional[str] = typer.Option(None, "--mixed-menu", help="Menu the mixed points allocate from: gptq | gptq-quick | awq | rtn | best | best-quick | gguf (default: gptq-quick in quick, gptq in full)."),
    workers: int = typer.Option(1, "--workers", help="Points in parallel (Ray); 1 runs them in this process."),
    address: Optional[str] = typer.Option(None, "--address", help="An existing Ray cluster."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads per point (fixed, so results repeat)."),
    formats: Optional[list[str]] = typer.Option(None, "--formats", help="Export formats whose own types join the sweep: "
                                                 "gguf (llama.cpp's Q4_K_M/Q3_K_M/Q2_K by llama-quantize + imatrix and by llmpress)."),
    search: bool = typer.Option(True, "--search/--no-search", help="After the budget's points, search bits, group size, "
                                "method and lossless packing for the smallest point within --max-kl, in a CPU-time "
                                "allowance (a point predicted to overrun it is not started)."),
    device: str = DEVICE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Sweep lossless, quantization and low-rank configurations; report the frontier and the limit."""
    from ..sweep import limit
    from ..sweep.report import HEADER, table_rows

    if max_kl <= 0:
        fail("--max-kl must be positive")
    targets = "budget" if not mixed_bpw else tuple(b for b in mixed_bpw if b > 0)
    s = limit(model, out, budget=budget, max_kl=max_kl, texts=text, ctx=ctx, tokens=tokens, calib=calib,
              samples=samples, workers=workers, address=address, threads=threads, mixed_bpw=targets,
              mixed_menu=mixed_menu, device=device, search=search,
              formats=[f for x in formats or () for f in x.split(",") if f])

    def show(s: dict) -> None:
        rows = shown_rows(s)
        t = Table(title=f"compression limit of {s['model']}")
        for h in HEADER:
            t.add_column(h)
        seen = set()
        for r in table_rows(rows, set(s["frontier"])):
            if r[0] not in seen:
                seen.add(r[0])
                t.add_row(*r)
        console.print(t)
        rec = s.get("recommendation")
        if rec:
            console.print(f"[bold]recommendation:[/] {rec['label']} ({rec['why']})\n  {rec['command']}")
        console.print(f"report: {s['report']}")

    emit(s, as_json, show)


def shown_rows(s: dict) -> list[dict]:
    """The rows of this run (its model and protocol: ``s["keys"]``) the table shows; results.jsonl
    may hold other models' rows under the same labels."""
    from ..sweep.driver import read_results

    keys, labels = set(s["keys"]), {*s["frontier"], *_labels(s)}
    return [r for r in read_results(Path(s["results"])) if r.get("key") in keys and r.get("label") in labels]


def _labels(s: dict) -> set[str]:
    return {x for x in (s.get("knee"), s.get("near_lossless_kl"), s.get("near_lossless_ppl")) if x}
