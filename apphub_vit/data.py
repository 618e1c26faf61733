"""Where the apps' images come from: FastEstimator's ciFAIR loaders, a local folder, or the synthetic source.

* ``dataset="cifair100"`` / ``"cifair10"``: FastEstimator's `fastestimator.dataset.data.cifair100` / `cifair10`
  loaders (ciFAIR: CIFAR with the test-set near-duplicates of the training set replaced; Barz & Denzler 2020). They
  download into ``~/fastestimator_data`` on first use, or read a copy already under ``data_dir`` (their ``root_dir``).
* ``data_dir``: a local folder holding ciFAIR (FastEstimator's layout ``ciFAIR100/ciFAIR-100``, or ``ciFAIR-100``), or
  the standard ``cifar-100-python`` / ``cifar-10-batches-py`` folders as the CIFAR site and torchvision distribute them
  (the folder itself or its parent).
* ``dataset="synthetic"``: `apphub_vit.synthetic`, learnable CIFAR-shaped images that need no download.
* ``dataset="cifar10_split_a"`` / ``"cifar10_split_b"``: two disjoint five-class tasks of real photos from a local
  CIFAR-10 folder (``data_dir``, as above): airplane, automobile, bird, cat, deer (split a) and dog, frog, horse,
  ship, truck (split b), each relabelled 0-4 in that order; train = the 25,000 training images of the five classes,
  eval / test = their 5,000 test images. Pretraining on a and finetuning on b is the transfer question on real images
  (`benchmarks/transfer.py --task real`); `num_classes_of` gives the apps their head size.

Offline with no local copy, loading fails within seconds with a `DataNotFoundError` saying what to put where, instead
of FastEstimator's retry loop and download traceback.
"""
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from fastestimator.dataset.numpy_dataset import NumpyDataset

from apphub_vit import safe_pickle
from apphub_vit.synthetic import SYNTHETIC_10_CLASSES, SYNTHETIC_100_CLASSES, make_synthetic
from networks.online import online

CIFAIR_HOST = "drive.google.com"  # where FastEstimator's ciFAIR loaders download from
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The 100 CIFAR-100 fine labels in label order (as in the dataset's `meta` file).
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm")

# The five-class CIFAR-10 tasks: the classes of each, in label order (label i of the task is class name i).
CIFAR10_SPLITS = {"cifar10_split_a": CIFAR10_CLASSES[:5], "cifar10_split_b": CIFAR10_CLASSES[5:]}
CIFAR10_HINT = "python ../shared/data/cifar10/to_batches.py /tmp/c10"  # writes /tmp/c10/cifar-10-batches-py here

# Synthetic sizes match CIFAR: 50,000 train and 10,000 eval images.
SYNTHETIC_TRAIN, SYNTHETIC_EVAL = 50000, 10000


class DataNotFoundError(FileNotFoundError):
    """The requested data is neither on disk nor downloadable; the message says what to put where."""


def num_classes_of(dataset: str, default: int) -> int:
    """The number of classes of `dataset`: 5 for the CIFAR-10 splits, else the app's `default` (100 / 10)."""
    return len(CIFAR10_SPLITS[dataset]) if dataset in CIFAR10_SPLITS else default


def balanced_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `per_class` samples of every label in `labels`, drawn without replacement by a generator
    seeded with `seed`: the same subset for the same labels and seed. Fails if a class has fewer samples."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(f"class {label} has {len(members)} samples, fewer than the {per_class} asked per class")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _split_of(arrays: Dict[str, np.ndarray], classes: Tuple[str, ...]) -> Dict[str, np.ndarray]:
    """The samples of CIFAR-10 `arrays` whose class is in `classes`, relabelled by their position in `classes`."""
    relabel = np.full(len(CIFAR10_CLASSES), -1, dtype=np.int16)
    relabel[[CIFAR10_CLASSES.index(name) for name in classes]] = np.arange(len(classes))
    new = relabel[arrays["y"].astype(np.int64)]
    keep = new >= 0
    return {"x": arrays["x"][keep], "y": new[keep].astype(np.uint8)}


def load_cifar10_split(dataset: str, data_dir: Optional[str]) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Train and test arrays ({"x", "y"}) of a five-class CIFAR-10 task (`CIFAR10_SPLITS`) read from `data_dir`."""
    if data_dir is None:
        raise DataNotFoundError(f"dataset={dataset!r} (five CIFAR-10 classes: {', '.join(CIFAR10_SPLITS[dataset])}) "
                                f"needs a local CIFAR-10 folder: pass data_dir=<folder> holding "
                                f"'cifar-10-batches-py/' (--data_dir FOLDER). From this project's copy: "
                                f"`{CIFAR10_HINT}`, then data_dir=/tmp/c10.")
    train, test = read_cifar_folder(find_cifar_folder(data_dir, 10), 10)
    return _split_of(train, CIFAR10_SPLITS[dataset]), _split_of(test, CIFAR10_SPLITS[dataset])


def _cifar_files(num_classes: int) -> Dict[str, Tuple[str, ...]]:
    """Folder names that may hold the data, and the pickle files each must contain."""
    if num_classes == 100:
        return {name: ("train", "test") for name in ("ciFAIR100/ciFAIR-100", "ciFAIR-100", "cifar-100-python")}
    batches = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", )
    return {name: batches for name in ("ciFAIR10/ciFAIR-10", "ciFAIR-10", "cifar-10-batches-py")}


def find_cifar_folder(data_dir: str, num_classes: int) -> Path:
    """The folder under (or at) `data_dir` that holds CIFAR-`num_classes` pickles, else a clear error."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"data_dir '{data_dir}' does not exist or is not a folder. Point data_dir at the "
                                f"folder holding {_layout_hint(num_classes)}.")
    layouts = _cifar_files(num_classes)
    candidates = [root] + [root / name for name in layouts]
    needed = next(iter(layouts.values()))
    for folder in candidates:
        if all((folder / f).is_file() for f in needed):
            return folder
    other = 10 if num_classes == 100 else 100
    wrong = [str(f) for f in [root] + [root / n for n in _cifar_files(other)]
             if f.is_dir() and all((f / name).is_file() for name in next(iter(_cifar_files(other).values())))]
    found = sorted(p.name for p in root.iterdir())[:10]
    hint = f" It holds CIFAR-{other} ({wrong[0]}), but this app needs CIFAR-{num_classes}." if wrong else ""
    raise DataNotFoundError(f"No CIFAR-{num_classes} data in data_dir '{data_dir}'.{hint} Looked for the files "
                            f"{', '.join(needed)} in the folder itself and in "
                            f"{', '.join(layouts)}; the folder holds: {found or 'nothing'}. "
                            f"Expected {_layout_hint(num_classes)}.")


