"""Faults while writing (issue 17): a run killed at any point leaves the old output or the complete
new one, a full disk gives one clear line and leaves nothing behind, readers and loads at once agree.

The kill points are real subprocesses on a tiny model (a one-block Llama with a 300-token byte-level
BPE tokenizer, built here): each command runs once uninterrupted (its time T), then is SIGKILLed as
soon as its first temporary appears (beside the output; limit: a point's working folder) and at
fractions of T, checked after each kill, and finally rerun to the end. ``limit`` runs through a
short script calling ``llmpress.limit`` with four points (the CLI's budgets are minutes long).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import llmpress

SRC = Path(llmpress.__file__).resolve().parents[1]
FRACTIONS = (0.7,)  # of the uninterrupted run's time: where the kills land in `make test` (besides the first temporary)
SLOW_FRACTIONS = (0.2, 0.35, 0.5, 0.6, 0.78, 0.85, 0.9, 0.95, 0.99)
# row fields that measure time or memory, not the point
TIMING = ("seconds", "cpu_seconds", "compress_seconds", "tokens_per_s", "peak_rss_bytes")
LIMIT_SCRIPT = """
import sys
from llmpress.sweep.driver import limit
from llmpress.sweep.points import quant
points = [quant("rtn", 8, 32), quant("rtn", 4, 32), quant("rtn", 3, 32), quant("rtn", 2, 32)]
limit(sys.argv[1], sys.argv[2], points=points, ctx=32, tokens=64, samples=2, seq_len=16, threads=1, mixed_bpw=None)
"""
FINETUNE = ("--steps", "60", "--seq-len", "16", "--batch-size", "2", "--holdout", "0", "--lr", "1e-3")  # a checkpoint at 50


# ------------------------------------------------------------------------------- the model


def _tiny_model(root: Path) -> Path:
    """A one-block Llama with random weights and a 300-token byte-level BPE tokenizer, as a checkpoint folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog; packing, quantizing and training " * 4],
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                special_tokens=["<|endoftext|>"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(root)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root, safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """The model, its 4-bit RTN folder (finetune's input), texts to train on and to keep apart from."""
    from llmpress.pipeline import compress
    from llmpress.recipe import Recipe

    root = tmp_path_factory.mktemp("kill-base")
    model = _tiny_model(root / "model")
    compress(model, Recipe.uniform("rtn", bits=4, group_size=32), root / "rtn4", progress=False)
    (root / "train.txt").write_text("\n\n".join(f"Paragraph {i}: the fox packs {i * 7} models and trains them again."
                                                for i in range(200)))
    (root / "eval.txt").write_text("An unrelated evaluation text about harbours, ships and tides.\n")
    return {"model": model, "rtn4": root / "rtn4", "train": root / "train.txt", "eval": root / "eval.txt"}


# ------------------------------------------------------------------------------- running


def _env(tmp: Path) -> dict[str, str]:
    """The subprocess's environment: this llmpress, offline, its own temporary folder (to see what it leaves)."""
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1", "LLMPRESS_FSYNC": "1"}


def _run(argv: list[str], env: dict[str, str], kill_after: float | None = None,
         kill_when: Callable[[], bool] | None = None,
         preexec: Callable[[], None] | None = None) -> tuple[int | None, str, float]:
    """(exit code, or None when it was killed; stderr; seconds) of ``argv``, SIGKILLed after
    ``kill_after`` s or as soon as ``kill_when()`` holds (polled every few milliseconds)."""
    t0 = time.perf_counter()
    with subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          preexec_fn=preexec) as p:
        err = bytearray()
        reader = threading.Thread(target=lambda: err.extend(p.stderr.read()))  # a full pipe must not stall it
        reader.start()
        killed = False
        while p.poll() is None:
            if (kill_after is not None and time.perf_counter() - t0 >= kill_after) or (kill_when is not None and kill_when()):
                p.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.002)
        p.wait()
        reader.join()
    return (None if killed else p.returncode), err.decode(errors="replace"), time.perf_counter() - t0


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "llmpress", *map(str, args)]


def _strays(out: Path) -> list[str]:
    """What a writer of ``out`` leaves beside it besides ``out`` itself (temporaries, a swapped-out old
    copy, a checkpoint and its temporaries)."""
    return sorted(p.name for p in out.parent.iterdir() if out.name in p.name and p.name != out.name)


