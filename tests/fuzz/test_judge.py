"""How the fuzz harness judges an input (harness.Fuzzer.run, Tally.add), without building bases:
a hang is CPU time, not the wall time a busy machine stretches; a one-time cost of the process
(a compiled function's first call, a first import) is not the input's, a cost the input drives
recurs; a reader whose answer depends on what ran before is a crash."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
from harness import Fuzzer, Tally  # noqa: E402

from llmpress.errors import CorruptFileError  # noqa: E402

BIG = 48 << 20  # well over 2× a 1 KB input + harness.SLACK_BYTES


@pytest.fixture
def fz(monkeypatch):
    monkeypatch.setattr(harness, "HANG_SECONDS", 0.2)
    f = Fuzzer.__new__(Fuzzer)  # the judge alone: no bases
    f.clean_peak = {"llmp": 0}
    return f


def _touch(n: int) -> bytes:
    return b"\x01" * n  # written, so resident


def _burn(seconds: float) -> None:
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass


def _judge(fz: Fuzzer, fn) -> tuple[harness.Outcome, Tally]:
    o = fz.run("llmp", (fn, 1000, "test"))
    t = Tally()
    t.add(o, fz.clean_peak["llmp"])
    return o, t


def test_a_one_time_allocation_is_not_the_inputs(fz):
    seen = []

    def fn():
        if not seen:  # e.g. a decoder's code loaded on its first call
            seen.append(_touch(BIG))
        return None

    o, t = _judge(fz, fn)
    assert o.kind == "accepted" and o.first and t.over_2x == 0 and not t.failures and t.rerun == 1


def test_an_allocation_the_input_drives_counts(fz):
    o, t = _judge(fz, lambda: len(_touch(BIG)) and None)
    assert o.first and t.over_2x == 1 and t.failures == [o]


def test_a_hang_is_cpu_time_not_wall_time(fz):
    o, t = _judge(fz, lambda: time.sleep(0.4))  # the machine's other processes' turns
    assert o.seconds > 0.4 and t.hangs == 0 and not o.first and not t.failures
    o, t = _judge(fz, lambda: _burn(0.3))
    assert o.cpu > 0.2 and t.hangs == 1 and t.failures == [o]


def test_a_slow_first_call_is_not_a_hang(fz):
    seen = []

    def fn():
        if not seen:
            seen.append(_burn(0.3))  # e.g. compiling a decoder
        return None

    o, t = _judge(fz, fn)
    assert o.first and t.hangs == 0 and not t.failures


def test_an_answer_that_changes_between_runs_is_a_crash(fz):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            _touch(BIG)  # over the bound, so it runs again
            raise CorruptFileError("x: refused once")
        return None

    o, t = _judge(fz, fn)
    assert o.kind == "crash" and t.counts["crash"] == 1 and "refused then accepted" in o.detail


def test_a_tally_survives_its_json():
    fz = Fuzzer.__new__(Fuzzer)
    fz.clean_peak = {"llmp": 0}
    o, t = _judge(fz, lambda: len(_touch(BIG)) and None)
    o.index = 17
    back = Tally.from_json(t.to_json())
    assert back == t and back.failures[0].index == 17


def test_an_endless_input_is_stopped_and_counted(fz, monkeypatch):
    monkeypatch.setattr(harness, "INTERRUPT_SECONDS", 0.5)

    def spin():
        while True:
            try:
                _burn(0.05)
            except Exception:  # a reader's broad handler must not swallow the interruption
                pass

    o, t = _judge(fz, spin)
    assert o.kind == "crash" and "still running" in o.detail and t.hangs == 1 and t.failures == [o]
