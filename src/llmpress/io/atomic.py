"""Atomic outputs: write to a temporary sibling, flush it to the disk, then rename it into place.

An interrupted run (an exception, SIGKILL, a power cut) leaves either the old output or the
complete new one, never a partial one under the output's name; an existing output is kept unless
``force`` is given.

- Temporaries are named ``.<name>.<owner>.<random>.tmp`` beside the output (the same disk, so the
  rename is atomic), ``<owner>`` = this host's tag and this process's id. A run killed before it
  could remove its own leaves them behind; the next write of the same output (or
  :func:`sweep_stale`) removes those whose process is gone on this host.
- Before the rename the new data is fsync'd (every file of a folder, and the folders), after it the
  parent folder: a crash after the rename finds the new output whole. ``LLMPRESS_FSYNC=0`` skips the
  syncs (the test suite; a scratch disk): a killed process still leaves the old output or the new one,
  only a power cut could then find the new one incomplete.
- A folder replaces an existing output in one step where the OS can swap two paths
  (``renameat2(RENAME_EXCHANGE)``, Linux); elsewhere the old one is first renamed to a temporary
  name, which leaves a moment where neither is under the output's name.
- A full disk or a file size limit (ENOSPC, EFBIG, EDQUOT) while writing becomes
  :class:`~llmpress.errors.ResourceLimitError` naming the output, after the temporaries are removed.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

from ..errors import OutputExistsError, ResourceLimitError  # OutputExistsError re-exported: callers import it from here

_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
# what follows ".<name>." in a temporary's name: "<host>-<pid>.<mkstemp's random part>.tmp"
_TEMP = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp")
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists")


def _prefix(dst: Path) -> str:
    """The start of every temporary this process makes for ``dst`` (the pid is read at each call:
    a forked child gets its own)."""
    return f".{dst.name}.{_HOST}-{os.getpid()}."


def _alive(host: str, pid: int) -> bool:
    """Whether the process that made a temporary may still be writing it (another host's: assumed)."""
    if host != _HOST:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def sweep_stale(dst: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``dst`` (beside it) whose writer has died; return them."""
    dst = Path(dst)
    head = f".{dst.name}."
    gone = []
    try:
        siblings = list(dst.parent.iterdir())
    except OSError:  # no parent yet, or not readable: nothing of ours there
        return gone
    for p in siblings:
        m = _TEMP.fullmatch(p.name[len(head):]) if p.name.startswith(head) else None
        if m is not None and not _alive(m["host"], int(m["pid"])):
            _remove(p)
            gone.append(p)
    return gone


def _syncing() -> bool:
    return os.environ.get("LLMPRESS_FSYNC", "1") != "0"


def _fsync(path: Path, directory: bool = False) -> None:
    if not _syncing():
        return
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # a file system that cannot sync a folder: nothing more to do for it
        if e.errno not in (errno.EINVAL, errno.EBADF) or not directory:
            raise
    finally:
        os.close(fd)


def _sync_tree(path: Path) -> None:
    """Flush a file's, or every file's and folder's of a tree, data to the disk."""
    if not _syncing():
        return
    if not path.is_dir():
        _fsync(path)
        return
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                _fsync(p)
        _fsync(Path(root), directory=True)


def _renameat2():  # type: ignore[no-untyped-def]
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_EXCHANGE = _renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step; False where the OS or file system cannot."""
    if _EXCHANGE is None:
        return False
    if _EXCHANGE(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace(tmp: Path, dst: Path) -> None:
    """Publish ``tmp`` (synced) as ``dst``."""
    _sync_tree(tmp)
    if os.path.lexists(dst) and (tmp.is_dir() or (dst.is_dir() and not dst.is_symlink())):
        # os.replace cannot put a folder over a folder (or a file over a folder, a folder over a file or link)
        if _exchange(tmp, dst):
            _remove(tmp)  # now the old output
        else:
            old = dst.parent / f"{_prefix(dst)}{secrets.token_hex(6)}.tmp"  # a name, nothing there
            os.replace(dst, old)  # killed from here to the next line: neither is under dst's name
            os.replace(tmp, dst)
            _remove(old)
    else:
        os.replace(tmp, dst)
    _fsync(dst.parent, directory=True)


def _refuse_full(e: OSError, dst: Path) -> None:
    """A full disk or a file size limit while writing ``dst``: one clear error (the temporaries are gone)."""
    if e.errno in _FULL:
        raise ResourceLimitError(f"{dst}: not written: {e.strerror or os.strerror(e.errno)} (the disk is full or a "
                                 f"file size limit was reached); its temporary files were removed") from e


@contextlib.contextmanager
def _published(path: str | os.PathLike, force: bool, make: Callable[[Path], Path]) -> Iterator[Path]:
    """Yield the temporary that ``make`` creates beside ``path``; on success sync it and rename it into
    place; on any failure remove it (a full disk becomes one ``ResourceLimitError``)."""
    dst = Path(path)
    check_output(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dst)
    tmp = make(dst)
    try:
        yield tmp
        _replace(tmp, dst)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError):
            _refuse_full(e, dst)
        raise


def _temp_file(dst: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=_prefix(dst), suffix=".tmp", dir=dst.parent)
    os.close(fd)
    return Path(name)


def _temp_dir(dst: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=_prefix(dst), suffix=".tmp", dir=dst.parent))


def atomic_file(path: str | os.PathLike, force: bool = False) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path next to ``path``; on success sync it and rename it into place."""
    return _published(path, force, _temp_file)


def atomic_dir(path: str | os.PathLike, force: bool = False) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary directory next to ``path``; on success sync it and rename it into place."""
    return _published(path, force, _temp_dir)


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike | None, name: str) -> Iterator[Path]:
    """A working folder ``.<name>.<owner>.<random>.tmp`` in ``parent`` (default: the system's temporary
    folder), removed afterwards whatever happens; those of dead runs of the same ``name`` are removed
    first."""
    base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    sweep_stale(base / name)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(base / name), suffix=".tmp", dir=base))
    try:
        yield tmp
    finally:
        _remove(tmp)
