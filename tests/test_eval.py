"""The judge is honest: identity gives exactly zero, known damage orders correctly, bad input fails clearly."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from llmpress.eval import Reference, cost_of, linear_bpw, make_windows
from llmpress.eval import evaluate

CTX, TOKENS = 32, 256  # 4 windows per default text: fast on the tiny model


def _round_linears(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """Symmetric per-row round-to-nearest of every linear weight (the known perturbation)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight
                s = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / (2 ** (bits - 1) - 1)
                mod.weight = torch.nn.Parameter((w / s).round() * s)  # unties a tied head: rounded separately
    return m


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from llmpress.models import load_model, load_tokenizer

    return load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)


def test_model_against_itself_is_exactly_zero(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("llmpress.eval.causal.cache_dir", lambda: tmp_path)
    r = evaluate(str(tiny_llama_dir), reference=str(tiny_llama_dir), ctx=CTX, tokens=TOKENS)
    assert r["kl_mean"] == 0.0 and r["kl_max"] == 0.0 and r["kl_p99"] == 0.0 and r["kl_median"] == 0.0
    assert r["top1"] == 1.0 and r["ln_ppl_ratio"] == 0.0 and r["ppl"] == r["ref_ppl"]
    assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    p = r["protocol"]
    assert p["ctx"] == CTX and p["windows"] == 8 and p["scored_tokens"] == 8 * (CTX - 1)
    assert [t["name"] for t in p["texts"]] == ["debian-handbook", "linux-doc"] and all(len(t["sha256"]) == 64 for t in p["texts"])
    assert set(r["texts"]) == {"debian-handbook", "linux-doc"}
    assert r["protocol_label"].startswith(f"debian-handbook+linux-doc 8×{CTX} #")
    assert evaluate(str(tiny_llama_dir), ctx=CTX, tokens=TOKENS)["protocol_label"] == r["protocol_label"]  # no reference: same protocol
    assert evaluate(str(tiny_llama_dir), ctx=CTX, tokens=2 * TOKENS)["protocol_label"] != r["protocol_label"]
    assert r["bpw"] == 32.0 and r["ratio"] == 1.0 and r["peak_rss_bytes"] > 0 and r["tokens_per_s"] > 0
    # the reference was cached; a second run reuses it and is still exact
    assert len(list((tmp_path / "reference").glob("*.safetensors"))) == 1
    r2 = evaluate(str(tiny_llama_dir), reference=str(tiny_llama_dir), ctx=CTX, tokens=TOKENS)
    assert r2["kl_max"] == 0.0 and r2["ppl"] == r["ppl"]


def test_rounding_to_fewer_bits_orders_correctly(tiny):
    model, tok = tiny
    ref = Reference.build(model, tok, ["python-doc"], ctx=CTX, tokens=TOKENS, cache=False)
    r8, r3 = (ref.compare(_round_linears(model, b)) for b in (8, 3))
    assert 0 < r8["kl_mean"] < r3["kl_mean"]
    assert r8["kl_p99"] <= r3["kl_p99"] and r8["top1"] >= r3["top1"] and r3["top1"] < 1.0
    assert abs(r8["ln_ppl_ratio"]) < abs(r3["ln_ppl_ratio"]) + 3 * r3["ln_ppl_ratio_se"]
    assert all(math.isfinite(v) for v in (r3["ln_ppl_ratio_se"], r3["kl_se"]))


def test_kl_estimate_matches_the_full_kl(tiny):
    # k = 16 of 49k tokens on a near-uniform random model: the sampled tail carries almost all of it
    model, tok = tiny
    ref = Reference.build(model, tok, ["fortunes"], ctx=CTX, tokens=4 * CTX, k=16, cache=False)
    bad = _round_linears(model, 2)
    ours = ref.compare(bad)
    with torch.inference_mode():
        p = torch.log_softmax(model(input_ids=ref.ids).logits[:, :-1].double(), -1)
        q = torch.log_softmax(bad(input_ids=ref.ids).logits[:, :-1].double(), -1)
    full = float((p.exp() * (p - q)).sum(-1).mean())
    assert full > 0 and abs(ours["kl_mean"] - full) < 0.05 * full  # measured: within 1.3 % at 8, 4 and 2 bits
    assert ours["kl_median"] >= 0 and ours["kl_p99"] <= ours["kl_max"]
    assert ours["top1"] == float((p.argmax(-1) == q.argmax(-1)).double().mean())


def test_in_memory_models_with_a_tokenizer(tiny):
    model, tok = tiny
    r = evaluate(_round_linears(model, 4), reference=model, text="python-doc", ctx=CTX, tokens=2 * CTX,
                 tokenizer=tok, ref_tokenizer=tok, cache=False)
    assert r["kl_mean"] > 0 and "texts" not in r and r["protocol"]["texts"][0]["name"] == "python-doc"
    import llmpress

    alone = llmpress.evaluate(model, text="python-doc", ctx=CTX, tokens=2 * CTX, tokenizer=tok)
    assert alone["ppl"] == pytest.approx(r["ref_ppl"], rel=1e-6) and "kl_mean" not in alone
    with pytest.raises(ValueError, match="pass its tokenizer"):
        evaluate(torch.nn.Linear(2, 2))


def test_a_text_without_paragraph_breaks_is_cut_at_lines_then_words(tiny, tmp_path):
    """A user's text written one paragraph per line, or as one long line, still gives the
    default windows; the protocol names the boundary used, and paragraph-cut texts keep their
    protocol as before (no boundary key)."""
    from llmpress.text import load_text

    _, tok = tiny
    prose = load_text("python-doc").split("\n\n")
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(prose[:400]) + "\n")
    one = tmp_path / "one.txt"
    one.write_text(" ".join(prose[:400]))
    for f, boundary in ((lines, "line"), (one, "word")):
        ids, _, proto = make_windows(tok, [str(f)], ctx=CTX, tokens=TOKENS, batch_size=2)
        assert ids.shape == (TOKENS // CTX, CTX) and proto.texts[0]["boundary"] == boundary
        assert len({tuple(r.tolist()) for r in ids}) == ids.shape[0]  # distinct windows
    _, _, proto = make_windows(tok, ["python-doc"], ctx=CTX, tokens=TOKENS, batch_size=2)
    assert "boundary" not in proto.texts[0]


def test_empty_and_short_text_fail_clearly(tiny, tmp_path):
    model, tok = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of text here.\n")
    for f in (empty, short):
        with pytest.raises(ValueError, match="too short"):
            evaluate(model, text=str(f), ctx=CTX, tokens=TOKENS, tokenizer=tok)
    with pytest.raises(ValueError, match="less than one window"):
        make_windows(tok, ["python-doc"], ctx=64, tokens=32, batch_size=1)
    with pytest.raises(FileNotFoundError, match="no text"):
        evaluate(model, text=str(tmp_path / "nope.txt"), tokenizer=tok)


def test_mismatched_reference_fails_clearly(tiny, minilm_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    model, tok = tiny
    kw = dict(text="python-doc", ctx=CTX, tokens=2 * CTX, cache=False)
    other_tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(model, reference=model, tokenizer=other_tok, ref_tokenizer=tok, **kw)
    with pytest.raises(ValueError, match="causal LM but the reference is an encoder"):
        evaluate(model, reference=str(minilm_dir), tokenizer=tok, **kw)
    torch.manual_seed(0)
    small_vocab = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2)).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        evaluate(model, reference=small_vocab, tokenizer=tok, ref_tokenizer=tok, **kw)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    with pytest.raises(ValueError, match="architecture"):
        evaluate(gpt2, reference=model, tokenizer=tok, ref_tokenizer=tok, **kw)


