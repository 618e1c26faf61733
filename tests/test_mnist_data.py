"""MNIST data sources: the IDX / npz folder layouts, the single-split rule, rendered digits, clear errors."""
import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from apphub_vit import mnist_data
from apphub_vit.data import DataNotFoundError
from apphub_vit.mnist_data import load_mnist, make_synthetic_digits, read_idx, read_mnist_folder

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
needs_shared_mnist = pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST not found at {SHARED_MNIST} "
                                        f"(<repo>/../shared/data/mnist); the real-data checks need it")


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """Write `array` (uint8) as an IDX file, the MNIST site's format."""
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_split(folder: Path, prefix: str, n: int, gz: bool = True, seed: int = 0) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    suffix = "-ubyte.gz" if gz else "-ubyte"
    write_idx(folder / f"{prefix}-images-idx3{suffix}", x, gz)
    write_idx(folder / f"{prefix}-labels-idx1{suffix}", y, gz)
    return x


@pytest.mark.parametrize("sub, gz", [("", True), ("MNIST/raw", True), ("MNIST/raw", False)])
def test_idx_folder_layouts(tmp_path, sub, gz):
    folder = tmp_path / sub if sub else tmp_path
    x_train = write_split(folder, "train", 30, gz)
    x_test = write_split(folder, "t10k", 12, gz, seed=1)
    train, test = load_mnist("mnist", str(tmp_path))
    assert (len(train), len(test)) == (30, 12)
    assert np.array_equal(train[3]["x"], x_train[3]) and np.array_equal(test[5]["x"], x_test[5])
    assert train[3]["y"] == 3


def test_npz_layout(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mnist.npz", x_train=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8),
             y_train=np.arange(20, dtype=np.uint8) % 10, x_test=np.zeros((5, 28, 28), np.uint8),
             y_test=np.ones(5, np.uint8))
    train, test = load_mnist("mnist", str(tmp_path))
    assert (len(train), len(test)) == (20, 5) and test[0]["y"] == 1


def test_test_set_only_folder_is_split_in_order_and_says_so(tmp_path, capsys):
    x = write_split(tmp_path, "t10k", 50)
    train, evals = read_mnist_folder(str(tmp_path))
    assert np.array_equal(train["x"], x[:40]) and np.array_equal(evals["x"], x[40:])
    out = capsys.readouterr().out
    assert "only the MNIST test set" in out and "first 40" in out and "last 10" in out


@needs_shared_mnist
def test_shared_mnist_gives_8000_train_2000_eval(capsys):
    train, evals = load_mnist("mnist", str(SHARED_MNIST))
    assert (len(train), len(evals)) == (8000, 2000)
    assert "first 8000 images for training and its last 2000 for evaluation" in capsys.readouterr().out
    assert train[0]["x"].shape == (28, 28) and train[0]["x"].dtype == np.uint8
    labels = np.array([evals[i]["y"] for i in range(len(evals))])
    assert set(labels.tolist()) == set(range(10))


def test_unknown_layout_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "notes.txt").write_text("no digits here")
    with pytest.raises(DataNotFoundError, match=r"No MNIST data in data_dir .*notes\.txt.*t10k-images-idx3-ubyte"):
        load_mnist("mnist", str(tmp_path))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist or is not a folder"):
        load_mnist("mnist", str(tmp_path / "nowhere"))


def test_images_without_labels_is_a_clear_error(tmp_path):
    write_split(tmp_path, "t10k", 10)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="not the matching labels file"):
        load_mnist("mnist", str(tmp_path))


def test_corrupt_idx_is_a_clear_error(tmp_path):
    write_split(tmp_path, "t10k", 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros(7, np.uint8))  # a labels header where images belong
    with pytest.raises(DataNotFoundError, match="magic number 2049, expected MNIST images"):
        load_mnist("mnist", str(tmp_path))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:  # a header promising more than the file has
        f.write((2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (10, 28, 28)) + b"\0" * 100)
    with pytest.raises(DataNotFoundError, match="truncated"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051)


def test_fastestimator_loader_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached mnist.npz there
    monkeypatch.setattr(mnist_data, "online", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(DataNotFoundError, match=r"MNIST is not in .*mnist\.npz and cannot be downloaded.*data_dir"):
        load_mnist("mnist")
    assert time.perf_counter() - start < 5


def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="dataset='fashion'"):
        load_mnist("fashion")
    with pytest.raises(ValueError, match="data_dir=.*dataset='synthetic'"):
        load_mnist("synthetic", data_dir="somewhere")


def test_rendered_digits_are_deterministic_balanced_and_learnable():
    a, b = make_synthetic_digits(1000, seed=3), make_synthetic_digits(1000, seed=3)
    assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["y"], b["y"])
    assert a["x"].shape == (1000, 28, 28) and a["x"].dtype == np.uint8
    assert np.bincount(a["y"], minlength=10).tolist() == [100] * 10
    # Learnable: nearest class mean, fitted on one seed, classifies unseen renderings far above chance (10%).
    test = make_synthetic_digits(500, seed=4)
    means = np.stack([a["x"][a["y"] == c].reshape(-1, 784).mean(0) for c in range(10)])
    dist = ((test["x"].reshape(-1, 1, 784).astype(np.float32) - means[None])**2).sum(-1)
    assert (dist.argmin(1) == test["y"]).mean() > 0.4
