"""The allocator's Fisher weights, block by block (sweep/fisher.py), against one backward pass
through the whole model (the computation the allocator used before, kept here as the reference)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from llmpress import skeleton as sk
from llmpress.errors import UnsupportedModelError
from llmpress.models import load_model
from llmpress.sweep import fisher as F

sys.path.insert(0, str(Path(__file__).parent))
from families import VOCAB, build  # noqa: E402


def whole_model_fisher(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4, keep: str = r"lm_head",
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """The reference: one forward and backward through the whole loaded model per batch, its
    full-vocabulary logits at once, labels sampled from them, g² summed at every linear's output."""
    rx = re.compile(keep)
    lin = {n: m for n, m in model.named_modules() if sk.is_linear(m) and not rx.search(n)}
    acc = {n: torch.zeros(sk.linear_weight(m).shape[0], dtype=torch.float64) for n, m in lin.items()}
    for p in model.parameters():
        p.requires_grad_(False)

    def grab(name: str):
        def on_grad(g: torch.Tensor) -> None:
            acc[name].add_(g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0))

        def fwd(_m, _a, out):
            if out.requires_grad:
                out.register_hook(on_grad)
        return fwd

    hs = [m.register_forward_hook(grab(n)) for n, m in lin.items()]
    hs.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_()))
    gen = torch.Generator().manual_seed(seed)
    try:
        for i in range(0, ids.shape[0], batch_size):
            logp = torch.log_softmax(model(input_ids=ids[i : i + batch_size], use_cache=False).logits.float(), -1)
            y = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=gen)
            logp.reshape(-1, logp.shape[-1]).gather(1, y).sum().backward()
    finally:
        for h in hs:
            h.remove()
    return {n: a / ids.numel() for n, a in acc.items()}


@pytest.fixture(scope="module")
def models(family_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """Llama (untied head's absence: tied), GPT-2 (Conv1D, LayerNorm, learned positions) and Gemma 2
    (logit soft-capping after the head, sliding-window layers, a scaled embedding)."""
    import json

    root = tmp_path_factory.mktemp("fisher")
    out = {name: build(name, root / name, family_tokenizer_dir) for name in ("llama3", "gpt2", "gemma2")}
    cfg = out["gemma2"] / "config.json"  # a cap the random model's logits reach: the soft-capping matters
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "final_logit_softcapping": 0.5}))
    return out


IDS = torch.randint(0, VOCAB, (6, 48), generator=torch.Generator().manual_seed(5))  # two batches, the last short


@pytest.mark.parametrize("name", ["llama3", "gpt2", "gemma2"])
def test_block_by_block_equals_the_whole_model(models, name, monkeypatch):
    # the head's logits in chunks of 100 rows: chunks cross window and batch boundaries' positions
    monkeypatch.setattr(F, "LOGITS_CHUNK_BYTES", 4 * VOCAB * 100)
    loaded: list[int] = []
    fill = sk.fill

    def one_block_at_a_time(module, prefix, get, dtype=None):
        _, blocks = sk.blocks_of(skel_of[0])
        others = [b for b in blocks if b is not module]
        assert all(p.is_meta for b in others for p in b.parameters()), "another block is still loaded"
        loaded.append(1)
        return fill(module, prefix, get, dtype)

    skel_of: list[torch.nn.Module] = []
    build_meta = sk.build_meta
    monkeypatch.setattr(sk, "build_meta", lambda *a, **k: skel_of.append(build_meta(*a, **k)) or skel_of[-1])
    monkeypatch.setattr(sk, "fill", one_block_at_a_time)
    got = F.fisher_weights(models[name], IDS, batch_size=4)
    monkeypatch.undo()
    n_blocks = len(sk.blocks_of(skel_of[0])[1])
    assert len(loaded) == 2 * n_blocks  # each block loaded once forward, once backward
    ref = whole_model_fisher(load_model(str(models[name])).eval(), IDS, batch_size=4)
    assert sorted(got) == sorted(ref) and len(ref) >= 4 * n_blocks
    for n in ref:
        assert got[n].dtype == torch.float64 and got[n].shape == ref[n].shape
        assert float(ref[n].min()) > 0
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=0)


def test_a_head_output_the_pass_does_not_know_is_refused(models, monkeypatch):
    """Gemma 2 soft-caps its logits; without that entry the chunked head's logits are not the model's."""
    monkeypatch.setattr(F, "POST_HEAD", {k: v for k, v in F.POST_HEAD.items() if k != "final_logit_softcapping"})
    with pytest.raises(UnsupportedModelError, match="logits are not its output head's"):
        F.fisher_weights(models["gemma2"], IDS[:2], batch_size=2)
