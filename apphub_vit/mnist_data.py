"""Where the MNIST apps' digits come from: FastEstimator's `mnist` loader, a local folder, or rendered digits.

* ``dataset="mnist"`` without ``data_dir``: FastEstimator's `fastestimator.dataset.data.mnist` loader (Keras'
  ``mnist.npz``, 60,000 train / 10,000 test), which downloads into ``~/.keras/datasets`` on first use. Offline with no
  cached copy it fails within seconds with a `DataNotFoundError` instead of a download traceback.
* ``dataset="mnist"`` with ``data_dir``: a folder holding the IDX files as the MNIST site distributes them
  (``train-images-idx3-ubyte.gz`` ... ``t10k-labels-idx1-ubyte.gz``, gzipped or not), directly or in torchvision's
  ``MNIST/raw`` layout, or Keras' ``mnist.npz``. A folder with only one split (e.g. only the 10,000 test images, as
  ``../shared/data/mnist`` holds them) is split in order: the first 80% train, the last 20% eval (8,000 / 2,000 for
  the test set), and the loader prints that it did so.
* ``dataset="synthetic"``: digits 0-9 rendered with OpenCV's Hershey fonts at random size, thickness, position, slant
  and rotation with pixel noise, 28x28 white on black like MNIST. Each label is the digit actually drawn, so a model
  must learn digit shapes; it is a stand-in for tests, not a replacement for the real benchmark.

Every source returns NumpyDatasets of {"x": [28, 28] uint8, "y": uint8 label}, as FastEstimator's loader does.
"""
import gzip
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from fastestimator.dataset.numpy_dataset import NumpyDataset

from apphub_vit.data import DataNotFoundError
from networks.online import online
from pipelines.mnist import MNIST_MEAN, MNIST_STD  # noqa: F401  (importable from here too, as the apps do)

MNIST_CLASSES = tuple(str(d) for d in range(10))

_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049  # IDX magic numbers: uint8 data with 3 (images) or 1 (labels) dimensions
_SPLITS = {"train": "train", "t10k": "test"}  # file prefix -> split
_SUBFOLDERS = ("", "MNIST/raw", "raw", "mnist")  # the folder itself, torchvision's layout, and common unpackings
# Share of a single available split used for training; the rest (the end of the file) is the eval set.
SINGLE_SPLIT_TRAIN_FRACTION = 0.8
SYNTHETIC_TRAIN, SYNTHETIC_EVAL = 8000, 2000


def _layout_hint() -> str:
    return ("the MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            "t10k-labels-idx1-ubyte.gz; gzipped or not; at least one images/labels pair), in the folder itself or in "
            "'MNIST/raw/' as torchvision keeps them, or Keras' 'mnist.npz'")


