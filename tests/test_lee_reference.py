"""benchmarks/lee_reference.py (Lee, Lee & Song 2021's plain-ViT recipe): its sampler, its augmentation against
torchvision's, its batch mixing and loss, and an end-to-end smoke run of main() on a generated CIFAR-10 folder with a
tiny model (its figures come from GPU runs)."""
import csv
import importlib.util
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO
from tests.test_data import _write_cifar10

sys.path.insert(0, str(REPO / "benchmarks"))
import lee_reference as ref  # noqa: E402

# the runs build timm's ViT; the sampler, the augmentation and the mixing need torchvision only
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason='lee_reference.py\'s model needs timm: pip install -e ".[bench]"')


def test_epoch_sampler_makes_an_epoch_of_fresh_passes_and_is_seeded_per_epoch():
    """Each epoch, as the authors' RASampler(len, batch, repetitions=1, len_factor=3): three passes, each a
    permutation of every index; the order depends on (seed, epoch) only."""
    size = 30
    sampler = ref.EpochSampler(size, passes=3, seed=0)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == 3 * size
        passes = [order[i * size:(i + 1) * size] for i in range(3)]
        assert all(sorted(p) == list(range(size)) for p in passes)  # every image once in each pass
        assert len({tuple(p) for p in passes}) == 3  # each pass a new order
        orders.append(order)
    assert len({tuple(o) for o in orders}) == 4  # a different order every epoch
    again = ref.EpochSampler(size, passes=3, seed=0)
    again.set_epoch(2)
    assert list(again) == orders[2]  # the same seed and epoch: the same order
    other = ref.EpochSampler(size, passes=3, seed=1)
    other.set_epoch(2)
    assert list(other) != orders[2]
    assert len(ref.EpochSampler(size, passes=1)) == size
    with pytest.raises(ValueError, match="size >= 1"):
        ref.EpochSampler(0)


def test_cutmix_and_mixup_give_soft_targets_summing_to_one():
    """Mixed batches have soft targets (two labels, weights summing to 1); the smoothed loss is cross-entropy with
    label smoothing on an unmixed batch."""
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    mixer = ref.BatchMixer(prob=1.0, seed=0)
    seen = set()
    for _ in range(12):
        mixed, targets, which = mixer(images.clone(), labels)
        seen.add(which)
        assert mixed.shape == images.shape and targets.shape == (8, 10)
        assert torch.allclose(targets.sum(1), torch.ones(8)) and (targets >= 0).all()
        assert ((targets > 0).sum(1) <= 2).all() and (targets[torch.arange(8), labels] > 0).all()
        assert (targets < 1).any()  # mixed: some weight moved to another image's label
    assert seen == {"cutmix", "mixup"}  # one or the other, chosen at random
    _, targets, which = ref.BatchMixer(prob=0.0)(images, labels)
    assert which == "none" and torch.equal(targets, F.one_hot(labels, 10).float())
    logits = torch.randn(8, 10)
    assert torch.allclose(ref.soft_target_loss(logits, targets, 0.1),
                          F.cross_entropy(logits, labels, label_smoothing=0.1), atol=1e-6)
    assert ref.lr_at(0, 10, 1e-3, 10, 100) == 0 and ref.lr_at(100, 10, 1e-3, 10, 100) == pytest.approx(1e-3)
    assert ref.lr_at(550, 10, 1e-3, 10, 100) == pytest.approx(5e-4) and ref.lr_at(1000, 10, 1e-3, 10, 100) == 0


def test_the_split_augmentation_gives_torchvisions_images_from_the_same_random_numbers():
    """CifarTrain (PIL ops and random erasing's draw per image) + finish_batch (ToTensor, Normalize and the erase for
    the batch) equal torchvision's per-image Compose, image by image, from the same torch seed."""
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    dataset, reference = ref.CifarTrain(x, np.zeros(64)), ref.train_transform()
    from PIL import Image
    expected, items = [], []
    for i in range(64):
        torch.manual_seed(i)
        expected.append(reference(Image.fromarray(x[i])))
        torch.manual_seed(i)
        items.append(dataset[i])
    images, boxes, _ = torch.utils.data.default_collate(items)  # as the DataLoader batches them
    assert images.dtype == torch.uint8 and images.shape == (64, 3, 32, 32) and boxes.shape == (64, 4)
    erased = int((boxes[:, 2] * boxes[:, 3] > 0).sum())
    assert 5 <= erased <= 30  # p = 0.25 of 64 images
    assert torch.allclose(ref.finish_batch(images, boxes), torch.stack(expected), atol=1e-6)


@needs_timm
def test_lee_reference_trains_end_to_end_and_prints_the_summary(tmp_path, capsys):
    _write_cifar10(tmp_path / "cifar-10-batches-py", n=64)  # 320 training images, 64 test images
    out = tmp_path / "curve.csv"
    result = ref.main(["--data_dir", str(tmp_path), "--epochs", "2", "--train_steps", "3", "--batch_size", "16",
                       "--width", "32", "--depth", "2", "--eval_images", "48", "--workers", "1", "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("lee_reference: ViT width 32, depth 2, 2 heads:")
    assert [line.split(";")[0] for line in lines[1:3]] == ["lee_reference: epoch 1/2", "lee_reference: epoch 2/2"]
    summary = re.match(r"lee_reference: final test accuracy ([\d.]+)%, best ([\d.]+)% \(48 test images\) after 2 "
                       r"epochs; [\d.]+ s wall, \d+ training images/s on CPU; Lee et al.'s ViT on the original "
                       r"CIFAR-10: 93.58%", lines[-1])
    assert summary, lines[-1]
    final, best = (float(v) / 100 for v in summary.groups())
    assert 0 <= final <= best <= 1 and final == pytest.approx(result["final"], abs=5e-5)
    assert result["images"] == 2 * 3 * 16
    rows = list(csv.DictReader(out.open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(math.isfinite(float(r["train_loss"])) and 0 <= float(r["test_accuracy"]) <= 1 for r in rows)


@needs_timm
@pytest.mark.parametrize("passes", [1, 3])
def test_an_epoch_is_passes_times_the_training_images(tmp_path, passes):
    _write_cifar10(tmp_path / "cifar-10-batches-py", n=64)  # 320 training images
    result = ref.main(["--data_dir", str(tmp_path), "--epochs", "1", "--batch_size", "64", "--passes", str(passes),
                       "--width", "32", "--depth", "2", "--eval_images", "16", "--workers", "0"])
    assert result["images"] == passes * 320


def test_without_timm_it_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm...` raise ImportError
    monkeypatch.setitem(sys.modules, "timm.models.vision_transformer", None)
    with pytest.raises(SystemExit, match=r'needs timm.*pip install -e "\.\[bench\]"'):
        ref.build_model(32, 2)
