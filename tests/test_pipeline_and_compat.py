"""pipelines/cifar.py in train vs eval mode, and the FastEstimator 1.7 / current-PyTorch sampler fix."""
import subprocess
import sys

import numpy as np

from apphub_vit.data import load_cifar
from pipelines.cifar import CIFAR_MEAN, CIFAR_STD, cifar_ops, cifar_pipeline
from tests.conftest import cli_env


def _normalised_chw(x):
    return ((x / 255.0 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)).transpose(2, 0, 1)


def test_eval_mode_only_normalises_and_transposes():
    train, test = load_cifar(10, "synthetic", num_train=32, num_eval=8)
    pipeline = cifar_pipeline(train, test, batch_size=4, num_process=0)
    sample = test[0]
    out = pipeline.transform({"x": sample["x"], "y": sample["y"]}, mode="eval")
    assert out["x"].shape == (1, 3, 32, 32)
    np.testing.assert_allclose(out["x"][0], _normalised_chw(sample["x"]), rtol=1e-5, atol=1e-5)


def test_train_mode_augments_with_the_apphub_ops():
    names = [type(op).__name__ for op in cifar_ops()]
    assert names == ["Normalize", "PadIfNeeded", "RandomCrop", "Sometimes", "CoarseDropout", "ChannelTranspose"]
    train, test = load_cifar(10, "synthetic", num_train=32, num_eval=8)
    pipeline = cifar_pipeline(train, test, batch_size=4, num_process=0)
    sample = train[0]
    reference = _normalised_chw(sample["x"])
    outs = [pipeline.transform({"x": sample["x"], "y": sample["y"]}, mode="train")["x"][0] for _ in range(8)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert sum(not np.allclose(o, reference, atol=1e-5) for o in outs) >= 6  # crops / flips / holes change it
    assert len({o.tobytes() for o in outs}) > 1  # and randomly so
    # CoarseDropout leaves a hole of zeros (after normalisation the image has none of its own).
    assert any((np.abs(o).sum(0) == 0).any() for o in outs)


def test_augmenting_ops_run_only_in_train_mode():
    ops = cifar_ops()
    assert ops[0].mode == set() and ops[-1].mode == set()  # Normalize and ChannelTranspose: every mode
    assert [op.mode for op in ops[1:5]] == [{"train"}] * 4


def test_sampler_fix_makes_fit_possible_on_current_torch():
    """In a fresh interpreter: FastEstimator's InfiniteSampler fails on this torch before our import, works after."""
    code = ("from fastestimator.dataset.dataloader import InfiniteSampler\n"
            "try:\n"
            "    InfiniteSampler([1, 2, 3]); print('UNPATCHED-OK')\n"
            "except TypeError:\n"
            "    print('UNPATCHED-FAILS')\n"
            "import apphub_vit\n"
            "s = iter(InfiniteSampler([1, 2, 3], shuffle=False))\n"
            "print('PATCHED', [next(s) for _ in range(4)])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert "PATCHED [0, 1, 2, 0]" in out.stdout, out.stderr[-2000:]
    # On the torch this project installs the bug is real; on an old torch (< 2.2) the fix is a no-op.
    import torch
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6):
        assert "UNPATCHED-FAILS" in out.stdout


def test_experiment_ids_differ_where_the_clock_does_not(monkeypatch):
    """Runs that reach fit() in the same clock tick (a sweep's processes, started together) get different experiment
    ids, the key of each run in FastEstimator's history database: FastEstimator drew them from the clock alone."""
    import uuid
    from fastestimator.summary.system import System
    tick = uuid.uuid1()
    monkeypatch.setattr(uuid, "uuid1", lambda *args, **kwargs: tick)  # one clock tick for every id drawn here
    first, second = (System(network=None, pipeline=None, traces=[]) for _ in range(2))
    ids = [first.exp_id, second.exp_id]
    first.reset()  # each fit() starts a new experiment
    ids.append(first.exp_id)
    assert len(set(ids)) == 3
    assert all(-2 ** 63 <= i < 2 ** 63 for i in ids)  # the database's INTEGER key


def test_batches_of_the_infinite_sampler_walk_through_the_data():
    """FastEstimator's InfiniteSampler under torch's BatchSampler: consecutive batches continue where the last one
    stopped (without the iteration fix every batch restarted at sample 0 when not shuffling)."""
    from fastestimator.dataset.dataloader import InfiniteSampler
    from torch.utils.data import BatchSampler
    batches = iter(BatchSampler(InfiniteSampler(list(range(10)), shuffle=False), batch_size=4, drop_last=False))
    assert [next(batches) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    shuffled = iter(BatchSampler(InfiniteSampler(list(range(12)), shuffle=True), batch_size=4, drop_last=False))
    assert sorted(sum((next(shuffled) for _ in range(3)), [])) == list(range(12))  # an epoch: each sample once


def test_eval_sees_every_sample_once_through_the_per_sample_pipeline():
    train, test = load_cifar(10, "synthetic", num_train=32, num_eval=24)
    pipeline = cifar_pipeline(train, test, batch_size=8, num_process=0)
    with pipeline(mode="eval") as loader:
        labels = [int(y) for batch in loader for y in batch["y"]]
    assert labels == [int(test[i]["y"]) for i in range(24)]


def test_the_apps_leave_albumentations_augmentations_unimported_until_the_per_sample_pipeline_is_built():
    """The ViT apps' default path (the batched device-side ops) never needs albumentations's augmentations, whose import
    (scipy, scikit-image, scikit-learn) is most of a second of every start-up on a small CPU: `pipelines.cifar`
    imports FastEstimator's numpy ops, which pull them in, only when its per-sample ops are built."""
    code = ("import sys\n"
            "import apphub_vit.finetune, apphub_vit.pretrain\n"
            "print('AT IMPORT', 'albumentations.augmentations' in sys.modules)\n"
            "from pipelines.cifar import cifar_ops\n"
            "cifar_ops()\n"
            "print('AFTER OPS', 'albumentations.augmentations' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert "AT IMPORT False" in out.stdout and "AFTER OPS True" in out.stdout, out.stdout + out.stderr[-2000:]
