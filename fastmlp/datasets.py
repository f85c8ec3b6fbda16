"""Datasets: MNIST-layout IDX files (MNIST, Fashion-MNIST, KMNIST) and the notebook's split.

:func:`load_mnist` looks for the four gzipped IDX files in ``path``, then in
``$FASTMLP_DATA``, then in the user cache ``~/.cache/fastmlp/mnist``, then
downloads them into that cache with `pooch <https://www.fatiando.org/pooch/>`_
(each public mirror in turn, a few retries, a progress bar on a terminal, each
file kept only when its SHA-256 matches the canonical digest; a file already in
the cache with the right digest is not downloaded again).
:func:`identify` names a directory's dataset from its files' digests.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import zlib
from pathlib import Path

import numpy as np

__all__ = ["MNIST_FILES", "DataNotFoundError", "find_mnist", "identify", "load_digits", "load_idx", "load_mnist",
           "notebook_split"]

#: the four files of the MNIST layout: (train images, train labels, test images, test labels)
MNIST_FILES: tuple[str, str, str, str] = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
#: canonical SHA-256 digests of the original MNIST files
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
#: public mirrors tried in order when downloading
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
#: MD5 digests of the other datasets in the MNIST layout, as their authors (and torchvision) publish them
KNOWN_MD5: dict[str, dict[str, str]] = {
    "Fashion-MNIST": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "KMNIST": {
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    },
}
#: download attempts per file and mirror beyond the first (pooch waits 1 s, 2 s, ... in between)
DOWNLOAD_RETRIES = 2
#: seconds a download may stall before it counts as failed
DOWNLOAD_TIMEOUT = 30.0
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


class DataNotFoundError(FileNotFoundError):
    """MNIST could be found neither locally nor downloaded."""


def cache_dir() -> Path:
    """The user cache directory for MNIST (``$XDG_CACHE_HOME/fastmlp/mnist`` or ``~/.cache/fastmlp/mnist``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastmlp" / "mnist"


def _open(path: Path):
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


#: largest IDX payload read (bytes): 16 GiB, far above MNIST's 47 MB, far below what a forged header can claim
MAX_IDX_BYTES = 1 << 34


def _read_idx(path: Path, magic: int, what: str) -> tuple[tuple[int, ...], bytes]:
    """The dimensions and the payload of one IDX file, the header checked before the payload is read.

    Only what the header announces is read (a stream with trailing bytes beyond it is refused after one
    more byte, not decompressed to its end); a header that claims more than :data:`MAX_IDX_BYTES` is
    refused before anything is allocated.
    """
    ndim = 3 if magic == _IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    try:
        with _open(path) as fh:
            head = fh.read(header)
            if len(head) < header:
                raise ValueError(f"{path}: truncated {what} file ({len(head)} bytes, the header alone needs {header})")
            got = int.from_bytes(head[:4], "big")
            if got != magic:
                raise ValueError(f"{path}: not an IDX {what} file (magic number {got}, expected {magic})")
            dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
            size = 1
            for d in dims:
                size *= d
            if size > MAX_IDX_BYTES:
                raise ValueError(f"{path}: the header claims shape {dims} ({size} bytes), more than the "
                                 f"{MAX_IDX_BYTES} this reader takes; not an IDX {what} file fastmlp can read")  # fmt: skip
            data = fh.read(size)
            if len(data) < size:
                raise ValueError(f"{path}: truncated {what} file ({header + len(data)} bytes, expected "
                                 f"{header + size} for shape {dims})")  # fmt: skip
            if fh.read(1):
                raise ValueError(f"{path}: {what} file longer than its header's shape {dims} says "
                                 f"({header + size} bytes); not an IDX file, or a corrupt one")  # fmt: skip
    except FileNotFoundError:
        raise
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{path}: cannot read {what} (corrupt or truncated gzip): {exc}") from exc
    return dims, data


def load_idx(images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read one IDX image file and its label file (gzipped or not).

    Parameters
    ----------
    images_path, labels_path : path
        An ``idx3-ubyte`` image file (magic 2051) and an ``idx1-ubyte`` label
        file (magic 2049), as MNIST, Fashion-MNIST and KMNIST ship them.

    Returns
    -------
    X : ndarray of uint8 (n_samples, rows * cols)
    y : ndarray of int64 (n_samples,)

    Raises
    ------
    FileNotFoundError
        A file does not exist.
    ValueError
        A truncated file, a wrong magic number, image and label counts that differ, or a path that is a
        directory, FIFO or device rather than a file.
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    for p in (images_path, labels_path):
        if not p.is_file():
            if os.path.lexists(p) and p.exists():  # a directory, FIFO, device or socket
                raise ValueError(f"{p} is not a regular file (a directory, FIFO or device); give an IDX file")
            raise FileNotFoundError(f"IDX file not found: {p}")
    (n, rows, cols), pix = _read_idx(images_path, _IMAGES_MAGIC, "images")
    (m,), lab = _read_idx(labels_path, _LABELS_MAGIC, "labels")
    if n != m:
        raise ValueError(f"{images_path} has {n} images but {labels_path} has {m} labels")
    X = np.frombuffer(pix, dtype=np.uint8).reshape(n, rows * cols).copy()
    y = np.frombuffer(lab, dtype=np.uint8).astype(np.int64)
    return X, y


def _files_in(directory: Path) -> list[Path] | None:
    """The four files in ``directory`` (gzipped, or the same names without ``.gz``), or None."""
    found = []
    for name in MNIST_FILES:
        for cand in (directory / name, directory / name[:-3]):
            if cand.is_file():
                found.append(cand)
                break
        else:
            return None
    return found


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def identify(files: list[Path] | str | os.PathLike[str]) -> str | None:
    """The name of the dataset whose four files these are, from their digests, or None.

    Parameters
    ----------
    files : list of Path, or a directory
        The four MNIST-layout files (as :func:`find_mnist` returns them), or a
        directory holding them.

    Returns
    -------
    str or None
        ``'MNIST'`` (the canonical SHA-256 digests), ``'Fashion-MNIST'`` or
        ``'KMNIST'`` (their published MD5 digests); None for files of another
        dataset, uncompressed copies or modified files.
    """
    if not isinstance(files, list):
        found = _files_in(Path(files))
        if found is None:
            return None
        files = found
    by_name = {p.name: p for p in files}
    if set(by_name) != set(MNIST_FILES):
        return None
    if all(_digest(by_name[n], "sha256") == MNIST_SHA256[n] for n in MNIST_FILES):
        return "MNIST"
    md5 = {n: _digest(by_name[n], "md5") for n in MNIST_FILES}
    for name, digests in KNOWN_MD5.items():
        if md5 == digests:
            return name
    return None


def _mirrors() -> tuple[str, ...]:
    """Download mirrors: ``$FASTMLP_MNIST_MIRRORS`` (comma-separated base URLs) or :data:`MNIST_MIRRORS`."""
    env = os.environ.get("FASTMLP_MNIST_MIRRORS")
    if env:
        return tuple(m if m.endswith("/") else m + "/" for m in env.split(",") if m)
    return MNIST_MIRRORS


def _download(dest: Path) -> list[Path]:
    """Fetch the four files into ``dest`` with pooch: each mirror in turn, retries, checksums, progress bar."""
    try:
        import pooch
    except ImportError as exc:  # pragma: no cover - pooch is a dependency
        raise DataNotFoundError("downloading MNIST needs pooch: pip install pooch") from exc
    dest.mkdir(parents=True, exist_ok=True)
    registry = {name: f"sha256:{MNIST_SHA256[name]}" for name in MNIST_FILES}
    progress = sys.stderr.isatty()
    mirrors = _mirrors()
    for name in MNIST_FILES:
        errors = []
        for mirror in mirrors:
            pup = pooch.create(path=dest, base_url=mirror, registry=registry, retry_if_failed=DOWNLOAD_RETRIES)
            try:
                pup.fetch(name, progressbar=progress,
                          downloader=pooch.HTTPDownloader(progressbar=progress, timeout=DOWNLOAD_TIMEOUT))  # fmt: skip
                break
            except ValueError as exc:  # pooch: the downloaded file's hash is not the known one
                errors.append(f"{mirror}{name}: SHA-256 mismatch ({str(exc).splitlines()[0]})")
            except Exception as exc:  # requests' connection errors, HTTP errors, OSError
                errors.append(f"{mirror}{name}: {type(exc).__name__}: {exc}")
        else:
            raise DataNotFoundError("could not download MNIST: " + "; ".join(errors))
    return [dest / name for name in MNIST_FILES]


def find_mnist(path: str | os.PathLike[str] | None = None, download: bool = True) -> list[Path]:
    """Locate the four MNIST-layout files: ``path``, ``$FASTMLP_DATA``, the user cache, then a download.

    The download (pooch) tries each mirror (``$FASTMLP_MNIST_MIRRORS`` overrides the
    list) with :data:`DOWNLOAD_RETRIES` retries, shows a progress bar on a terminal and
    keeps a file only when its SHA-256 matches the canonical digest.

    Returns
    -------
    list of Path
        Train images, train labels, test images, test labels.

    Raises
    ------
    DataNotFoundError
        With every place looked at, when nothing works.
    """
    looked = []
    if path is not None:
        p = Path(path)
        if not p.is_dir():
            raise DataNotFoundError(f"data directory {p} does not exist")
        files = _files_in(p)
        if files is None:
            raise DataNotFoundError(f"{p} does not hold the four MNIST-layout files {', '.join(MNIST_FILES)}")
        return files
    candidates = []
    if os.environ.get("FASTMLP_DATA"):
        candidates.append(Path(os.environ["FASTMLP_DATA"]))
    candidates.append(cache_dir())
    for c in candidates:
        looked.append(str(c))
        if c.is_dir() and (files := _files_in(c)) is not None:
            return files
    if not download:
        raise DataNotFoundError(f"MNIST not found (looked in {', '.join(looked)}; download disabled); "
                                "point at a copy with FASTMLP_DATA=DIR (or --data DIR on the command line)")  # fmt: skip
    try:
        return _download(cache_dir())
    except (DataNotFoundError, OSError) as exc:
        raise DataNotFoundError(f"MNIST not found (looked in {', '.join(looked)}) and {exc}") from exc


def load_mnist(
    path: str | os.PathLike[str] | None = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load MNIST (or any dataset in its four-file IDX layout).

    Parameters
    ----------
    path : path, optional
        Directory holding the four files; default: ``$FASTMLP_DATA``, the user
        cache, then a download with SHA-256 check.
    download : bool
        Allow the download.

    Returns
    -------
    X_train : ndarray of uint8 (60000, 784)
    y_train : ndarray of int64 (60000,)
    X_test : ndarray of uint8 (10000, 784)
    y_test : ndarray of int64 (10000,)
    """
    tr_x, tr_y, te_x, te_y = find_mnist(path, download=download)
    X_train, y_train = load_idx(tr_x, tr_y)
    X_test, y_test = load_idx(te_x, te_y)
    if X_train.shape[1] != X_test.shape[1]:
        raise ValueError(f"train images have {X_train.shape[1]} pixels but test images {X_test.shape[1]}")
    return X_train, y_train, X_test, y_test


def notebook_split(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The classic notebook's 55,000 / 5,000 / 10,000 split of MNIST.

    Concatenates train then test (OpenML ``mnist_784`` order), scales to
    ``((X / 255) - 0.5) * 2`` in float64, then ``train_test_split(test_size=10000,
    random_state=123, stratify=y)`` and again ``(test_size=5000,
    random_state=123, stratify=y_temp)``.

    Returns
    -------
    X_train, y_train, X_valid, y_valid, X_test, y_test
    """
    from sklearn.model_selection import train_test_split

    X = np.concatenate([X_train, X_test]).astype(np.float64)
    y = np.concatenate([y_train, y_test]).astype(np.int64)
    X = ((X / 255.0) - 0.5) * 2
    X_temp, X_te, y_temp, y_te = train_test_split(X, y, test_size=10000, random_state=123, stratify=y)
    X_tr, X_va, y_tr, y_va = train_test_split(X_temp, y_temp, test_size=5000, random_state=123, stratify=y_temp)
    return X_tr, y_tr, X_va, y_va, X_te, y_te


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits as a stratified 80/20 split (offline fallback).

    Returns
    -------
    X_train, y_train, X_test, y_test
        uint8 pixels 0..255 ``(n, 64)`` (the 0..16 originals times 16, capped) and int64 labels.
    """
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    d = _sk_digits()
    X = np.minimum(d.data * 16, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    return X_tr, y_tr, X_te, y_te
