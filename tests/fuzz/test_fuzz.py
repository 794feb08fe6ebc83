"""The CI-sized fuzz run of both readers (the long run: ``python bench/fuzz.py``).

Hypothesis draws every choice of the structure-aware mutators in ``harness.py`` (so a failure
shrinks to a small mutation and prints it); each input must be refused with an LlmpressError or
load to exactly what its files hold, within the time and memory bounds.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from harness import SLACK_BYTES, Fuzzer, backend_sweep, load_llmp_input  # noqa: E402

# the long run counts > 1 s of CPU as a hang; here (few cases, a busy CI machine) only a real hang fails
SECONDS = 5.0
CASES = {"folder": 500, "llmp": 1200}


class DrawRng:
    """The mutators' Rng, drawing from hypothesis."""

    def __init__(self, data: Any):
        self.data = data

    def randint(self, a: int, b: int) -> int:
        return self.data.draw(st.integers(a, b))

    def choice(self, seq: list[Any]) -> Any:
        return seq[self.data.draw(st.integers(0, len(seq) - 1))]

    def random(self) -> float:
        return self.data.draw(st.floats(0, 1, exclude_max=True))


@pytest.fixture(scope="module")
def fuzzer():
    logging.disable(logging.WARNING)  # every refused checkpoint and torn line would log
    fz = Fuzzer()
    yield fz
    fz.close()
    logging.disable(logging.NOTSET)


def _check(fz: Fuzzer, target: str, data: Any) -> None:
    o = getattr(fz, target)(DrawRng(data))
    assert o.kind in ("refused", "accepted"), f"{o.what}: {o.kind}\n{o.detail}"
    assert o.cpu < SECONDS, f"{o.what}: {o.cpu:.2f} s CPU"
    over = o.peak_bytes - fz.clean_peak[target]
    assert over <= 2 * o.size + SLACK_BYTES, f"{o.what}: peak {over} bytes above the clean input's, input {o.size} bytes"


def test_clean_peak_is_measured_warm(fuzzer):
    """The first decode in a process loads the compiled decoders (~60-100 MiB, seconds): counted
    in the clean peak, it would hide any input's allocation below it."""
    assert fuzzer.clean_peak["llmp"] < 8 << 20 and fuzzer.clean_peak["folder"] < 8 << 20, fuzzer.clean_peak


def test_every_backend_in_every_field(fuzzer):
    """Each field of a chunk given every backend id, intact and with a flipped byte: refused or
    exact, within the bounds (each decoder's entry point and error path)."""
    n = 0
    for raw in fuzzer.bases["packs"].values():
        for x, what in backend_sweep(raw):
            o = fuzzer.run("llmp", (lambda: load_llmp_input(x, fuzzer.work), len(x), what))
            assert o.kind in ("refused", "accepted"), f"{what}: {o.kind}\n{o.detail}"
            assert o.cpu < SECONDS and o.peak_bytes - fuzzer.clean_peak["llmp"] <= 2 * o.size + SLACK_BYTES, (what, o)
            n += 1
    assert n >= 3 * 2 * 8 * 2  # three packs, two tensors, eight ids, intact and flipped


_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=CASES["folder"], **_SETTINGS)
@given(data=st.data())
def test_fuzz_folder_reader(fuzzer, data):
    _check(fuzzer, "folder", data)


@settings(max_examples=CASES["llmp"], **_SETTINGS)
@given(data=st.data())
def test_fuzz_llmp_reader(fuzzer, data):
    _check(fuzzer, "llmp", data)
