"""Every codec states the tensors its meta implies (stored.py), and a meta that lies is refused."""
from __future__ import annotations

import copy

import pytest
import torch

from llmpress.errors import InputError
from llmpress.stored import check_ct
from llmpress.tensor import CompressedTensor, Stats, get_codec

CONFIGS = [
    ("rtn", dict(bits=4, group_size=32)),
    ("rtn", dict(bits=3, group_size=48)),  # ragged last group
    ("rtn", dict(bits=2, group_size=-1, sym=True)),
    ("rtn", dict(bits=8, group_size=0)),
    ("rtn", dict(bits=5, group_size=64, grid="asymz", scale_dtype="bfloat16")),
    ("rtn", dict(bits=4, group_size=64, grid="nf")),
    ("rtn", dict(bits=6, group_size=32, grid="seed")),
    ("rtn", dict(grid="gguf:q4_0")),
    ("rtn", dict(grid="gguf:q4_k")),
    ("rtn", dict(grid="gguf:q3_k")),
    ("gptq", dict(bits=4, group_size=32, act_order=True, static_groups=False)),  # stores g_idx
    ("awq", dict(bits=4, group_size=32)),
    ("hqq", dict(bits=3, group_size=64)),
    ("svd", dict(rank=8)),
    ("svd", dict(rank=60)),  # saves nothing: stored dense
    ("svd+q", dict(rank=8, bits=4, group_size=32)),
    ("lqer", dict(rank=4, bits=3, group_size=32)),
]


@pytest.fixture(scope="module")
def weight_and_stats():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(72, 256, generator=g) * 0.05  # (out, in): in a multiple of 256 for the K-quants
    st = Stats()
    st.add(torch.randn(512, 256, generator=g))
    return w, st


@pytest.fixture(scope="module")
def encoded(weight_and_stats):
    w, st = weight_and_stats
    return {f"{c}-{i}": get_codec(c).encode(w, st, **p) for i, (c, p) in enumerate(CONFIGS)}


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_the_stated_layout_is_what_the_codec_stores(encoded, i):
    ct = encoded[f"{CONFIGS[i][0]}-{i}"]
    check_ct(ct)  # passes on every real encode
    meta_ct = CompressedTensor(ct.codec, {k: torch.empty_like(v, device="meta") for k, v in ct.data.items()}, ct.meta)
    check_ct(meta_ct)  # and from shapes alone (a safetensors header)


def _lies(meta: dict) -> list[tuple[str, dict]]:
    """Edits of one meta that the stored tensors contradict."""
    out = []
    m, n = meta["shape"]
    for shape in ([m, n * 2], [n, m], [1 << 20, 1 << 20], [m], [m, -n], [m, "n"], None):
        if shape == [n, m] and meta.get("group_size") == 0:
            continue  # one scale for all: the same bytes; the loader checks the shape against the model
        out.append((f"shape={shape}", {**meta, "shape": shape}))
    if "bits" in meta:
        for b in (2, 3, 8, 7, "4", True, None):
            if b != meta["bits"]:
                out.append((f"bits={b}", {**meta, "bits": b}))
        per_row = meta["group_size"] < 0 or meta["group_size"] >= n  # 1 << 20 says the same
        for gs in (16, 1 << 20, -2, 1.5):
            if gs != meta["group_size"] and not (per_row and gs == 1 << 20):
                out.append((f"group_size={gs}", {**meta, "group_size": gs}))
        out.append(("grid", {**meta, "grid": "nope"}))
        out.append(("version", {**meta, "version": 99}))
    if "rank" in meta and not meta.get("dense"):
        out.append(("rank+1", {**meta, "rank": meta["rank"] + 1}))
        out.append(("rank=0", {**meta, "rank": 0}))
    for key in ("U", "V", "q", "W"):
        if isinstance(meta.get(key), dict):
            out.append((f"{key}.codec", {**meta, key: {**meta[key], "codec": "nope"}}))
            out.append((f"{key}.shape", {**meta, key: {**meta[key], "shape": [1 << 20, 1 << 20]}}))
            out.append((f"{key}=list", {**meta, key: []}))
    return out


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_a_lying_meta_is_refused(encoded, i):
    ct = encoded[f"{CONFIGS[i][0]}-{i}"]
    for what, meta in _lies(copy.deepcopy(ct.meta)):
        with pytest.raises(InputError):
            check_ct(CompressedTensor(ct.codec, ct.data, meta))
            pytest.fail(f"{ct.codec} {ct.meta} accepted the lie {what}")


def test_unexpected_missing_and_mistyped_tensors_are_refused(encoded):
    ct = encoded["rtn-0"]
    with pytest.raises(InputError, match="unexpected"):
        check_ct(CompressedTensor(ct.codec, {**ct.data, "extra": torch.zeros(1)}, ct.meta))
    with pytest.raises(InputError, match="missing"):
        check_ct(CompressedTensor(ct.codec, {k: v for k, v in ct.data.items() if k != "scale"}, ct.meta))
    with pytest.raises(InputError, match="qweight"):
        check_ct(CompressedTensor(ct.codec, {**ct.data, "qweight": ct.data["qweight"].float()}, ct.meta))
    with pytest.raises(InputError, match="g_idx"):
        g = encoded["gptq-10"]
        bad = g.data["g_idx"].clone()
        bad[3] = 1000
        check_ct(CompressedTensor(g.codec, {**g.data, "g_idx": bad}, g.meta))


def test_quantlinear_and_decode_refuse_a_lying_shape_before_allocating(encoded):
    """4 TB stated, a few KB stored: refused by the check, not by the allocator."""
    from llmpress.quant.linear import QuantLinear

    ct = encoded["rtn-0"]
    lie = CompressedTensor(ct.codec, ct.data, {**ct.meta, "shape": [1 << 20, 1 << 20]})
    with pytest.raises(InputError, match="shape"):
        QuantLinear.from_ct(lie)
    with pytest.raises(InputError, match="shape"):
        get_codec(ct.codec).decode(lie)
    d = encoded["svd-14"]
    assert d.meta.get("dense")
    lie = CompressedTensor(d.codec, d.data, {**d.meta, "shape": [1 << 20, 1 << 20]})
    with pytest.raises(InputError, match="shape"):
        get_codec(d.codec).module(lie, None)
