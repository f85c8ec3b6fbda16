"""IDX loading, the MNIST search order, the pooch download with SHA-256 check, identification, the split."""

import contextlib
import gzip
import struct

import numpy as np
import pytest

from fastmlp import datasets
from fastmlp.datasets import DataNotFoundError, load_idx, load_mnist


def _write_idx(directory, rng, n_train=30, n_test=10, rows=5, cols=4, gz=True):
    directory.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        X = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        img = struct.pack(">iiii", 2051, n, rows, cols) + X.tobytes()
        lab = struct.pack(">ii", 2049, n) + y.tobytes()
        for kind, payload in (("images-idx3-ubyte", img), ("labels-idx1-ubyte", lab)):
            name = f"{prefix}-{kind}"
            if gz:
                with gzip.open(directory / f"{name}.gz", "wb") as fh:
                    fh.write(payload)
            else:
                (directory / name).write_bytes(payload)
        data[prefix] = (X.reshape(n, rows * cols), y.astype(np.int64))
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_synthetic_idx_directory_any_image_size(tmp_path, rng, gz):
    data = _write_idx(tmp_path / "d", rng, gz=gz)
    X_train, y_train, X_test, y_test = load_mnist(tmp_path / "d")
    assert X_train.dtype == np.uint8 and X_train.shape == (30, 20)
    assert y_train.dtype == np.int64
    np.testing.assert_array_equal(X_train, data["train"][0])
    np.testing.assert_array_equal(y_test, data["t10k"][1])


def test_idx_errors(tmp_path, rng):
    _write_idx(tmp_path, rng)
    img, lab = tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz"
    with pytest.raises(FileNotFoundError, match="not found"):
        load_idx(tmp_path / "nope.gz", lab)
    # wrong magic: labels where images are expected
    with pytest.raises(ValueError, match="magic number 2049"):
        load_idx(lab, lab)
    # truncated payload
    raw = gzip.decompress(img.read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(ValueError, match="truncated"):
        load_idx(tmp_path / "short.gz", lab)
    # truncated gzip stream
    (tmp_path / "cut.gz").write_bytes(img.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_idx(tmp_path / "cut.gz", lab)
    # header only partly there
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="truncated"):
        load_idx(tmp_path / "tiny", lab)
    # count mismatch
    with pytest.raises(ValueError, match="30 images but"):
        load_idx(img, tmp_path / "t10k-labels-idx1-ubyte.gz")


def test_idx_header_is_checked_before_the_payload_is_read(tmp_path, rng, monkeypatch):
    """A header claiming an absurd shape is refused before anything is read or allocated, and a stream
    longer than its header says (a small gzip of many zeros) is refused after one byte past the payload."""
    _write_idx(tmp_path, rng)
    lab = tmp_path / "train-labels-idx1-ubyte.gz"
    huge = tmp_path / "huge.gz"
    with gzip.open(huge, "wb") as fh:
        fh.write(struct.pack(">Iiii", 2051, 2**31 - 1, 2**16, 2**16) + bytes(64))
    with pytest.raises(ValueError, match="header claims shape"):
        load_idx(huge, lab)
    reads = []
    real_open = datasets._open

    def counting_open(path):
        fh = real_open(path)
        orig = fh.read
        fh.read = lambda n=-1: (reads.append(n), orig(n))[1]
        return fh

    monkeypatch.setattr(datasets, "_open", counting_open)
    trailing = tmp_path / "trailing.gz"
    raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    with gzip.open(trailing, "wb") as fh:
        fh.write(raw + bytes(50_000_000))  # 50 MB of zeros: a 50 KB file
    with pytest.raises(ValueError, match="longer than its header"):
        load_idx(trailing, lab)
    assert all(0 <= n <= len(raw) for n in reads), reads  # never a read to the end of the stream


def test_search_order_env_then_cache_then_download(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTMLP_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(datasets, "MNIST_MIRRORS", ("http://127.0.0.1:9/",))
    monkeypatch.setattr(datasets, "DOWNLOAD_RETRIES", 0)
    with pytest.raises(DataNotFoundError, match="looked in"):
        load_mnist()
    with pytest.raises(DataNotFoundError, match=r"download disabled.*FASTMLP_DATA=DIR"):
        load_mnist(download=False)
    cache_data = _write_idx(tmp_path / "cache" / "fastmlp" / "mnist", rng, n_train=12)
    assert load_mnist()[0].shape[0] == 12
    np.testing.assert_array_equal(load_mnist()[1], cache_data["train"][1])
    _write_idx(tmp_path / "env", rng, n_train=14)
    assert load_mnist()[0].shape[0] == 14  # $FASTMLP_DATA comes first
    assert load_mnist(tmp_path / "cache" / "fastmlp" / "mnist")[0].shape[0] == 12  # an explicit path first of all
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="four MNIST-layout files"):
        load_mnist(tmp_path / "empty")


@contextlib.contextmanager
def _http_mirror(directory, fail_first=0):
    """Serve ``directory`` over HTTP on the loopback interface; the first ``fail_first`` requests get a 503."""
    import http.server
    import threading

    state = {"requests": [], "left": fail_first}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(directory), **k)

        def do_GET(self):
            state["requests"].append(self.path)
            if state["left"] > 0:
                state["left"] -= 1
                self.send_error(503, "busy")
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", state
    finally:
        server.shutdown()
        server.server_close()