def _layout_hint(num_classes: int) -> str:
    if num_classes == 100:
        return ("CIFAR-100 as 'cifar-100-python/' (the python version from the CIFAR site, files train, test, meta) or "
                "ciFAIR-100 as FastEstimator keeps it ('ciFAIR100/ciFAIR-100/')")
    return ("CIFAR-10 as 'cifar-10-batches-py/' (the python version from the CIFAR site, files data_batch_1..5, "
            "test_batch) or ciFAIR-10 as FastEstimator keeps it ('ciFAIR10/ciFAIR-10/')")


def _read_pickle(path: Path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    """One CIFAR python pickle -> ([N, 32, 32, 3] uint8, [N] uint8)."""
    try:
        with open(path, "rb") as f:
            batch = safe_pickle.load(f)  # a pickle naming other code is refused, not run
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows of R, G, B planes
        labels = np.asarray(batch[label_key], dtype=np.uint8)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, AttributeError, TypeError) as err:
        raise DataNotFoundError(f"Cannot read CIFAR file '{path}' ({type(err).__name__}: {err}). It should be a "
                                f"python pickle from the CIFAR site's python version; re-extract it.") from err
    if len(labels) != len(data):
        raise DataNotFoundError(f"CIFAR file '{path}' has {len(data)} images but {len(labels)} labels; re-extract it.")
    return data.transpose(0, 2, 3, 1), labels  # NCHW -> NHWC, as FastEstimator's loaders return


def read_cifar_folder(folder: Path, num_classes: int) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Read the train and test splits of a CIFAR python folder (CIFAR or ciFAIR, same format)."""
    if num_classes == 100:
        train, test = [_read_pickle(folder / name, "fine_labels") for name in ("train", "test")]
    else:
        parts = [_read_pickle(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
        # joined in the files' NCHW memory order, a plain copy (the NHWC views, joined, were copied element by element)
        images = np.concatenate([p[0].transpose(0, 3, 1, 2) for p in parts]).transpose(0, 2, 3, 1)
        train = (images, np.concatenate([p[1] for p in parts]))
        test = _read_pickle(folder / "test_batch", "labels")
    return {"x": train[0], "y": train[1]}, {"x": test[0], "y": test[1]}


def _load_cifair(num_classes: int) -> Tuple[NumpyDataset, NumpyDataset]:
    """FastEstimator's own ciFAIR loader (downloading to ~/fastestimator_data), guarded against being offline."""
    from fastestimator.dataset.data import cifair10, cifair100
    name = f"ciFAIR{num_classes}"
    cached = Path.home() / "fastestimator_data" / name / f"ciFAIR-{num_classes}"
    if not cached.is_dir() and not online(CIFAIR_HOST):
        raise DataNotFoundError(
            f"{name} is not in {cached} and cannot be downloaded (no connection to Google Drive, where FastEstimator "
            f"keeps it). Either put a copy there, or pass data_dir=<folder> holding {_layout_hint(num_classes)}, or "
            f"use dataset='synthetic' to run on generated data.")
    loader = cifair100 if num_classes == 100 else cifair10
    try:
        return loader.load_data()
    except Exception as err:  # gdown / zip errors: say what failed, keep the cause chained
        raise DataNotFoundError(f"Downloading {name} with FastEstimator failed ({type(err).__name__}: {err}). Put a "
                                f"copy in {cached} or pass data_dir=<folder>.") from err


