"""apphub_vit/data.py and synthetic.py: every source, every layout, and every bad input's error."""
import pickle
import time

import numpy as np
import pytest

from apphub_vit import data as data_mod
from apphub_vit.data import (CIFAR10_CLASSES, DataNotFoundError, balanced_subset, class_names, load_cifar,
                             num_classes_of)
from apphub_vit.synthetic import make_synthetic
from networks.online import online


def _write_cifar10(folder, n=20, seed=0):
    """A cifar-10-batches-py folder of random images: n per file, every class n // 10 times (in random order)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    images = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.permutation(np.arange(n) % 10).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": y}, f)
        images[name] = (x, y)
    return images


def _write_cifar100(folder, n=20):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": rng.integers(0, 100, n).tolist(),
                         b"coarse_labels": rng.integers(0, 20, n).tolist()}, f)


def test_synthetic_is_deterministic_balanced_and_cifar_shaped():
    a, b = make_synthetic(100, 1000, seed=3), make_synthetic(100, 1000, seed=3)
    assert a["x"].shape == (1000, 32, 32, 3) and a["x"].dtype == np.uint8
    assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["y"], b["y"])
    assert np.bincount(a["y"], minlength=100).tolist() == [10] * 100
    assert not np.array_equal(make_synthetic(100, 1000, seed=4)["x"], a["x"])
    ten = make_synthetic(10, 200, seed=3)
    assert set(ten["y"].tolist()) == set(range(10))


def _fit_small_cnn(x, y, x_test, steps=300, num_classes=10):
    """Accuracy of a small CNN trained briefly (seconds on a CPU): a probe of how learnable the labels are."""
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(64, num_classes))
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    xt = torch.tensor(x).permute(0, 3, 1, 2).float() / 255
    yt = torch.tensor(y).long()
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (64, ), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return net(torch.tensor(x_test).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()


def test_synthetic_labels_are_learnable_structure_not_noise():
    """A small CNN learns the 10 shapes from 4,000 images well above chance in 300 steps, and nothing from the same
    images with shuffled labels."""
    train, test = make_synthetic(10, 4000, seed=0), make_synthetic(10, 1000, seed=1)
    accuracy = (_fit_small_cnn(train["x"], train["y"], test["x"]) == test["y"]).mean()
    shuffled = np.random.default_rng(0).permutation(train["y"])
    control = (_fit_small_cnn(train["x"], shuffled, test["x"]) == test["y"]).mean()
    assert accuracy > 0.25, accuracy  # 0.41 measured; chance is 0.1
    assert control < 0.16, control


def test_load_cifar_synthetic_gives_numpy_datasets():
    train, test = load_cifar(10, "synthetic", num_train=100, num_eval=40)
    assert len(train) == 100 and len(test) == 40
    sample = train[0]
    assert sample["x"].shape == (32, 32, 3) and 0 <= int(sample["y"]) < 10


def test_the_arrays_of_a_loaded_dataset_come_back_without_restacking_and_as_its_samples(tmp_path):
    """`dataset_arrays` of what `load_cifar` reads hands back the arrays it was made from (stacking 50,000 samples back
    was about a second of the apps' start-up), equal to each sample; a dataset split since (fewer samples) is stacked
    back from what it holds. Every image as the files hold it, across all five training files."""
    written = _write_cifar10(tmp_path / "cifar-10-batches-py")
    train, test = load_cifar(10, "cifair10", data_dir=str(tmp_path))
    arrays = data_mod.dataset_arrays(train)
    assert arrays["x"] is train.arrays["x"] and arrays["x"].shape == (100, 32, 32, 3)
    files = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(arrays["x"], files.transpose(0, 2, 3, 1))  # R, G, B planes -> HWC, file after file
    for i in (0, 37, 99):
        assert np.array_equal(train[i]["x"], arrays["x"][i]) and train[i]["y"] == arrays["y"][i]
    part = train.split(0.5)  # FastEstimator's split takes samples out of `train`
    assert len(train) == 50
    left = data_mod.dataset_arrays(train)
    assert left["x"].shape == (50, 32, 32, 3) and np.array_equal(left["x"][0], train[0]["x"])
    assert len(data_mod.dataset_arrays(part)["y"]) == 50 and len(data_mod.dataset_arrays(test)["y"]) == 20


@pytest.mark.parametrize("layout", ["cifar-10-batches-py", "ciFAIR-10", "ciFAIR10/ciFAIR-10", ""])
def test_data_dir_reads_cifar10_in_every_layout(tmp_path, layout):
    folder = tmp_path / layout if layout else tmp_path / "flat"
    written = _write_cifar10(folder)
    root = tmp_path if layout else folder
    train, test = load_cifar(10, "cifair10", data_dir=str(root))
    assert len(train) == 100 and len(test) == 20
    x0, y0 = written["data_batch_1"][0][0], written["data_batch_1"][1][0]
    assert np.array_equal(train[0]["x"], x0.reshape(3, 32, 32).transpose(1, 2, 0))  # R, G, B planes -> HWC
    assert int(train[0]["y"]) == y0


def test_data_dir_reads_cifar100_python(tmp_path):
    _write_cifar100(tmp_path / "cifar-100-python")
    train, test = load_cifar(100, "cifair100", data_dir=str(tmp_path))
    assert len(train) == 20 and train[0]["x"].shape == (32, 32, 3)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_cifar(10, "cifair10", data_dir=str(tmp_path / "nope"))


def test_unknown_layout_lists_what_was_looked_for(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataNotFoundError, match=r"No CIFAR-10 data .*cifar-10-batches-py.*holds: \['images'\]"):
        load_cifar(10, "cifair10", data_dir=str(tmp_path))


def test_cifar10_folder_given_to_the_100_class_app_says_so(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DataNotFoundError, match="holds CIFAR-10 .* needs CIFAR-100"):
        load_cifar(100, "cifair100", data_dir=str(tmp_path))


def test_truncated_file_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:500])
    with pytest.raises(DataNotFoundError, match="data_batch_3"):
        load_cifar(10, "cifair10", data_dir=str(tmp_path))


def test_offline_without_a_copy_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/fastestimator_data copy
    monkeypatch.setattr(data_mod, "online", lambda *a, **k: False)  # as on machines without internet
    start = time.perf_counter()
    with pytest.raises(DataNotFoundError, match="cannot be downloaded.*data_dir.*synthetic"):
        load_cifar(100, "cifair100")
    assert time.perf_counter() - start < 5


def test_real_connectivity_check_answers_within_seconds():
    start = time.perf_counter()
    online(data_mod.CIFAIR_HOST, timeout=2.0)  # whatever the answer, no hang
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_classes=10, dataset="cifair100"), "not available for this 10-class app"),
    (dict(num_classes=10, dataset="synthetic", data_dir="/tmp"), "drop data_dir"),
])
def test_bad_dataset_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_cifar(**kwargs)


def test_class_names():
    assert len(class_names(100, "cifair100")) == len(set(class_names(100, "cifair100"))) == 100
    assert class_names(10, "cifair10")[0] == "airplane"
    assert len(class_names(100, "synthetic")) == 100 and len(class_names(10, "synthetic")) == 10


def _by_image(written, files):
    """{image bytes: CIFAR-10 label} of the images written into `files` (random images: each is unique)."""
    return {x.tobytes(): y for name in files for x, y in zip(*written[name])}


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_splits_hold_exactly_their_named_classes_disjoint_and_labelled_0_to_4(tmp_path, split):
    written = _write_cifar10(tmp_path / "cifar-10-batches-py", n=30)
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    origin = _by_image(written, files)
    seen = {}
    for dataset, names in (("cifar10_split_a", CIFAR10_CLASSES[:5]), ("cifar10_split_b", CIFAR10_CLASSES[5:])):
        assert class_names(5, dataset) == list(names)
        data = data_mod.dataset_arrays(load_cifar(5, dataset, data_dir=str(tmp_path))[0 if split == "train" else 1])
        assert data["x"].shape[1:] == (32, 32, 3) and data["y"].dtype == np.uint8
        assert sorted(set(data["y"].tolist())) == [0, 1, 2, 3, 4]
        keys = [x.transpose(2, 0, 1).tobytes() for x in data["x"]]  # back to the file's R, G, B planes
        # every image keeps its class, under the name of its new label, and every image of those classes is there
        assert [CIFAR10_CLASSES[origin[k]] for k in keys] == [names[y] for y in data["y"]]
        assert sorted(keys) == sorted(k for k, y in origin.items() if CIFAR10_CLASSES[y] in names)
        seen[dataset] = set(keys)
    assert not seen["cifar10_split_a"] & seen["cifar10_split_b"]  # disjoint
    assert seen["cifar10_split_a"] | seen["cifar10_split_b"] == set(origin)  # together: all of CIFAR-10


def test_cifar10_splits_have_five_classes_and_need_a_local_folder(tmp_path):
    assert num_classes_of("cifar10_split_a", 100) == num_classes_of("cifar10_split_b", 10) == 5
    assert num_classes_of("cifair100", 100) == 100 and num_classes_of("synthetic", 10) == 10
    start = time.perf_counter()
    with pytest.raises(DataNotFoundError, match=r"needs a local CIFAR-10 folder.*to_batches\.py /tmp/c10"):
        load_cifar(5, "cifar10_split_a")
    assert time.perf_counter() - start < 2
    _write_cifar100(tmp_path / "cifar-100-python")
    with pytest.raises(DataNotFoundError, match="needs CIFAR-10"):
        load_cifar(5, "cifar10_split_b", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="has 5 classes, not 100"):
        load_cifar(100, "cifar10_split_a", data_dir=str(tmp_path))


def test_balanced_subset_is_balanced_and_fixed_by_its_seed():
    labels = np.random.default_rng(0).integers(0, 5, 1000)
    subset = balanced_subset(labels, 50, seed=3)
    assert len(subset) == len(set(subset.tolist())) == 250
    assert np.bincount(labels[subset], minlength=5).tolist() == [50] * 5
    assert np.array_equal(subset, balanced_subset(labels, 50, seed=3))  # the same subset for the same seed
    assert not np.array_equal(subset, balanced_subset(labels, 50, seed=4))
    with pytest.raises(ValueError, match="fewer than the 1000 asked"):
        balanced_subset(labels, 1000)
