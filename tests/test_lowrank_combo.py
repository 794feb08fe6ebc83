"""Low-rank with quantization: factor-then-quantize and quantize-then-correct (LQER)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmpress.tensor import CompressedTensor, Stats, get_codec


def _setup(m=96, n=64, t=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) / n**0.5
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -1.5, n)[None, :]
    x = torch.randn(t, n, generator=g) @ mix.T
    x[:, :4] *= 10
    st = Stats()
    st.add(x, gram=True)
    return w, x, st


def _out_err(w, w_hat, x):
    return float((((w - w_hat) @ x.T) ** 2).sum() / ((w @ x.T) ** 2).sum())


def _roundtrip_state(ct: CompressedTensor) -> CompressedTensor:
    tensors, meta = ct.to_state("p")
    return CompressedTensor.from_state("p", tensors, meta["p"])


def test_factor_then_quantize_module_and_error():
    w, x, st = _setup()
    codec = get_codec("whiten+q")
    ct = _roundtrip_state(codec.encode(w, st, rank=24, bits=8, group_size=32))
    w_hat = codec.decode(ct)
    plain = get_codec("whiten").decode(get_codec("whiten").encode(w, st, rank=24))
    # 8-bit factors cost almost nothing over float factors
    assert _out_err(w, w_hat, x) < 1.05 * _out_err(w, plain, x) + 1e-6
    b = torch.randn(96)
    y = codec.module(ct, b)(x[:7])
    assert torch.allclose(y, F.linear(x[:7], w_hat, b), atol=1e-4)
    assert ct.bpw() < 0.5 * 32 * 24 * (96 + 64) / (96 * 64)


def test_svd_q_refuses_a_quant_that_needs_calibration():
    w, _, _ = _setup()
    with pytest.raises(ValueError, match="whiten\\+q"):
        get_codec("svd+q").encode(w, None, rank=8, quant="gptq", bits=4)
    with pytest.raises(ValueError, match="quantization codec"):
        get_codec("svd+q").encode(w, None, rank=8, quant="svd")


def test_lqer_lowers_output_error_of_the_quantizer():
    w, x, st = _setup()
    q = get_codec("rtn")
    q_only = q.decode(q.encode(w, st, bits=3, group_size=32))
    codec = get_codec("lqer")
    ct = _roundtrip_state(codec.encode(w, st, quant="rtn", bits=3, group_size=32, rank=8))
    w_hat = codec.decode(ct)
    assert _out_err(w, w_hat, x) < 0.9 * _out_err(w, q_only, x)
    assert ct.data["U"].shape == (96, 8) and ct.data["U"].dtype == torch.float16
    y = codec.module(ct, None)(x[:5])
    assert torch.allclose(y, F.linear(x[:5], w_hat), atol=1e-3)


def test_lqer_bad_input():
    w, _, st = _setup()
    with pytest.raises(ValueError, match="Gram"):
        get_codec("lqer").encode(w, None, quant="rtn", bits=3)
    with pytest.raises(ValueError, match="rank 65"):
        get_codec("lqer").encode(w, st, quant="rtn", bits=3, rank=65)
