"""The architecture matrix: every verb on small random models of nine dense families (tests/families.py).

For each family: the runner's walk reproduces every block's output; each fold pattern keeps
the logits; quantize (RTN, GPTQ, AWQ with the family's fold patterns) and factorize (whitened)
→ llmpress.load computes what the original transformers model holding the decoded tensors
computes; at 8 bits the result stays next to the original and AWQ's scales fold where the
family allows; evaluate gives finite figures; finetune runs; the dense export loads in
transformers and computes what llmpress.load does; gguf and compressed-tensors export where the
format holds the family and refuse by name where not. Calibrated methods refuse an
encoder-decoder before any work.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import llmpress
from llmpress.quant.linear import QuantLinear

sys.path.insert(0, str(Path(__file__).parent))
from families import FAMILIES, VOCAB, build  # noqa: E402

CALIB = dict(samples=4, seq_len=32, progress=False)
# the searches inside a method (GPTQ's and AWQ's clipping, AWQ's α grid) are tested on their own
# elsewhere; here each family's walk, folds and layouts are what is under test, so they are cut short
METHODS = {"rtn": {}, "gptq": {"range": "minmax"}, "awq": {"clip": False, "n_grid": 5}}
IDS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))  # longer than the sliding windows


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request, family_tokenizer_dir, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    return name, build(name, tmp_path_factory.mktemp(name) / "orig", family_tokenizer_dir)


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def _kl(a: torch.Tensor, ref: torch.Tensor) -> float:
    return torch.nn.functional.kl_div(a.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _block_linears(folder: Path) -> dict[str, str]:
    """Every linear inside the blocks: full name -> name within its block."""
    from llmpress import skeleton as sk

    skel = sk.build_meta(sk.folder_config(folder))
    prefix = sk.blocks_of(skel)[0] + "."
    return {n: n[len(prefix):].split(".", 1)[1] for n in sk.linear_names(skel) if n.startswith(prefix)}


def _stored_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    return {k for f in folder.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}


def _dequantized_dense(out: Path, orig: Path):
    """The original transformers model holding every tensor of ``out`` as llmpress decodes it
    (linears decoded, norms as AWQ left them)."""
    from llmpress.targets.source import ExportSource

    model = _hf(orig)
    with ExportSource(out) as src:
        sd = {n: src.get(n).tensor().float() for n in src.names()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)  # a tied head
    return model


def _loads_as_dense(out: Path, orig: Path) -> torch.Tensor:
    """llmpress.load(out)'s logits equal those of the dense model holding the decoded weights."""
    got = _logits(llmpress.load(out))
    want = _logits(_dequantized_dense(out, orig))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    return got


@pytest.mark.parametrize("method", list(METHODS))
def test_quantize_load_equals_dequantized_dense(fam, method, tmp_path):
    name, orig = fam
    out = tmp_path / method
    llmpress.quantize(orig, out, method=method, bits=8, group_size=16, **METHODS[method], **CALIB)
    model = llmpress.load(out)
    lin = _block_linears(orig)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(lin)
    got = _loads_as_dense(out, orig)
    assert _kl(got, _logits(_hf(orig))) < 2e-3  # 8 bits: next to the original, folds included
    if method == "awq":  # the family's folds applied: no stored input scale on its folded layers
        keys = _stored_keys(out)
        want = {f"{n}.in_scale" for n, rel in lin.items() if rel in FAMILIES[name].awq_folded}
        assert len(want) == 2 * len(FAMILIES[name].awq_folded)
        assert not want & keys, sorted(want & keys)


def test_the_walk_reproduces_every_block_output(fam):
    """The sequential runner's walk (block 0's input, then each block with what the model passes
    it: Gemma's sliding and global masks and rotary tables, GPT-2's positional mask) gives every
    block's output as the model's own forward does."""
    from llmpress import skeleton as sk
    from llmpress.models import TensorStore, resolve
    from llmpress.pipeline import _block_out, _start_walk

    _, orig = fam
    model = _hf(orig)
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
             for b in sk.blocks_of(model)[1]]
    _logits(model, IDS[:1])
    for hd in hooks:
        hd.remove()
    src = resolve(orig)
    store = TensorStore(src)
    skel = sk.build_meta(sk.folder_config(src.folder))
    walk = _start_walk(skel, store, IDS[:1], 1, torch.device("cpu"))
    hs = walk.hs
    for i, block in enumerate(walk.blocks):
        sk.fill(block, f"{walk.prefix}{i}.", store.get, dtype=torch.float32)
        with torch.inference_mode():
            hs = [_block_out(block, h, c) for h, c in zip(hs, walk.calls[i])]
        assert torch.allclose(hs[0], seen[i], rtol=1e-4, atol=1e-4), (i, (hs[0] - seen[i]).abs().max())


