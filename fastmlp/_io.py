"""Files: atomic writes that keep the umask's mode and a symlink's target, and bounded npz reads.

A crash or a ``kill -9`` mid-write never leaves a half-written file behind
(the data go to a temporary file in the same directory, are flushed to disk and
renamed over the target); temporary files that an interrupted earlier write
left are removed by the next write to the same place.  Reads accept regular
files only (a FIFO or a device would block or never end), refuse members the
format does not know and uncompressed sizes beyond what the caller expects, and
turn every failure into a ``ValueError`` that names the file.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import stat
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import numpy as np

__all__ = ["atomic_write", "check_output_path", "read_npz", "regular_file_bytes"]

#: temporary files of an interrupted write older than this many seconds are removed by the next write
STALE_TMP_SECONDS = 60.0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _target(path: str | os.PathLike[str]) -> str:
    """Where a write to ``path`` lands: a symlink's target (made absolute), else ``path`` itself."""
    p = os.fspath(path)
    if os.path.islink(p):
        return os.path.realpath(p)
    return os.path.abspath(p)


def check_output_path(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Fail now, not after training, when ``path`` cannot be written: a missing directory, a directory, no write access.

    Raises
    ------
    ValueError
        Saying what is wrong with the path.
    """
    p = Path(os.fspath(path))
    if str(p) == "":
        raise ValueError(f"the {what} path is empty")
    target = Path(_target(p))
    if target.is_dir():
        raise ValueError(f"{what} path {p} is a directory; give a file name")
    parent = target.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write the {what} file {p}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the {what} file {p}: no write permission in {parent}")
    return p


def _clean_stale(directory: str, base: str) -> None:
    now = time.time()
    for tmp in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(base)}.*.tmp")):
        try:
            if now - os.stat(tmp).st_mtime > STALE_TMP_SECONDS:
                os.unlink(tmp)
        except OSError:
            pass


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(fh)`` on a temporary file next to ``path``, flush it to disk, rename it over ``path``.

    The rename is atomic on POSIX file systems: readers see the old file or the
    complete new one.  The new file gets the mode the umask gives (as ``open``
    would), a symlink at ``path`` keeps pointing at the (replaced) target, and
    stale temporary files of interrupted earlier writes to the same place are
    removed.  On any error (KeyboardInterrupt included) the temporary file is
    removed and the error re-raised; errors name ``path``, never the temporary file.
    """
    target = _target(path)
    directory, base = os.path.dirname(target), os.path.basename(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {os.fspath(path)}: the directory {directory} does not exist")
    _clean_stale(directory, base)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {os.fspath(path)}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def regular_file_bytes(path: str | os.PathLike[str], max_bytes: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``.

    Raises
    ------
    FileNotFoundError
        When nothing is at ``path``.
    ValueError
        For a directory, FIFO, device or socket, or a file that is larger than ``max_bytes``.
    """
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {p}") from None
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {p}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{p} is not a regular file (a directory, FIFO or device); give the path of a {what}")
    if st.st_size > max_bytes:
        raise ValueError(f"{p} is {st.st_size} bytes, more than a {what} of this kind can be ({max_bytes})")
    try:
        # O_NONBLOCK: a path swapped for a FIFO between stat and open must not block
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {p}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError(f"{p} is not a regular file; give the path of a {what}")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{p} is larger than a {what} of this kind can be ({max_bytes} bytes)")
    return data


def read_npz(path: str | os.PathLike[str], allowed: Callable[[str], bool], max_bytes: int, what: str,
             required: Iterable[str] = ()) -> dict[str, np.ndarray]:  # fmt: skip
    """The arrays of an ``.npz`` file, read with limits.

    Only regular files; only members whose name (without ``.npy``) passes
    ``allowed``; the uncompressed total at most ``max_bytes``; no pickles.

    Raises
    ------
    FileNotFoundError
        When nothing is at ``path``.
    ValueError
        For anything else that is wrong with the file, naming ``path``.
    """
    p = os.fspath(path)
    data = regular_file_bytes(p, max_bytes, what)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            total = 0
            for info in infos:
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if not info.filename.endswith(".npy") or not allowed(name):
                    raise ValueError(f"unexpected member {info.filename!r}")
                total += info.file_size
                if total > max_bytes:
                    raise ValueError(f"members would unpack to more than {max_bytes} bytes")
            names = {info.filename[:-4] for info in infos}
            missing = [r for r in required if r not in names]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            out: dict[str, np.ndarray] = {}
            for info in infos:
                with zf.open(info) as fh:
                    raw = fh.read(info.file_size + 1)
                if len(raw) != info.file_size:
                    raise ValueError(f"member {info.filename!r} is not the size its header says")
                out[info.filename[:-4]] = np.load(io.BytesIO(raw), allow_pickle=False)
    # a damaged zip can surface as any of these (bad deflate data, unknown compression, a bad header)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, KeyError, NotImplementedError, RuntimeError,
            zlib.error, OverflowError, TypeError, ValueError, MemoryError, RecursionError) as exc:  # fmt: skip
        msg = str(exc)
        if "allow_pickle" in msg:
            msg = "it holds Python objects, which fastmlp files never do"
        raise ValueError(f"{p} is not a readable {what} (truncated, corrupted or foreign?): {msg}") from None
    return out
