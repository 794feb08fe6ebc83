"""``llmpress generate MODEL "prompt"``: stream a model's continuation and report its speed and memory."""
from __future__ import annotations

import sys
from typing import Any, Optional

import typer

from .app import JSON_OPT, app, console, emit, fail, kv_table

DTYPES = ("float32", "bfloat16")


def _show(res: dict[str, Any]) -> None:
    rows = {k: res[k] for k in ("prompt_tokens", "new_tokens", "prefill_s", "decode_s", "tokens_per_s",
                                "weight_bytes", "peak_rss_bytes", "forwards", "threads") if k in res}
    console.print(kv_table("generate", rows))


@app.command()
def generate(
    model: str = typer.Argument(..., help="Model: an llmpress folder or .llmp, a folder, .gguf, hub id or embedded name."),
    prompt: str = typer.Argument(..., help="The prompt."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0: greedy; else sampling temperature."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest set of tokens of this mass."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads (default: torch's)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
    exact: bool = typer.Option(False, "--exact", help="Keep float32 in quantized layers (dequantize per call) "
                                                       "instead of their packed bf16 kernels."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Do not stop at the end-of-sequence token."),
    dtype: str = typer.Option("float32", "--dtype", help="Dtype of the unquantized tensors: float32 | bfloat16."),
    as_json: bool = JSON_OPT,
) -> None:
    """Generate text after PROMPT, streamed to stdout, then tokens/s and resident memory."""
    import torch

    from ..generation import generate as run

    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}")

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    res = run(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
              threads=threads, chat=chat, exact=exact, ignore_eos=ignore_eos, dtype=getattr(torch, dtype), stream=stream)
    sys.stdout.write("\n")
    emit(res, as_json, _show)