def read_idx(path: Path, expect_magic: int) -> np.ndarray:
    """One IDX file (optionally gzipped) -> uint8 array of its declared shape. Corrupt files raise DataNotFoundError."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
        magic = int.from_bytes(raw[0:4], "big")
        if magic != expect_magic:
            kind = "images (magic 2051)" if expect_magic == _IMAGE_MAGIC else "labels (magic 2049)"
            raise ValueError(f"magic number {magic}, expected MNIST {kind}")
        ndim = magic & 0xFF
        dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if data.size != int(np.prod(dims)):
            raise ValueError(f"header declares shape {dims} but the file holds {data.size} bytes of data (truncated?)")
    except (OSError, EOFError, ValueError) as err:
        raise DataNotFoundError(f"Cannot read MNIST file '{path}' ({type(err).__name__}: {err}). It should be an IDX "
                                f"file from the MNIST site; download or extract it again.") from err
    return data.reshape(dims)


def _find_idx(folder: Path, prefix: str, kind: str) -> Optional[Path]:
    name = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _read_split(folder: Path, prefix: str) -> Optional[Dict[str, np.ndarray]]:
    images, labels = _find_idx(folder, prefix, "images"), _find_idx(folder, prefix, "labels")
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        have, lack = (images, "labels") if labels is None else (labels, "images")
        raise DataNotFoundError(f"MNIST folder '{folder}' holds '{have.name}' but not the matching {lack} file "
                                f"({prefix}-{lack}-idx{3 if lack == 'images' else 1}-ubyte[.gz]); add it.")
    x, y = read_idx(images, _IMAGE_MAGIC), read_idx(labels, _LABEL_MAGIC)
    if x.ndim != 3 or len(x) != len(y):
        raise DataNotFoundError(f"MNIST files '{images}' ({x.shape}) and '{labels}' ({y.shape}) do not match: "
                                f"expected [N, 28, 28] images and N labels.")
    return {"x": x, "y": y}


def _read_npz(path: Path) -> Dict[str, Dict[str, np.ndarray]]:
    try:
        with np.load(path) as f:
            return {"train": {"x": f["x_train"], "y": f["y_train"]}, "test": {"x": f["x_test"], "y": f["y_test"]}}
    except (OSError, KeyError, ValueError) as err:
        raise DataNotFoundError(f"Cannot read '{path}' as Keras' mnist.npz (arrays x_train, y_train, x_test, y_test): "
                                f"{type(err).__name__}: {err}") from err


Arrays = Dict[str, np.ndarray]


def split_in_order(data: Arrays, fraction: float = SINGLE_SPLIT_TRAIN_FRACTION) -> Tuple[Arrays, Arrays]:
    """The first `fraction` of the samples for training, the rest for eval, in file order (no shuffling)."""
    cut = int(round(len(data["y"]) * fraction))
    return {k: v[:cut] for k, v in data.items()}, {k: v[cut:] for k, v in data.items()}


def read_mnist_folder(data_dir: str) -> Tuple[Arrays, Arrays]:
    """Train and eval arrays from a local folder (see the module docstring), else a DataNotFoundError saying why."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"data_dir '{data_dir}' does not exist or is not a folder. Point data_dir at the "
                                f"folder holding {_layout_hint()}.")
    for sub in _SUBFOLDERS:
        folder = root / sub if sub else root
        if not folder.is_dir():
            continue
        splits = {split: _read_split(folder, prefix) for prefix, split in _SPLITS.items()}
        if all(v is None for v in splits.values()) and (folder / "mnist.npz").is_file():
            splits = _read_npz(folder / "mnist.npz")
        present = {k: v for k, v in splits.items() if v is not None}
        if len(present) == 2:
            return present["train"], present["test"]
        if len(present) == 1:
            (split, data), = present.items()
            train, evals = split_in_order(data)
            print(f"mnist: '{folder}' holds only the MNIST {split} set ({len(data['y'])} images); using its first "
                  f"{len(train['y'])} images for training and its last {len(evals['y'])} for evaluation.")
            return train, evals
    found = sorted(p.name for p in root.iterdir())[:10]
    raise DataNotFoundError(f"No MNIST data in data_dir '{data_dir}': looked in the folder itself and in "
                            f"{', '.join(s for s in _SUBFOLDERS if s)}; the folder holds: {found or 'nothing'}. "
                            f"Expected {_layout_hint()}.")


def _keras_cache() -> Path:
    # Where tf.keras.datasets.mnist.load_data() (FastEstimator's loader) keeps its download.
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets" / "mnist.npz"


def _load_fe_mnist() -> Tuple[NumpyDataset, NumpyDataset]:
    """FastEstimator's own MNIST loader (downloading through Keras), guarded against being offline."""
    cached = _keras_cache()
    if not cached.is_file() and not online("storage.googleapis.com"):
        raise DataNotFoundError(
            f"MNIST is not in {cached} and cannot be downloaded (no connection to storage.googleapis.com, where "
            f"FastEstimator's loader fetches it). Either put Keras' mnist.npz there, or pass data_dir=<folder> holding "
            f"{_layout_hint()}, or use dataset='synthetic' to run on rendered digits.")
    from fastestimator.dataset.data import mnist
    try:
        return mnist.load_data()
    except Exception as err:  # network / archive errors: say what failed, keep the cause chained
        raise DataNotFoundError(f"Downloading MNIST with FastEstimator failed ({type(err).__name__}: {err}). Put "
                                f"mnist.npz in {cached.parent} or pass data_dir=<folder>.") from err