@lru_cache(maxsize=4)
def _synthetic(num_classes: int, num_train: int, num_eval: int, seed: int):
    # Train and eval are drawn from the same distribution with different seeds, so eval images are unseen.
    return make_synthetic(num_classes, num_train, seed=seed), make_synthetic(num_classes, num_eval, seed=seed + 1)


class ArrayDataset(NumpyDataset):
    """A `NumpyDataset` that keeps the arrays it was made from, for `dataset_arrays` to hand back as they are: stacking
    CIFAR's 50,000 samples back took about a second of the apps' start-up on a 2-core CPU, and gave the images in the
    files' memory order (NCHW behind the NHWC view), which the GPU rearranges faster than the CPU
    (`pipelines.loader.device_arrays`)."""
    def __init__(self, data: Dict[str, np.ndarray]) -> None:
        super().__init__(data)
        self.arrays = dict(data)


def load_cifar(num_classes: int, dataset: str, data_dir: Optional[str] = None, num_train: int = SYNTHETIC_TRAIN,
               num_eval: int = SYNTHETIC_EVAL, seed: int = 0) -> Tuple[NumpyDataset, NumpyDataset]:
    """Train and eval `NumpyDataset`s of {"x": [32, 32, 3] uint8, "y": uint8 label} for a CIFAR-shaped task.

    Args:
        num_classes: 100 (pretraining) or 10 (finetuning); 5 for a CIFAR-10 split (`num_classes_of`).
        dataset: "cifair100" / "cifair10" (real, matching num_classes), "synthetic", or "cifar10_split_a" /
            "cifar10_split_b" (five real CIFAR-10 classes each, from data_dir).
        data_dir: A local folder with the real data (see the module docstring); only with a real dataset.
        num_train: Synthetic training images.
        num_eval: Synthetic eval images.
        seed: Synthetic seed.
    """
    if dataset in CIFAR10_SPLITS:
        if num_classes != num_classes_of(dataset, num_classes):
            raise ValueError(f"dataset={dataset!r} has {num_classes_of(dataset, num_classes)} classes, not "
                             f"{num_classes}: size the app's head with num_classes_of(dataset, ...)")
        train, test = load_cifar10_split(dataset, data_dir)
        return ArrayDataset(train), ArrayDataset(test)
    real = f"cifair{num_classes}"
    if dataset not in (real, "synthetic"):
        raise ValueError(f"dataset={dataset!r} is not available for this {num_classes}-class app: use '{real}' (real "
                         f"images, FastEstimator's loader or data_dir), 'synthetic' (generated, no download), or a "
                         f"five-class CIFAR-10 task with data_dir: {', '.join(map(repr, CIFAR10_SPLITS))}.")
    if dataset == "synthetic":
        if data_dir is not None:
            raise ValueError(f"data_dir={data_dir!r} was given with dataset='synthetic', which generates its images: "
                             f"drop data_dir, or use dataset='{real}' to read the real data in it.")
        train, test = _synthetic(num_classes, num_train, num_eval, seed)
        return ArrayDataset(dict(train)), ArrayDataset(dict(test))
    if data_dir is None:
        return _load_cifair(num_classes)
    train, test = read_cifar_folder(find_cifar_folder(data_dir, num_classes), num_classes)
    return ArrayDataset(train), ArrayDataset(test)


def dataset_arrays(dataset: NumpyDataset) -> Dict[str, np.ndarray]:
    """The arrays behind a `NumpyDataset` (which keeps one dict per sample): {"x": [N, ...], ...}, those an
    `ArrayDataset` was made from while it holds as many samples, else each sample's stacked back."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    kept = getattr(dataset, "arrays", None)
    if kept is not None and all(len(value) == len(dataset) for value in kept.values()):
        return dict(kept)
    samples = [dataset[i] for i in range(len(dataset))]
    return {key: np.stack([np.asarray(sample[key]) for sample in samples]) for key in samples[0]}


def hold_out(train: NumpyDataset, count: int) -> Tuple[NumpyDataset, NumpyDataset]:
    """(the training images but the last `count`, those last `count`): a validation split held out of the training
    images, to choose hyperparameters on without looking at the test set. The last images in the files' order, so
    every run and every choice sees the same split (the CIFAR files are not sorted by class)."""
    if count >= len(train):
        raise ValueError(f"validation={count} would hold out every one of the {len(train)} training images: hold out "
                         f"fewer (e.g. 5000 of CIFAR's 50,000)")
    arrays = dataset_arrays(train)
    keep = len(train) - count
    return (ArrayDataset({k: v[:keep] for k, v in arrays.items()}),
            ArrayDataset({k: v[keep:] for k, v in arrays.items()}))


def class_names(num_classes: int, dataset: str) -> List[str]:
    """Human-readable class names of a CIFAR-shaped task, for prediction grids and reports."""
    if dataset in CIFAR10_SPLITS:
        return list(CIFAR10_SPLITS[dataset])
    if dataset == "synthetic":
        return list(SYNTHETIC_100_CLASSES if num_classes == 100 else SYNTHETIC_10_CLASSES)
    return list(CIFAR100_CLASSES if num_classes == 100 else CIFAR10_CLASSES)