def _scratch(tmp: Path) -> list[str]:
    """llmpress's working folders left in the subprocess's temporary folder."""
    return sorted(p.name for p in tmp.iterdir() if "llmpress" in p.name) if tmp.exists() else []


# ------------------------------------------------------------------------------- what an output may be


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _packed_state(out: Path) -> str:
    """A .llmp that verifies (every chunk, tensor and file checksum): its digest."""
    from llmpress.lossless.container import verify

    assert verify(out, threads=1)["ok"]
    return _digest(out)


def _folder_state(out: Path) -> str:
    """A lossy folder that loads (shards verified against the manifest's sha256): its shards' digests."""
    from llmpress.io.folder import read_manifest

    llmpress.load(out)
    files = read_manifest(out)["files"]
    assert {f: _digest(out / f) for f in files} == files
    return json.dumps(files, sort_keys=True)


def _rows(out: Path) -> dict[str, dict]:
    """results.jsonl's rows by key, timing fields left out."""
    from llmpress.sweep.driver import read_results

    return {r["key"]: {k: v for k, v in r.items() if k not in TIMING} for r in read_results(out / "results.jsonl")}


def _limit_state(out: Path) -> str:
    return json.dumps(_rows(out), sort_keys=True)


@dataclass
class Case:
    """One command under kill: its argv for ``out`` (``reference``: the uninterrupted run), how an
    output is judged (a value equal for equal outputs), and the old output a kill must not lose."""
    argv: Callable[[dict[str, Path], Path], list[str]]
    state: Callable[[Path], str]
    old: Callable[[dict[str, Path], Path], None] | None = None


def _old_pack(base: dict[str, Path], out: Path) -> None:
    from llmpress.lossless.container import pack

    pack(base["model"], out, policy="zstd", threads=1)


def _old_quantize(base: dict[str, Path], out: Path) -> None:
    from llmpress.pipeline import compress
    from llmpress.recipe import Recipe

    compress(base["model"], Recipe.uniform("rtn", bits=8, group_size=32), out, progress=False)


CASES: dict[str, Case] = {
    "pack": Case(lambda b, out: _cli("pack", b["model"], "-o", out, "--threads", "1", "--force"), _packed_state, _old_pack),
    "quantize": Case(lambda b, out: _cli("quantize", b["model"], "-o", out, "--method", "rtn", "--bits", "4",
                                         "--group-size", "32", "--force"), _folder_state, _old_quantize),
    "finetune": Case(lambda b, out: _cli("finetune", b["rtn4"], "-o", out, "-r", b["model"], "--text", b["train"],
                                         "--eval-text", b["eval"], *FINETUNE, "--force"), _folder_state),
    "limit": Case(lambda b, out: [sys.executable, str(b["limit_script"]), str(b["model"]), str(out)], _limit_state),
}


