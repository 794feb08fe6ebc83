"""Running one point of a sweep, and running many: in process, or fanned out on Ray.

A point is compressed into a scratch folder, judged against the original with the shared
(cached) reference log-probabilities, and reduced to one row; the scratch output is removed.
Executors are a registry, so the sweep does not care where a point runs.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import ResourceLimitError
from ..io.atomic import scratch_dir
from ..recipe import Recipe
from .points import Point

log = logging.getLogger(__name__)

Task = tuple[Point, dict[str, Any]]  # the point and the sweep settings it needs


def _judge(path: Path, settings: dict[str, Any], tokenizer: Any = None) -> dict[str, Any]:
    """``evaluate`` against the original, quantized layers decoded once (the same figures as
    decoding them at every forward, in a fraction of the time)."""
    from ..eval import evaluate

    return evaluate(str(path), reference=settings["model"], text=settings["texts"], ctx=settings["ctx"],
                    tokens=settings["tokens"], tokenizer=tokenizer, device=settings.get("device", "cpu"),
                    decode_once=True)


_EVAL_KEYS = ("ppl", "ref_ppl", "kl_mean", "kl_median", "kl_p99", "kl_max", "top1", "ln_ppl_ratio", "ln_ppl_ratio_se",
              "tokens_per_s", "peak_rss_bytes", "protocol", "protocol_label", "cos_mean", "cos_min")


def _lossless(point: Point, settings: dict[str, Any], work: Path) -> dict[str, Any]:
    from ..eval.api import evaluate_identical
    from ..lossless.container import pack, verify
    from ..models import TensorStore, is_causal, load_tokenizer, resolve

    dst = work / "model.llmp"
    packed = pack(settings["model"], dst, force=True, threads=settings["threads"])
    src = resolve(settings["model"])
    params = sum(t.numel() for _, t in TensorStore(src).items())
    tok = load_tokenizer(settings["model"])  # the container holds the same one
    if is_causal(src):
        # every chunk's checksum and every file's sha256 checked: the restore is the original bit for
        # bit, so the judge's figures are the reference's own (KL exactly 0), known without a forward pass
        verify(dst, threads=settings["threads"])
        ev = evaluate_identical(settings["model"], settings["texts"], ctx=settings["ctx"], tokens=settings["tokens"],
                                tokenizer=tok)
    else:
        ev = _judge(dst, settings, tokenizer=tok)
    return {
        **{k: ev.get(k) for k in _EVAL_KEYS},
        "bpw": 8 * packed["tensor_bytes_out"] / params,
        "bpw_bound": 8 * packed["bound_bytes"] / params,
        "bpw_scope": "all tensors",
        "bytes_in": packed["bytes_in"],
        "bytes_out": packed["bytes_out"],
        "ratio": packed["ratio"],
    }


def _lossy(point: Point, settings: dict[str, Any], work: Path) -> dict[str, Any]:
    from ..pipeline import compress

    recipe = Recipe.from_dict(point.recipe) if point.recipe is not None else None
    extra: dict[str, Any] = {}
    if "target_bpw" in point.params:  # mixed, packed or not
        from .mixed import mixed_recipe

        menu = point.params["menu"]
        cache = Path(f"{settings['sensitivity']}-{menu}.json") if settings.get("sensitivity") else None
        recipe, alloc = mixed_recipe(settings["model"], target_bpw=point.params["target_bpw"], menu=menu,
                                     calib=settings["calib"], samples=settings["samples"], seq_len=settings["seq_len"],
                                     cache=cache, device=settings.get("device", "cpu"))
        extra = {"allocation": alloc, "recipe": recipe.to_dict()}
    elif point.family == "gguf-mix":
        from ..quant.gguf_mix import mix_recipe, model_shapes

        recipe = mix_recipe(point.params["gguf_mix"], *model_shapes(settings["model"]), method=point.params["method"])
    assert recipe is not None
    out = work / "out"
    summary = compress(settings["model"], recipe, out, calib=settings["calib"], samples=settings["samples"],
                       seq_len=settings["seq_len"], progress=False, device=settings.get("device", "cpu"),
                       rotate=point.params.get("rotate"))
    ev = _judge(out, settings)
    if point.params.get("pack"):
        extra.update(_packed_cost(out, summary, work, settings["threads"]))
    return {
        **{k: ev.get(k) for k in _EVAL_KEYS},
        "bpw": summary["bpw"],
        "bpw_scope": "linear layers",
        "bytes_in": summary["bytes_in"],
        "bytes_out": summary["bytes_out"],
        "ratio": summary["ratio"],
        "compress_seconds": summary["seconds"],
        **extra,
    }


def _packed_cost(folder: Path, summary: dict[str, Any], work: Path, threads: int) -> dict[str, Any]:
    """Quantization + lossless packing of what remains: pack the lossy folder, verify it
    restores byte for byte (so fidelity is the folder's), and count the linear layers' bits
    from the packed size of each of their stored tensors plus their metadata."""
    from ..io.folder import read_manifest
    from ..lossless.container import pack, verify
    from ..tensor import CompressedTensor

    dst = work / "out.llmp"
    packed = pack(folder, dst, force=True, threads=threads)
    verify(dst)
    sizes = {name: t["packed"] for name, t in packed["tensors"].items()}
    bits = 0
    for param, entry in read_manifest(folder)["tensors"].items():
        bits += 8 * sum(sizes[f"{param}.{k}"] for k in entry["keys"])
        bits += 8 * len(CompressedTensor(entry["codec"], {}, entry["meta"]).meta_json().encode())
    for name, layer in summary["layers"].items():
        if layer["codec"] == "keep":
            bits += 8 * sizes[f"{name}.weight"]
    return {"bpw": bits / summary["linear_params"], "bpw_unpacked": summary["bpw"], "bytes_out": packed["bytes_out"],
            "ratio": packed["bytes_out"] / summary["bytes_in"]}


def calib_file(settings: dict[str, Any]) -> str:
    """The name of the calibration windows' text file written beside the recipes (llama.cpp points)."""
    return f"calib-{settings['samples']}x{settings['seq_len']}.txt"


def _llama_cpp(point: Point, settings: dict[str, Any], work: Path) -> dict[str, Any]:
    """llama.cpp's quantizer on the original (exported as F32 GGUF), judged like every other point
    (the GGUF dequantized by transformers' reader). bpw counts the linear layers as stored."""
    from ..integrations import llama_cpp as lc
    from ..models import gguf_to_folder, load_tokenizer
    from ..targets.api import export

    tools = lc.find_tools()
    if tools is None:
        raise ResourceLimitError(f"llama.cpp's tools not found; looked in: {lc.where_to_look()}")
    t0 = time.perf_counter()
    f32 = work / "f32.gguf"
    export(settings["model"], str(f32), format="gguf", type="f32")
    imat = None
    if point.params["imatrix"]:
        text = Path(settings["recipes"]) / calib_file(settings)
        text.parent.mkdir(parents=True, exist_ok=True)
        lc.calibration_text(settings["model"], settings["calib"], settings["samples"], settings["seq_len"], text)
        imat = work / "imatrix.gguf"
        lc.imatrix(tools, f32, text, imat, settings["seq_len"], settings["samples"], settings["threads"])
    q = work / "model.gguf"
    lc.quantize(tools, f32, q, point.params["mix"], settings["threads"], imat)
    secs = time.perf_counter() - t0
    bits, n = lc.linear_bits(q)
    dense = gguf_to_folder(q, work / "dense")
    ev = _judge(dense, settings, tokenizer=load_tokenizer(settings["model"]))
    return {
        **{k: ev.get(k) for k in _EVAL_KEYS},
        "bpw": bits / n,
        "bpw_scope": "linear layers",
        "bytes_out": q.stat().st_size,
        "bytes_in": f32.stat().st_size,
        "ratio": q.stat().st_size / f32.stat().st_size,
        "compress_seconds": secs,
    }


# how a point of each family is made; the others are lossy recipes
MAKERS: dict[str, Callable[[Point, dict[str, Any], Path], dict[str, Any]]] = {
    "lossless": _lossless,
    "llama.cpp": _llama_cpp,
}


def point_command(point: Point, settings: dict[str, Any]) -> str:
    """The shell command that reproduces ``point`` under ``settings``."""
    command = point.command.format(model=settings["model"], out=point.label, recipes=settings["recipes"],
                                   samples=settings["samples"], seq_len=settings["seq_len"],
                                   calib_file=calib_file(settings))
    if point.calib and "{samples}" not in point.command:  # a command that names its calibration itself keeps it
        first, sep, rest = command.partition(" && ")  # the flags belong to the command that compresses
        flags = f" --calib {settings['calib']} --samples {settings['samples']} --seq-len {settings['seq_len']}"
        command = first + flags + sep + rest
    return command


def run_point(point: Point, settings: dict[str, Any]) -> dict[str, Any]:
    """Compress, judge, clean up: one row of results.jsonl (without its key)."""
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    with scratch_dir(settings.get("scratch"), "llmpress-limit") as work:  # a killed run's is removed by the next
        row = MAKERS.get(point.family, _lossy)(point, settings, work)
    command = point_command(point, settings)
    row.update(label=point.label, family=point.family, recipe=row.get("recipe", point.recipe), command=command,
               calib=point.calib, seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
    return row


Executor = Callable[[list[Task], int, str | None], Iterator[tuple[Point, dict[str, Any]]]]
EXECUTORS: dict[str, Executor] = {}


def executor(name: str) -> Callable[[Executor], Executor]:
    def deco(fn: Executor) -> Executor:
        EXECUTORS[name] = fn
        return fn

    return deco


@executor("local")
def _local(tasks: list[Task], workers: int, address: str | None) -> Iterator[tuple[Point, dict[str, Any]]]:
    for point, settings in tasks:
        yield point, run_point(point, settings)


@executor("ray")
def _ray(tasks: list[Task], workers: int, address: str | None) -> Iterator[tuple[Point, dict[str, Any]]]:
    from ..cluster import ray_cluster

    with ray_cluster(workers, address, what="parallel points") as cluster:
        remote = cluster.remote(run_point)
        pending = {remote.remote(p, s): p for p, s in tasks}
        while pending:
            done, _ = cluster.ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), cluster.ray.get(ref)
