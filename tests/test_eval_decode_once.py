"""The sweep's judge decodes quantized layers once: the same figures as decoding at every forward."""
from __future__ import annotations

import pytest
import torch

from llmpress.eval import evaluate
from llmpress.pipeline import compress
from llmpress.quant import kernels
from llmpress.quant.linear import Decoded, QuantLinear, decode_once
from llmpress.recipe import Recipe

KEYS = ("ppl", "ref_ppl", "kl_mean", "kl_median", "kl_p99", "kl_max", "top1", "ln_ppl_ratio")


@pytest.mark.parametrize("bits", [4, 3, 8])  # the int4 kernel's layout, no kernel, the int8 kernel's
def test_decoded_once_gives_the_same_figures(tiny_llama_dir, tmp_path, bits):
    out = tmp_path / "q"
    compress(str(tiny_llama_dir), Recipe.uniform("rtn", bits=bits, group_size=32), out, progress=False)
    kw = dict(reference=str(tiny_llama_dir), ctx=64, tokens=256, cache=False)
    a = evaluate(str(out), **kw)
    b = evaluate(str(out), decode_once=True, **kw)
    assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}
    assert a["kl_mean"] > 0


def test_decode_once_replaces_every_quantized_linear_without_packing(tiny_llama_dir, tmp_path):
    from llmpress.loading import load

    out = tmp_path / "q"
    compress(str(tiny_llama_dir), Recipe.uniform("rtn", bits=4, group_size=32), out, progress=False)
    with kernels.unpacked():
        m = load(out)
        layers = [x for x in m.modules() if isinstance(x, QuantLinear)]
        assert layers and all(x.prepare() == "dequant" for x in layers)  # nothing packed for a kernel
    x = torch.randn(3, layers[0].in_features)
    want = layers[0](x)
    n = decode_once(m)
    assert n == len(layers) and not any(isinstance(x, QuantLinear) for x in m.modules())
    first = next(x for x in m.modules() if isinstance(x, Decoded))
    assert torch.equal(first(x), want)
    assert kernels.choose(layers[0])[0] is not None  # outside the context the kernels are chosen again


def test_an_identical_models_figures_without_a_forward_are_evaluates(tiny_llama_dir, tmp_path):
    """A verified lossless restore is judged from the reference alone: the same figures as running it."""
    from llmpress.eval.api import evaluate_identical
    from llmpress.lossless.container import pack

    pack(str(tiny_llama_dir), tmp_path / "m.llmp")
    kw = dict(ctx=64, tokens=256)
    from llmpress.models import load_tokenizer

    a = evaluate(str(tmp_path / "m.llmp"), reference=str(tiny_llama_dir), tokenizer=load_tokenizer(tiny_llama_dir), **kw)
    b = evaluate_identical(str(tiny_llama_dir), **kw)
    assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS} and b["kl_max"] == 0.0 and b["top1"] == 1.0
    assert a["protocol"] == b["protocol"] and a["texts"] == {t: {**v} for t, v in b["texts"].items()}