def _kill_loop(name: str, base: dict[str, Path], tmp_path: Path, fractions: tuple[float, ...]) -> None:
    case = CASES[name]
    base = {**base, "limit_script": tmp_path / "limit_run.py"}
    base["limit_script"].write_text(LIMIT_SCRIPT)
    env = _env(tmp_path / "tmp")
    ref = tmp_path / f"ref-{name}" if name != "pack" else tmp_path / "ref.llmp"
    out = tmp_path / f"out-{name}" if name != "pack" else tmp_path / "out.llmp"
    rc, err, seconds = _run(case.argv(base, ref), env)
    assert rc == 0, err
    new = case.state(ref)
    allowed = {new}
    if case.old is not None:
        case.old(base, out)
        allowed.add(case.state(out))
    for f in (None, *fractions):  # None: as soon as a temporary appears (beside the output; limit: a working folder)
        if f is None:
            seen = set(_scratch(tmp_path / "tmp") if name == "limit" else _strays(out))
            appeared = (lambda: bool(set(_scratch(tmp_path / "tmp")) - seen)) if name == "limit" else \
                (lambda: bool(set(_strays(out)) - seen))
            rc, err, _ = _run(case.argv(base, out), env, kill_when=appeared, kill_after=2 * seconds + 30)
        else:
            rc, err, _ = _run(case.argv(base, out), env, kill_after=f * seconds)
        assert rc in (None, 0), err  # killed, or it finished first
        at = "at its first temporary" if f is None else f"at {f}·T"
        if name == "limit":  # the rows so far: each one the uninterrupted run's
            rows, want = _rows(out) if out.exists() else {}, _rows(ref)
            assert all(want.get(k) == r for k, r in rows.items()), f"killed {at}: a row differs"
        elif out.exists():
            assert case.state(out) in allowed, f"killed {at}: {out} is neither the old output nor the new"
        else:
            assert case.old is None, f"killed {at}: the old output was lost"
    rc, err, _ = _run(case.argv(base, out), env)  # the rerun after the kills: resumes or starts afresh, and ends
    assert rc == 0, err
    assert case.state(out) == new
    assert _strays(out) == [], "temporaries left beside the output"
    assert _scratch(tmp_path / "tmp") == [], "working folders left in the temporary folder"
    if name == "limit":
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_killed_run_leaves_the_old_output_or_the_new_one(name, base, tmp_path):
    _kill_loop(name, base, tmp_path, FRACTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_more_kill_points(name, base, tmp_path):
    _kill_loop(name, base, tmp_path, SLOW_FRACTIONS)


# ------------------------------------------------------------------------------- a full disk


def _file_size_limit(n: int) -> Callable[[], None]:
    """In the child: files cannot grow past ``n`` bytes, and a write past it fails (EFBIG) instead of
    the process being stopped by SIGXFSZ."""
    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return set_limit


FULL_DISK = {
    "pack": (lambda b, out: _cli("pack", b["model"], "-o", out, "--threads", "1", "--force"), "out.llmp"),
    "quantize": (lambda b, out: _cli("quantize", b["model"], "-o", out, "--method", "rtn", "--bits", "4",
                                     "--group-size", "32", "--force"), "out"),
    "export": (lambda b, out: _cli("export", b["rtn4"], "-o", out, "--format", "dense", "--force"), "out"),
}


@pytest.mark.parametrize("name", sorted(FULL_DISK))
def test_a_full_disk_is_one_clear_error_and_leaves_nothing(name, base, tmp_path):
    argv, out_name = FULL_DISK[name]
    out = tmp_path / out_name
    if out_name.endswith(".llmp"):
        out.write_bytes(b"the old output")
    else:
        out.mkdir()
        (out / "old.txt").write_text("the old output")
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in ([out] if out.is_file() else out.rglob("*"))}
    rc, err, _ = _run(argv(base, out), _env(tmp_path / "tmp"), preexec=_file_size_limit(64 << 10))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1, err
    assert "Traceback" not in err and len([ln for ln in lines if ln.startswith("error:")]) == 1, err
    assert str(out) in " ".join(lines) and "File too large" in err, err
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in ([out] if out.is_file() else out.rglob("*"))}
    assert after == before, "the old output changed"
    assert _strays(out) == [] and _scratch(tmp_path / "tmp") == []


def test_a_full_disk_in_process_is_a_resource_limit(tmp_path):
    """The library's own error: ResourceLimitError naming the output, the temporary removed."""
    from llmpress.errors import ResourceLimitError
    from llmpress.io.atomic import atomic_dir, atomic_file

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
        with pytest.raises(ResourceLimitError, match="out.bin"):
            with atomic_file(tmp_path / "out.bin") as tmp, open(tmp, "wb") as f:
                f.write(b"x" * (1 << 17))
        with pytest.raises(ResourceLimitError, match="outdir"):
            with atomic_dir(tmp_path / "outdir") as tmp:
                (tmp / "a").write_bytes(b"x" * (1 << 17))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_dead_writers_temporaries_are_swept_a_live_ones_kept(tmp_path):
    from llmpress.io.atomic import _HOST, atomic_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".out.{_HOST}-{dead.pid}.abc123.tmp").mkdir()  # a killed run's
    (tmp_path / f".out.{_HOST}-{os.getppid()}.abc123.tmp").write_text("")  # a live process's (ours' parent)
    (tmp_path / ".out.notes").write_text("")  # not a temporary
    with atomic_dir(tmp_path / "out") as d:
        (d / "x").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", f".out.{_HOST}-{os.getppid()}.abc123.tmp", ".out.notes"])


# ------------------------------------------------------------------------------- at once