def test_non_finite_model_fails_clearly_never_nan(tiny):
    model, tok = tiny
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(broken, reference=model, text="python-doc", ctx=CTX, tokens=2 * CTX, tokenizer=tok, ref_tokenizer=tok, cache=False)


def test_cost_from_manifest_and_dtypes(tiny, tmp_path):
    model, _ = tiny
    assert linear_bpw(model) == 32.0 and linear_bpw(copy.deepcopy(model).half()) == 16.0
    (tmp_path / "llmpress.json").write_text(json.dumps({"bpw": 4.25, "bytes_out": 1234, "bytes_in": 5678}))
    assert cost_of(model, tmp_path) == {"bpw": 4.25, "bytes": 1234, "bytes_in": 5678}


def test_encoder_embedding_fidelity(minilm_dir):
    from llmpress.eval import embed, embedding_fidelity, sentences
    from llmpress.models import load_model, load_tokenizer

    enc, tok = load_model(minilm_dir), load_tokenizer(minilm_dir)
    same = evaluate(enc, reference=enc, text="python-doc", sentences=8, tokenizer=tok, ref_tokenizer=tok)
    assert same["kind"] == "encoder" and same["cos_min"] > 1 - 1e-9 and same["protocol"]["sentences"] == 8
    assert same["bpw"] == same["ref_bpw"] == 32.0
    sents, _ = sentences(["python-doc"], 16)
    ref, _ = embed(enc, tok, sents)
    r8, r3 = (embedding_fidelity(embed(_round_linears(enc, b), tok, sents)[0], ref) for b in (8, 3))
    assert 1 > r8["cos_mean"] > r3["cos_mean"] and r3["cos_min"] <= r3["cos_mean"] and r8["cos_min"] > r3["cos_min"]


