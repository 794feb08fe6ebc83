"""Real English text for calibration and evaluation, extracted from packages on this machine.

Each corpus is a name in a registry: the Debian package that ships it, its license, and an
extractor that turns the package's files (HTML, reStructuredText, fortune files, WordNet
glosses) into plain paragraphs separated by blank lines. Extraction is deterministic (a fixed
file order, stdlib-only cleanup) and cached under ``cache_dir()/text/`` keyed by a hash of
the source files' content and of the extractor version.

Calibration and evaluation come from different sources: the default calibration text mixes
the Python tutorials, fortunes and WordNet glosses; evaluation uses the Debian Administrator's
Handbook (prose about a system) and the Linux kernel's process/admin documentation.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import html.parser
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import InputError, MissingInputError, ResourceLimitError
from .models import cache_dir

log = logging.getLogger(__name__)

EXTRACTOR_VERSION = 1
CALIB_DEFAULT = "calib-mix"
EVAL_DEFAULTS = ["debian-handbook", "linux-doc"]


@dataclass(frozen=True)
class Corpus:
    name: str
    package: str  # Debian package that ships the files
    license: str
    description: str
    files: Callable[[], list[Path]]  # the source files, in a fixed order
    extract: Callable[[list[Path]], str]  # files -> paragraphs separated by blank lines


CORPORA: dict[str, Corpus] = {}


def corpus(name: str, package: str, license: str, description: str, files: Callable[[], list[Path]]):
    """Register an extractor ``fn(files) -> text`` under ``name``."""

    def deco(fn: Callable[[list[Path]], str]) -> Callable[[list[Path]], str]:
        CORPORA[name] = Corpus(name, package, license, description, files, fn)
        return fn

    return deco


def corpus_names() -> list[str]:
    return list(CORPORA) + ["calib-mix"]


# ---------------------------------------------------------------- shared cleanup helpers


def _read(p: Path) -> str:
    raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _paragraphs(blocks: list[str], min_words: int = 4) -> str:
    """Reflow each block to one line; keep blocks with at least ``min_words`` words."""
    out = []
    for b in blocks:
        b = re.sub(r"\s+", " ", b).strip()
        if len(b.split()) >= min_words:
            out.append(b)
    return "\n\n".join(out) + "\n"


class _HTMLText(html.parser.HTMLParser):
    """HTML → blocks of text; skips navigation, tables of contents, scripts and code listings."""

    BLOCK = {"p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br", "table", "blockquote"}
    SKIP_TAGS = {"script", "style", "pre", "head", "title"}
    SKIP_CLASSES = {"toc", "docnav", "list-of-tables", "list-of-figures", "list-of-examples", "index"}
    SKIP_IDS = {"banner", "title", "site_footer"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.cur: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, skipping)

    def _skipping(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def _flush(self) -> None:
        if self.cur:
            self.blocks.append("".join(self.cur))
            self.cur = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip = self._skipping() or tag in self.SKIP_TAGS or bool(classes & self.SKIP_CLASSES) or a.get("id") in self.SKIP_IDS
        if tag in self.BLOCK:
            self._flush()
        if tag not in ("br", "img", "meta", "link", "hr", "input"):  # void elements never close
            self.stack.append((tag, skip))

    def handle_endtag(self, tag):
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break
        if tag in self.BLOCK:
            self._flush()

    def handle_data(self, data):
        if not self._skipping():
            self.cur.append(data)


def html_to_text(src: str) -> str:
    p = _HTMLText()
    p.feed(src)
    p.close()
    p._flush()
    return _paragraphs(p.blocks)


_KEEP_DIRECTIVES = {"note", "warning", "tip", "important", "seealso", "attention", "caution", "hint", "danger", "admonition"}
_ROLE = re.compile(r":[\w:+-]+:`(?:[!~])?([^`<]*?)\s*(?:<[^`>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`_{1,2}")
_INLINE = [(re.compile(r"``([^`]+)``"), r"\1"), (re.compile(r"\*\*([^*]+)\*\*"), r"\1"), (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*"), r"\1"),
           (re.compile(r"`([^`]+)`"), r"\1"), (re.compile(r"\|([\w -]+)\|"), r"\1"), (re.compile(r"\[#?\w*\]_"), "")]
_ADORN = re.compile(r"^\s*([=\-~^\"'`#*+_:.<>])\1{2,}\s*$")
_TABLE = re.compile(r"^\s*(\+[-=+]+\+|[|+].*[|+]\s*$|=+( +=+)+\s*$)")
_LIST = re.compile(r"^\s*([-*+•]|\d+[.)]|#\.|\(\w+\))\s+")


def rest_to_text(src: str) -> str:
    """reStructuredText → paragraphs: drops comments, most directives, literal blocks, tables,
    section adornments; keeps the words of inline markup (roles, links, emphasis)."""
    lines = src.expandtabs(8).splitlines()
    blocks: list[str] = []
    cur: list[str] = []
    skip_indent = -1  # skipping lines indented deeper than this (a dropped directive or literal block)

    def flush() -> None:
        if cur:
            blocks.append(" ".join(cur))
            cur.clear()

    for line in lines:
        indent = len(line) - len(line.lstrip())
        if skip_indent >= 0:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = -1
        s = line.strip()
        if not s or _ADORN.match(line) or _TABLE.match(line):
            flush()
            continue
        if s.startswith(".."):
            flush()
            m = re.match(r"\.\.\s+([\w-]+)::\s*(.*)", s)
            if m and m.group(1) in _KEEP_DIRECTIVES:
                if m.group(2):
                    cur.append(m.group(2))
                continue  # its indented body is read as ordinary paragraphs
            skip_indent = indent
            continue
        if _LIST.match(line):
            flush()
            s = _LIST.sub("", s)
        if s.endswith("::"):  # the next indented block is a literal block
            s = s[:-2].rstrip()
            if s:
                cur.append(s + ":")
            flush()
            skip_indent = indent
            continue
        if s.startswith((">>>", "...", "$ ", "# ")):
            flush()
            continue
        cur.append(s)
    flush()
    clean = []
    for b in blocks:
        b = _ROLE.sub(lambda m: m.group(1), b)
        b = _LINK.sub(lambda m: m.group(1), b)
        for pat, rep in _INLINE:
            b = pat.sub(rep, b)
        clean.append(b)
    return _paragraphs(clean)


# ---------------------------------------------------------------------------- corpora

# Where the packages put each corpus's files: the one table of release-dependent paths. A ``*``
# takes any version (linux-doc-6.1 or -6.12, python3.11 or 3.13); where several are installed the
# newest wins. The text's sha256 goes into every protocol, so figures from two versions are never
# taken for the same protocol.
ROOTS: dict[str, tuple[str, ...]] = {
    "debian-handbook": ("/usr/share/doc/debian-handbook/html/en-US",),
    "linux-doc": ("/usr/share/doc/linux-doc-*/Documentation",),
    "python-doc": ("/usr/share/doc/python3.*/html/_sources", "/usr/share/doc/python3-doc/html/_sources"),
    "fortunes": ("/usr/share/games/fortunes",),
    "wordnet": ("/usr/share/wordnet",),
}


def _version_key(p: Path) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", str(p)))


def root(name: str) -> Path:
    """The folder ``ROOTS[name]`` finds on this machine (the newest version), or a path that does
    not exist when none is installed."""
    for pattern in ROOTS[name]:
        found = sorted((p for p in Path("/").glob(pattern.lstrip("/")) if p.is_dir()), key=_version_key)
        if found:
            return found[-1]
    return Path(ROOTS[name][0])


def _handbook_files() -> list[Path]:
    """The book's pages in reading order: follow each page's ``rel="next"`` link from index.html."""
    base = root("debian-handbook")
    order, page, seen = [], "index.html", set()
    while page and page not in seen and (base / page).exists():
        seen.add(page)
        order.append(base / page)
        m = re.search(r'<link rel="next" href="([^"#]+)"', (base / page).read_text(errors="replace"))
        page = m.group(1) if m else ""
    return order


@corpus("debian-handbook", "debian-handbook", "GPL-2.0-or-later or CC-BY-SA-3.0",
        "The Debian Administrator's Handbook (Debian 11), English HTML in reading order, code listings dropped",
        _handbook_files)
def _handbook(files: list[Path]) -> str:
    return "".join(html_to_text(_read(f)) for f in files)


def _linux_files() -> list[Path]:
    base = root("linux-doc")
    return [f for sub in ("process", "admin-guide") for f in sorted((base / sub).rglob("*.rst*"))
            if "kernel-parameters" not in f.name and f.name.endswith((".rst", ".rst.gz"))]


@corpus("linux-doc", "linux-doc", "GPL-2.0",
        "Linux kernel documentation, Documentation/process then admin-guide, reST cleaned to prose",
        _linux_files)
def _linux(files: list[Path]) -> str:
    return "".join(rest_to_text(_read(f)) for f in files)


def _pydoc_files() -> list[Path]:
    base = root("python-doc")
    return [f for sub in ("tutorial", "howto", "faq") for f in sorted((base / sub).glob("*.rst.txt"))]


@corpus("python-doc", "python3-doc", "PSF-2.0",
        "Python 3 tutorial, HOWTOs and FAQ (reST sources), cleaned to prose",
        _pydoc_files)
def _pydoc(files: list[Path]) -> str:
    return "".join(rest_to_text(_read(f)) for f in files)


_FORTUNE_SKIP = {"art", "ascii-art", "translate-me", "perl", "linuxcookie"}


def _fortune_files() -> list[Path]:
    base = root("fortunes")
    if not base.is_dir():
        return []
    return [f for f in sorted(base.iterdir()) if f.is_file() and "." not in f.name and f.name not in _FORTUNE_SKIP]


@corpus("fortunes", "fortunes", "BSD-3-Clause (fortune-mod; quotations belong to their authors)",
        "The fortune cookie databases (quotations, jokes, poems), one fortune per paragraph", _fortune_files)
def _fortunes(files: list[Path]) -> str:
    blocks = [b for f in files for b in re.split(r"^%\s*$", _read(f), flags=re.M)]
    return _paragraphs([b for b in blocks if not re.search(r"[|_/\\]{4,}", b)])  # no ASCII drawings


def _wordnet_files() -> list[Path]:
    base = root("wordnet")
    return [base / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv") if (base / f"data.{pos}").exists()]


@corpus("wordnet", "wordnet-base", "WordNet 3.0 license (BSD-like, Princeton University)",
        "WordNet 3.0 glosses: 'lemma: definition; examples', one synset per paragraph", _wordnet_files)
def _wordnet(files: list[Path]) -> str:
    blocks = []
    for f in files:
        for line in _read(f).splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # license header
            head, gloss = line.split("|", 1)
            fields = head.split()
            lemma = fields[4].replace("_", " ")
            blocks.append(f"{lemma}: {gloss.strip()}")
    return _paragraphs(blocks, min_words=3)


CALIB_SOURCES = ("python-doc", "fortunes", "wordnet")
_MIX_BLOCK = 2000  # characters per slice taken from each source in turn


def _calib_mix() -> str:
    """Round-robin slices of ~2000 characters (whole paragraphs) from each calibration source,
    until the shortest runs out: any prefix of it mixes the three domains evenly."""
    chunks = []
    for name in CALIB_SOURCES:
        paras, pieces, size, cur = load_text(name).split("\n\n"), [], 0, []
        for p in paras:
            cur.append(p.strip())
            size += len(p)
            if size >= _MIX_BLOCK:
                pieces.append("\n\n".join(cur))
                cur, size = [], 0
        chunks.append(pieces)
    n = min(len(c) for c in chunks)
    return "\n\n".join(c[i] for i in range(n) for c in chunks) + "\n"


# ---------------------------------------------------------------------------- loading


def _missing(c: Corpus) -> MissingInputError:
    where = " or ".join(ROOTS.get(c.name, ()))
    return MissingInputError(
        f"corpus {c.name!r} is not on this machine (looked in {where}): on Debian or Ubuntu install the package "
        f"with `sudo apt-get install {c.package}` (or `bash scripts/install-text.sh` for every corpus); "
        "elsewhere give a UTF-8 text file or a Hugging Face dataset (hf:NAME[:CONFIG][:SPLIT]) as the text instead")


def _content_key(name: str, files: list[Path]) -> str:
    h = hashlib.sha256(f"{name}:v{EXTRACTOR_VERSION}".encode())
    for f in files:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def _cached(name: str, key: str, make: Callable[[], str]) -> str:
    path = cache_dir() / "text" / f"{name}-{key}.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    text = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    log.info("extracted %s: %d characters -> %s", name, len(text), path)
    return text


def _hf_text(spec: str) -> str:
    """``hf:NAME[:CONFIG][:SPLIT]`` through the ``datasets`` library (split defaults to test)."""
    parts = spec[3:].split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "test")
    try:
        import datasets
    except ImportError as e:
        raise ResourceLimitError(f"text {spec!r} needs the `datasets` package: pip install datasets") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad config all land here
        raise MissingInputError(f"could not load Hugging Face dataset {spec!r} ({type(e).__name__}: {e})") from e
    cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if not cols:
        raise InputError(f"dataset {spec!r} has no text column (columns: {list(ds.features)})")
    col = "text" if "text" in cols else cols[0]
    return "\n\n".join(t for t in ds[col] if t and t.strip()) + "\n"


@functools.lru_cache(maxsize=8)
def load_text(spec: str) -> str:
    """A corpus name (see :func:`corpus_names`), a path to a UTF-8 text file, or
    ``hf:dataset[:config][:split]``. Returns the text (paragraphs separated by blank lines)."""
    spec = str(spec)
    if spec == "calib-mix":
        key = hashlib.sha256("".join(_content_key(n, CORPORA[n].files()) for n in CALIB_SOURCES).encode()).hexdigest()[:16]
        for n in CALIB_SOURCES:
            if not CORPORA[n].files():
                raise _missing(CORPORA[n])
        return _cached("calib-mix", key, _calib_mix)
    if spec in CORPORA:
        c = CORPORA[spec]
        try:
            files = c.files()
        except FileNotFoundError:
            files = []
        if not files:
            raise _missing(c)
        return _cached(c.name, _content_key(c.name, files), lambda: c.extract(files))
    if spec.startswith("hf:"):
        return _hf_text(spec)
    p = Path(spec).expanduser()
    if p.is_file():
        return _read(p)
    raise MissingInputError(f"no text {spec!r}: not a corpus ({', '.join(corpus_names())}), a file, nor hf:NAME")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
