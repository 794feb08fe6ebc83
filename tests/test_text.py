"""Real text corpora: names, sources apart, determinism, cleanup, clear errors."""
from __future__ import annotations

import pytest

from llmpress import text as T


def test_defaults_are_registered_and_calibration_is_apart_from_evaluation():
    names = T.corpus_names()
    assert T.CALIB_DEFAULT in names
    assert len(T.EVAL_DEFAULTS) >= 2 and all(n in names for n in T.EVAL_DEFAULTS)
    eval_pkgs = {T.CORPORA[n].package for n in T.EVAL_DEFAULTS}
    calib_pkgs = {T.CORPORA[n].package for n in T.CALIB_SOURCES}
    assert not eval_pkgs & calib_pkgs


@pytest.mark.parametrize("name", T.EVAL_DEFAULTS + [T.CALIB_DEFAULT])
def test_corpus_is_real_english_prose(name):
    t = T.load_text(name)
    assert len(t) > 300_000
    paras = t.split("\n\n")
    words = t[:200_000].split()
    # prose, not markup: common English words are frequent, markup residue is rare
    assert sum(w.lower() in {"the", "of", "and", "to", "a", "is"} for w in words) / len(words) > 0.04
    assert t.count("<") / len(t) < 1e-3 and ":ref:`" not in t and ":func:`" not in t
    assert len(paras) > 1000


def test_extraction_is_deterministic_and_cached(tmp_path, monkeypatch):
    a = T.load_text("python-doc")
    T.load_text.cache_clear()
    monkeypatch.setenv("LLMPRESS_CACHE", str(tmp_path))
    b = T.load_text("python-doc")
    assert a == b and T.text_sha256(a) == T.text_sha256(b)
    assert len(list((tmp_path / "text").glob("python-doc-*.txt"))) == 1
    T.load_text.cache_clear()


def test_calib_mix_interleaves_its_sources():
    mix = T.load_text("calib-mix")[:60_000]
    for src in T.CALIB_SOURCES:
        first = T.load_text(src).split("\n\n")[0].strip()
        assert first[:80] in mix, src


def test_rest_cleanup():
    src = """.. _label:

Title here
==========

A :func:`print` call and ``code`` with `a link <http://x>`_ and *emph*
that wraps across lines.

.. note::

   Kept note body about something.

.. code-block:: python

   dropped = 1

Example::

    also_dropped()

- a list item with words
"""
    out = T.rest_to_text(src)
    assert "A print call and code with a link and emph that wraps across lines." in out
    assert "Kept note body about something." in out
    assert "dropped" not in out and "====" not in out and "label" not in out
    assert "a list item with words" in out


def test_html_cleanup():
    src = ('<html><head><title>T</title></head><body><div id="banner">Download the ebook now please</div>'
           '<div class="toc"><a>1. Contents of the book here</a></div><p>One real <b>paragraph</b> of prose here.</p>'
           '<pre>code listing that is dropped</pre></body></html>')
    assert T.html_to_text(src) == "One real paragraph of prose here.\n"


def test_file_path_and_errors(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("some words here\n", encoding="utf-8")
    assert T.load_text(str(f)) == "some words here\n"
    with pytest.raises(FileNotFoundError, match="not a corpus"):
        T.load_text(str(tmp_path / "missing.txt"))
    # a missing Debian package is named with its install command
    c = T.CORPORA["linux-doc"]
    monkeypatch.setitem(T.CORPORA, "linux-doc", T.Corpus(c.name, c.package, c.license, c.description, lambda: [], c.extract))
    T.load_text.cache_clear()
    with pytest.raises(FileNotFoundError, match="apt-get install linux-doc`.*elsewhere give a UTF-8 text file"):
        T.load_text("linux-doc")
    T.load_text.cache_clear()


def test_hf_spec_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises((ImportError, FileNotFoundError), match="datasets|could not load"):
        T.load_text("hf:surely-not-a-dataset-xyz:cfg:test")


def test_corpus_roots_take_any_release(tmp_path, monkeypatch):
    """A corpus folder is found whatever release's version its path holds; the newest wins, and no
    release path is written outside ROOTS."""
    for v in ("6.1", "6.12", "6.9"):
        (tmp_path / f"linux-doc-{v}" / "Documentation").mkdir(parents=True)
    monkeypatch.setitem(T.ROOTS, "linux-doc", (str(tmp_path / "linux-doc-*" / "Documentation"),))
    assert T.root("linux-doc") == tmp_path / "linux-doc-6.12" / "Documentation"
    monkeypatch.setitem(T.ROOTS, "linux-doc", (str(tmp_path / "nothing-*"),))
    assert not T.root("linux-doc").exists() and T.CORPORA["linux-doc"].files() == []
    import inspect

    src = inspect.getsource(T)
    table = src[src.index("ROOTS: dict"):src.index("def _version_key")]
    assert "linux-doc-*" in table and src.count("/usr/share/") == table.count("/usr/share/")


def test_a_local_dataset_in_wikitext_form(tmp_path, monkeypatch):
    """``hf:FOLDER`` reads a dataset folder the way the field reads WikiText-2 (rows of lines,
    headings and blank rows; the non-blank rows become paragraphs), with no network."""
    import json as _json

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a tactical role @-@ playing game . \n",
            " It was released in January 2011 in Japan . \n", ""]
    folder = tmp_path / "wikitext-local"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(_json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    T.load_text.cache_clear()
    text = T.load_text(f"hf:{folder}")
    T.load_text.cache_clear()
    assert text.split("\n\n")[0].strip() == "= Valkyria Chronicles III ="
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    assert len(paras) == 3 and paras[1].startswith("Senjō no Valkyria 3 is a tactical role @-@ playing game")