def test_cli_json_and_errors(tiny_llama_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llmpress.cli import _load_commands, app

    monkeypatch.setattr("llmpress.eval.causal.cache_dir", lambda: tmp_path)
    _load_commands()
    run = CliRunner().invoke
    res = run(app, ["eval", str(tiny_llama_dir), "--reference", str(tiny_llama_dir), "--text", "python-doc",
                    "--ctx", "32", "--tokens", "64", "--threads", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("ppl", "ref_ppl", "kl_mean", "kl_median", "kl_p99", "kl_max", "top1", "bpw", "bytes_in", "bytes_out",
                "ratio", "seconds", "peak_rss_bytes", "protocol"):
        assert key in out, key
    assert out["kl_max"] == 0.0 and out["protocol"]["windows"] == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = run(app, ["eval", str(tiny_llama_dir), "--text", str(empty), "--ctx", "32", "--tokens", "64"])
    assert bad.exit_code == 2 and "too short" in bad.output and "Traceback" not in bad.output


# The real SmolLM2-135M on the default evaluation texts, 2 windows x 256 tokens per text.
# Pinned figure (this protocol, this extraction, measured here): ppl = SMOLLM_PPL within 1 %
# (debian-handbook 8.13, linux-doc 22.59 over these 2 x 256 tokens each).
SMOLLM_PPL = 13.55


@pytest.mark.slow
def test_smollm2_perplexity_is_pinned_and_3bit_hurts(smollm_dir):
    from llmpress.models import load_model, load_tokenizer

    model, tok = load_model(smollm_dir), load_tokenizer(smollm_dir)
    ref = Reference.build(model, tok, ["debian-handbook", "linux-doc"], ctx=256, tokens=1024, cache=False)
    assert ref.ppl == pytest.approx(SMOLLM_PPL, rel=0.01)
    bad = ref.compare(_round_linears(model, 3))
    assert bad["kl_mean"] > 0.1 and bad["top1"] < 0.9 and bad["ln_ppl_ratio"] > 3 * bad["ln_ppl_ratio_se"]


def test_chunked_logits_change_no_figure(tiny, monkeypatch):
    """The head's logits are made a chunk of rows at a time: any chunk size gives the same bits."""
    from llmpress.eval import causal

    model, tok = tiny
    bad = _round_linears(model, 4)
    vocab = model.config.vocab_size
    runs, orig = [], causal._logprob_batches
    for chunk_bytes in (1, 1 << 40):  # 256 rows (4 chunks per batch of 32 windows × 31) vs one chunk per batch
        monkeypatch.setattr(causal, "LOGITS_CHUNK_BYTES", chunk_bytes)
        seen: list[int] = []
        monkeypatch.setattr(causal, "_logprob_batches", lambda *a, **k: (seen.append(x[0]) or x for x in orig(*a, **k)))
        ref = Reference.build(model, tok, ["python-doc"], ctx=CTX, tokens=32 * CTX, cache=False)
        runs.append((ref, ref.compare(bad), causal.perplexity(bad, tok, ["python-doc"], ctx=CTX, tokens=32 * CTX), seen))
    (ra, ca, pa, sa), (rb, cb, pb, sb) = runs
    assert causal.chunk_rows(vocab) > 32 * (CTX - 1) and sa[:4] == [0, 256, 512, 768] and sb[:1] == [0] and len(sb) < len(sa)
    for name in ("topk_idx", "topk_lp", "log_rest", "tail_idx", "tail_lp", "target_lp"):
        assert torch.equal(getattr(ra, name), getattr(rb, name)), name
    for key in ("ppl", "ref_ppl", "kl_mean", "kl_median", "kl_p99", "kl_max", "top1", "ln_ppl_ratio", "ln_ppl_ratio_se"):
        assert ca[key] == cb[key], key
    assert pa["ppl"] == pb["ppl"] and ca["kl_mean"] > 0


def test_logits_after_the_head_are_not_skipped(tiny):
    """A model whose logits are more than its head's output (here: scaled after it) is scored
    on what it outputs: the chunked head is checked and left for the full logits."""
    from llmpress.eval.causal import perplexity

    model, tok = tiny
    m = copy.deepcopy(model)

    def double(_mod, _inp, out) -> None:
        out.logits.mul_(10)

    handle = m.register_forward_hook(double)
    try:
        ids, _, _ = make_windows(tok, ["python-doc"], CTX, 4 * CTX, 64)
        with torch.inference_mode():
            lp = torch.log_softmax(m(input_ids=ids).logits[:, :-1].float(), -1)
        want = math.exp(float(-lp.gather(-1, ids[:, 1:, None]).double().mean()))
        got = perplexity(m, tok, ["python-doc"], ctx=CTX, tokens=4 * CTX)["ppl"]
    finally:
        handle.remove()
    assert abs(got - want) < 1e-9 * want
    assert abs(perplexity(model, tok, ["python-doc"], ctx=CTX, tokens=4 * CTX)["ppl"] - want) > 1e-3 * want