def test_every_fold_pattern_keeps_the_model_function(fam):
    """Each of the family's fold patterns, applied with random scales in every block (Gemma's
    1 + γ, Phi-3's fused rows, GPT-2's Conv1D, GQA-tied v → o), leaves the logits unchanged."""
    from llmpress.quant.fold import _gqa_expand, _producer_rows, apply_fold, patterns_for
    from llmpress.skeleton import blocks_of, linear_weight

    _, orig = fam
    model = _hf(orig)
    ref = _logits(model)
    pats = patterns_for(model.config)
    assert pats and all(p.producer for p in pats)
    g = torch.Generator().manual_seed(0)
    for block in blocks_of(model)[1]:
        mods = dict(block.named_modules())
        for pat in pats:
            width = linear_weight(mods[pat.consumers[0]]).shape[1]
            expand = None
            if pat.kind == "attn_v":
                rows = _producer_rows(pat, linear_weight(mods[pat.producer]).shape[0], width)
                v_out = rows.stop - rows.start
                expand = _gqa_expand(mods[pat.producer.rsplit(".", 1)[0]], v_out, width)
                s = (torch.rand(v_out, generator=g) * 3 + 0.3)[expand]  # tied across the heads reading a channel
            else:
                s = torch.rand(width, generator=g) * 3 + 0.3
            apply_fold(mods, "", pat, s, expand)
    got = _logits(model)
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3), (got - ref).abs().max()


def test_streamed_reference_equals_the_loaded_model(fam):
    """The reference walked block by block (the original never whole in memory) holds the loaded
    model's log-probabilities bit for bit."""
    from llmpress.eval.causal import Reference
    from llmpress.eval.streamed import StreamedOriginal, streamable
    from llmpress.models import load_tokenizer

    _, orig = fam
    assert streamable(orig)
    tok = load_tokenizer(orig)
    kw = dict(ctx=32, tokens=192, batch_size=2, cache=False)
    a = Reference.build(lambda: llmpress.load(orig), tok, ["python-doc"], **kw)
    b = Reference.build(lambda: StreamedOriginal(orig), tok, ["python-doc"], **kw)
    for key in ("topk_idx", "topk_lp", "log_rest", "tail_idx", "tail_lp", "target_lp"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.model_info == b.model_info


def test_factorize_whitened_loads(fam, tmp_path):
    _, orig = fam
    out = tmp_path / "lr"
    llmpress.factorize(orig, out, method="whiten", ratio=0.5, samples=8, seq_len=32, progress=False)
    got = _loads_as_dense(out, orig)
    assert torch.isfinite(got).all()
    assert 0 < _kl(got, _logits(_hf(orig))) < 5.0


def test_evaluate_and_finetune(fam, tmp_path):
    _, orig = fam
    q = tmp_path / "q"
    llmpress.quantize(orig, q, method="rtn", bits=4, group_size=16, progress=False)
    res = llmpress.evaluate(q, orig, text="python-doc", ctx=32, tokens=128, cache=False)
    for k in ("ppl", "ref_ppl", "kl_mean", "top1"):
        assert res[k] == res[k] and abs(res[k]) != float("inf"), (k, res[k])
    assert res["kl_mean"] > 0
    ft = tmp_path / "ft"
    held_out = tmp_path / "held-out.txt"  # a short evaluation text: the overlap check reads all of it
    held_out.write_text("Wombats dig burrows with their claws and sleep through the warm part of the day.\n" * 4)
    rep = llmpress.finetune(q, ft, reference=orig, steps=2, seq_len=32, batch_size=2, warmup=0, grad_ckpt=False,
                            checkpoint_every=100, eval_text=str(held_out), progress=False)
    assert rep["steps"] == 2, rep
    assert torch.isfinite(_logits(llmpress.load(ft))).all()


def test_export_where_the_format_holds_the_family(fam, tmp_path):
    from llmpress.targets.api import ExportRefused

    name, orig = fam
    fam_ = FAMILIES[name]
    q = tmp_path / "q8"
    llmpress.quantize(orig, q, method="rtn", grid="gguf:q8_0", progress=False)  # a grid both formats take
    n = len(_block_linears(orig))
    rep = llmpress.export(q, tmp_path / "dense", format="dense")  # every family: the decoded model
    assert rep["exact"] == n and rep["fallback"] == {}
    assert torch.allclose(_logits(_hf(tmp_path / "dense")), _logits(llmpress.load(q)), rtol=1e-4, atol=1e-4)
    if fam_.gguf:
        rep = llmpress.export(q, tmp_path / "m.gguf", format="gguf")
        assert rep["exact"] == n and (tmp_path / "m.gguf").stat().st_size > 0
    else:
        with pytest.raises(ValueError, match=f"unsupported architecture: {_hf_type(orig)}"):
            llmpress.export(q, tmp_path / "m.gguf", format="gguf")
        assert not (tmp_path / "m.gguf").exists()
    if fam_.ct:
        rep = llmpress.export(q, tmp_path / "ct", format="compressed-tensors")
        assert rep["exact"] == n
    else:
        with pytest.raises(ExportRefused, match="not an nn.Linear weight \\(Conv1D\\)"):
            llmpress.export(q, tmp_path / "ct", format="compressed-tensors")
        assert not (tmp_path / "ct").exists()


def _hf_type(folder: Path) -> str:
    import json

    return json.loads((folder / "config.json").read_text())["model_type"]


def test_encoder_decoder_is_unsupported_before_any_work(tiny_tokenizer_dir, tmp_path):
    """T5 has two stacks of blocks: calibrated methods refuse it by name, nothing is written."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    src = tmp_path / "t5"
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                        num_heads=4, decoder_start_token_id=0)).save_pretrained(src)
    tok.save_pretrained(src)
    with pytest.raises(ValueError, match="unsupported: t5 is an encoder-decoder"):
        llmpress.quantize(src, tmp_path / "q", method="gptq", bits=4, group_size=16, **CALIB)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="unsupported: t5 is an encoder-decoder"):
        llmpress.factorize(src, tmp_path / "f", method="whiten", ratio=0.5, **CALIB)
    assert not (tmp_path / "f").exists()