def test_download_through_pooch_checks_sha256_retries_and_caches(tmp_path, rng, monkeypatch, mnist_path):
    """A mirror with wrong bytes is refused (SHA-256), the next mirror is tried; a mirror that fails once is
    retried; files already in the cache with the right digest are not downloaded again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTMLP_DATA", raising=False)
    monkeypatch.delenv("FASTMLP_MNIST_MIRRORS", raising=False)
    monkeypatch.setattr(datasets, "DOWNLOAD_RETRIES", 0)
    bad = tmp_path / "badmirror"
    _write_idx(bad, rng)  # right names, wrong bytes
    cache = tmp_path / "cache" / "fastmlp" / "mnist"
    with _http_mirror(bad) as (bad_url, _), _http_mirror(mnist_path, fail_first=1) as (good_url, good):
        monkeypatch.setattr(datasets, "MNIST_MIRRORS", (bad_url,))
        with pytest.raises(DataNotFoundError, match="SHA-256 mismatch"):
            load_mnist()
        assert not cache.exists() or not any(cache.iterdir())  # nothing unverified is kept
        monkeypatch.setattr(datasets, "MNIST_MIRRORS", (bad_url, good_url))
        monkeypatch.setattr(datasets, "DOWNLOAD_RETRIES", 1)  # the good mirror's first answer is a 503
        X_train, y_train, X_test, y_test = load_mnist()
        assert X_train.shape == (60000, 784) and y_test.shape == (10000,)
        assert sorted(p.name for p in cache.iterdir()) == sorted(datasets.MNIST_FILES)
        assert good["requests"][:2] == ["/train-images-idx3-ubyte.gz"] * 2 and len(good["requests"]) == 5
        datasets._download(cache)  # all four in the cache with the right digests: no request at all
        assert len(good["requests"]) == 5
    assert datasets.identify(cache) == "MNIST"


def test_identify_names_fashion_mnist_and_kmnist_by_their_digests(tmp_path, rng, monkeypatch, mnist_path):
    assert datasets.identify(mnist_path) == "MNIST"
    _write_idx(tmp_path / "other", rng)
    assert datasets.identify(tmp_path / "other") is None
    assert datasets.identify(tmp_path / "nowhere") is None
    files = datasets.find_mnist(tmp_path / "other")
    # the published MD5s of Fashion-MNIST, checked against files whose MD5 they are (the test cannot ship the data)
    real = datasets._digest
    fake = {str(p): datasets.KNOWN_MD5["Fashion-MNIST"][p.name] for p in files}
    monkeypatch.setattr(datasets, "_digest", lambda p, alg: fake[str(p)] if alg == "md5" else real(p, alg))
    assert datasets.identify(files) == "Fashion-MNIST"


@pytest.mark.mnist
def test_real_mnist_facts(mnist):
    X_train, y_train, X_test, y_test = mnist
    assert X_train.shape == (60000, 784) and X_test.shape == (10000, 784)
    np.testing.assert_array_equal(np.bincount(y_train), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    np.testing.assert_array_equal(np.bincount(y_test), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    np.testing.assert_array_equal(y_train[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    assert X_train.mean() == pytest.approx(33.318, abs=1e-3)


@pytest.mark.mnist
def test_notebook_split(mnist_notebook):
    X_tr, y_tr, X_va, y_va, X_te, y_te = mnist_notebook
    assert (len(X_tr), len(X_va), len(X_te)) == (55000, 5000, 10000)
    assert X_tr.dtype == np.float64 and X_tr.min() == -1.0 and X_tr.max() == 1.0
    # stratified: every class within one sample of its expected share
    frac = np.bincount(y_va) / len(y_va)
    full = np.bincount(np.concatenate([y_tr, y_va, y_te])) / 70000
    assert np.abs(frac - full).max() < 2 / len(y_va)


def test_digits_fallback():
    X_tr, y_tr, X_te, y_te = datasets.load_digits()
    assert X_tr.shape[1] == 64 and X_tr.dtype == np.uint8 and len(X_tr) + len(X_te) == 1797
    assert set(np.unique(y_tr)) == set(range(10))