_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX,
          cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX)


def make_synthetic_digits(num_samples: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """Render `num_samples` digits as 28x28 uint8 images (white on black), classes balanced, deterministic per seed.

    Each digit is drawn at 4x resolution in a random Hershey font, scale, stroke width, slant and rotation, shifted
    by a few pixels, blurred and downsampled (so strokes are anti-aliased like MNIST's), then noised.
    """
    if num_samples < 1:
        raise ValueError(f"synthetic num_samples must be positive, got {num_samples!r}")
    rng = np.random.default_rng([seed, 28])
    labels = np.arange(num_samples) % 10
    rng.shuffle(labels)
    big = 112
    x = np.empty((num_samples, 28, 28), np.uint8)
    for i, digit in enumerate(labels):
        canvas = np.zeros((big, big), np.uint8)
        font = _FONTS[rng.integers(len(_FONTS))]
        scale = rng.uniform(2.2, 3.2) * (1.6 if font == cv2.FONT_HERSHEY_PLAIN else 1.0)
        thickness = int(rng.integers(6, 12))
        (w, h), _ = cv2.getTextSize(str(digit), font, scale, thickness)
        org = ((big - w) // 2, (big + h) // 2)
        cv2.putText(canvas, str(digit), org, font, scale, 255, thickness, cv2.LINE_AA)
        angle, shear = rng.uniform(-15, 15), rng.uniform(-0.25, 0.25)
        m = cv2.getRotationMatrix2D((big / 2, big / 2), angle, 1.0)
        m[0, 1] += shear
        m[0, 2] += rng.uniform(-10, 10) - shear * big / 2
        m[1, 2] += rng.uniform(-10, 10)
        canvas = cv2.warpAffine(canvas, m, (big, big))
        small = cv2.resize(cv2.GaussianBlur(canvas, (5, 5), 0), (28, 28), interpolation=cv2.INTER_AREA)
        noisy = small.astype(np.float32) + rng.normal(0, 8, small.shape)
        x[i] = np.clip(noisy, 0, 255).round().astype(np.uint8)
    return {"x": x, "y": labels.astype(np.uint8)}


@lru_cache(maxsize=4)
def _synthetic(num_train: int, num_eval: int, seed: int):
    # Train and eval with different seeds, so eval digits are unseen renderings.
    return make_synthetic_digits(num_train, seed), make_synthetic_digits(num_eval, seed + 1)


def load_mnist(dataset: str = "mnist", data_dir: Optional[str] = None, num_train: int = SYNTHETIC_TRAIN,
               num_eval: int = SYNTHETIC_EVAL, seed: int = 0) -> Tuple[NumpyDataset, NumpyDataset]:
    """Train and eval `NumpyDataset`s of {"x": [28, 28] uint8, "y": uint8 digit}.

    Args:
        dataset: "mnist" (real digits: FastEstimator's loader, or data_dir) or "synthetic" (rendered, no download).
        data_dir: A local folder with MNIST (see the module docstring); only with dataset="mnist".
        num_train: Synthetic training images.
        num_eval: Synthetic eval images.
        seed: Synthetic seed.
    """
    if dataset not in ("mnist", "synthetic"):
        raise ValueError(f"dataset={dataset!r} is not available for the MNIST apps: use 'mnist' (real digits, "
                         f"FastEstimator's loader or data_dir) or 'synthetic' (rendered digits, no download).")
    if dataset == "synthetic":
        if data_dir is not None:
            raise ValueError(f"data_dir={data_dir!r} was given with dataset='synthetic', which renders its digits: "
                             f"drop data_dir, or use dataset='mnist' to read the real data in it.")
        train, test = _synthetic(num_train, num_eval, seed)
        return NumpyDataset(dict(train)), NumpyDataset(dict(test))
    if data_dir is None:
        return _load_fe_mnist()
    train, test = read_mnist_folder(data_dir)
    return NumpyDataset(train), NumpyDataset(test)


def mnist_class_names() -> List[str]:
    """The ten digit names, for prediction grids (the same for real and synthetic digits)."""
    return list(MNIST_CLASSES)