def test_two_processes_reading_one_llmp_at_once_restore_the_same_bytes(base, tmp_path):
    from llmpress.lossless.container import pack

    packed = tmp_path / "m.llmp"
    pack(base["model"], packed, threads=1)
    env = _env(tmp_path / "tmp")
    procs = [subprocess.Popen(_cli("unpack", packed, "-o", tmp_path / f"r{i}", "--threads", "2"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
        p.stderr.close()
    for f in base["model"].iterdir():
        assert (tmp_path / "r0" / f.name).read_bytes() == (tmp_path / "r1" / f.name).read_bytes() == f.read_bytes()


def test_a_limit_resuming_from_anothers_results_gives_the_same_rows(base, tmp_path):
    """A second run given the first's results.jsonl (its first two rows) measures only the rest, and
    every row is the first run's (timing apart)."""
    from llmpress.sweep import runner
    from llmpress.sweep.driver import limit
    from llmpress.sweep.points import quant

    points = [quant("rtn", 8, 32), quant("rtn", 4, 32), quant("rtn", 2, 32)]
    kw = dict(ctx=32, tokens=64, samples=2, seq_len=16, threads=1, mixed_bpw=None)
    limit(str(base["model"]), tmp_path / "a", points=points, **kw)
    (tmp_path / "b").mkdir()
    lines = (tmp_path / "a" / "results.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b" / "results.jsonl").write_text("".join(lines[:2]))
    calls: list[str] = []
    real = runner.run_point
    try:
        runner.run_point = lambda p, s: calls.append(p.label) or real(p, s)
        limit(str(base["model"]), tmp_path / "b", points=points, **kw)
    finally:
        runner.run_point = real
    assert calls == ["rtn-w2-g32"]
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")


def test_eight_threads_loading_one_llmp_get_eight_identical_models(base, tmp_path):
    from llmpress.lossless.container import pack

    packed = tmp_path / "m.llmp"
    pack(base["model"], packed, threads=1, chunk_bytes=4 << 10)  # many chunks: the decoders' buffers go round
    want = llmpress.load(packed).state_dict()
    n = 8
    barrier = threading.Barrier(n)

    def one(_: int) -> dict[str, torch.Tensor]:
        barrier.wait()
        return llmpress.load(packed, threads=2).state_dict()

    with ThreadPoolExecutor(n) as ex:
        got = list(ex.map(one, range(n)))
    for sd in got:
        assert sd.keys() == want.keys()
        assert all(sd[k].dtype == want[k].dtype and torch.equal(sd[k], want[k]) for k in want)
    # no two models share a tensor's memory
    ptrs = [sd[k].data_ptr() for sd in got for k in sorted(sd) if sd[k].numel()]
    assert len(set(ptrs)) == len(ptrs)


def test_a_torn_reference_cache_is_measured_again(base, tmp_path, monkeypatch, caplog):
    """The judge's cached reference (written by whichever run got there first; a killed one may leave
    it torn on a file system without ordered writes) is measured again when it does not read back."""
    import logging

    from transformers import AutoTokenizer

    from llmpress.eval import causal

    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path / "cache"))
    model = llmpress.load(base["model"])
    tok = AutoTokenizer.from_pretrained(str(base["model"]))
    kw = dict(ctx=16, tokens=64, fingerprint="f" * 16)
    first = causal.Reference.build(model, tok, [str(base["train"])], **kw)
    (cached,) = (tmp_path / "cache" / "reference").iterdir()
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="llmpress.eval.causal"):
        again = causal.Reference.build(model, tok, [str(base["train"])], **kw)
    assert "unreadable" in caplog.text
    assert torch.equal(again.topk_lp, first.topk_lp) and torch.equal(again.target_lp, first.target_lp)
    assert [p.name for p in (tmp_path / "cache" / "reference").iterdir()] == [cached.name]


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
@pytest.mark.parametrize("old", ["folder", "file", "link"])
def test_a_folder_replaces_whatever_was_there(tmp_path, monkeypatch, old, swap):
    from llmpress.io import atomic
    from llmpress.io.atomic import atomic_dir

    if swap == "two renames":  # where the OS cannot exchange two paths
        monkeypatch.setattr(atomic, "_EXCHANGE", None)

    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("kept")
    if old == "folder":
        out.mkdir()
        (out / "old").write_text("old")
    elif old == "file":
        out.write_text("old")
    else:
        out.symlink_to(elsewhere)
    with atomic_dir(out, force=True) as d:
        (d / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]
    assert not out.is_symlink() and [p.name for p in out.iterdir()] == ["new"]
    assert (elsewhere / "keep").read_text() == "kept"  # a link's target is not touched
