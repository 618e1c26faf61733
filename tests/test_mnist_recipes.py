"""The MNIST ViT's recipes: "small_data" (default) and "reference", their schedule, augmentation and overrides."""
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from fastestimator.op.numpyop.multivariate import ShiftScaleRotate
from fastestimator.trace.adapt import LRScheduler

from apphub_vit.mnist import get_estimator
from apphub_vit.recipes import MNIST_RECIPES, Recipe
from apphub_vit.training import SmoothLabels, lr_schedule

MIN_LR = MNIST_RECIPES["small_data"].min_lr

TINY = dict(dataset="synthetic", synthetic_size=[64, 32], epochs=1, batch_size=8, train_steps_per_epoch=3,
            eval_steps_per_epoch=2, num_process=0, log_steps=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def optimizer_of(est):
    return est.model.optimizer


def test_default_is_small_data(tmp_path):
    est = get_estimator(save_dir=str(tmp_path), **dict(TINY, epochs=None))
    # the resolved recipe is recorded: the default's, at batch 8 with the learning rate scaled to it
    assert est.config["recipe"] == asdict(replace(MNIST_RECIPES["small_data"], batch_size=8, lr=2e-3 * 8 / 128))
    assert est.config["recipe"]["epochs"] == 30 and est.config["overrides"] == {"batch_size": 8}
    assert est.model.config.ff_dim == 256 and est.model.config.norm_first
    opt = optimizer_of(est)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.05
    assert any(isinstance(t, LRScheduler) for t in est.traces)
    ops = est.pipeline.ops
    assert any(isinstance(op, ShiftScaleRotate) and op.mode == {"train"} for op in ops)
    smooth = [op for op in est.network.ops if isinstance(op, SmoothLabels)]
    assert len(smooth) == 1 and smooth[0].smoothing == 0.1 and smooth[0].mode == {"train"}


def test_reference_recipe_is_the_tutorials(tmp_path):
    est = get_estimator(recipe="reference", save_dir=str(tmp_path), **dict(TINY, epochs=None))
    assert est.config["recipe"]["epochs"] == 15
    assert est.model.config.ff_dim == 2048 and not est.model.config.norm_first
    opt = optimizer_of(est)  # at batch 8 instead of 128 the learning rate scales linearly
    assert type(opt) is torch.optim.Adam and opt.defaults["lr"] == pytest.approx(3e-4 * 8 / 128)
    assert opt.defaults["weight_decay"] == 1e-4
    assert not any(isinstance(t, LRScheduler) for t in est.traces)
    assert not any(isinstance(op, ShiftScaleRotate) for op in est.pipeline.ops)
    assert not any(isinstance(op, SmoothLabels) for op in est.network.ops)
    est.fit(warmup=False)  # the reference recipe still trains
    assert (tmp_path / "mnist_vit_best_accuracy.pt").is_file()


def test_arguments_override_the_recipe(tmp_path):
    est = get_estimator(recipe="reference", lr=1e-3, optimizer="adamw", ff_dim=128, augment="shift_scale_rotate",
                        save_dir=str(tmp_path), **TINY)
    assert est.config["recipe"]["lr"] == 1e-3 and est.model.config.ff_dim == 128
    assert est.config["overrides"] == dict(lr=1e-3, optimizer="adamw", ff_dim=128, augment="shift_scale_rotate",
                                           batch_size=8, epochs=1)
    assert isinstance(optimizer_of(est), torch.optim.AdamW)
    assert any(isinstance(op, ShiftScaleRotate) for op in est.pipeline.ops)


@pytest.mark.parametrize("kwargs, match", [(dict(recipe="huge"), "recipe must be one of 'reference', 'small_data'"),
                                           (dict(optimizer="lamb"), "optimizer must be one of 'sgd', 'adam'"),
                                           (dict(warmup_epochs=-1), "warmup_epochs"),
                                           (dict(label_smoothing=1.0), "label_smoothing"),
                                           (dict(augment=True), "augment must be one of 'none'"),
                                           (dict(mix_prob=0.5), "has no option 'mix_prob'"),
                                           (dict(distill=0.5), "has no option 'distill'"),
                                           (dict(guide=1.0), "has no option 'guide'"),
                                           (dict(ema=0.999), "has no option 'ema'")])
def test_bad_recipe_arguments_fail_fast(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_estimator(save_dir=str(tmp_path), **dict(TINY, **kwargs))


def _recipe(**fields) -> Recipe:
    return replace(MNIST_RECIPES["small_data"], **fields)


def test_lr_schedule_warms_up_then_decays_to_min():
    fn = lr_schedule(_recipe(lr=2e-3, warmup_epochs=1, epochs=10), steps_per_epoch=10)
    lrs = np.array([fn(step) for step in range(1, 101)])
    assert lrs[0] == pytest.approx(2e-4) and lrs[9] == pytest.approx(2e-3)
    assert np.all(np.diff(lrs[:10]) > 0) and np.all(np.diff(lrs[9:]) <= 0)
    assert lrs[-1] == pytest.approx(MIN_LR)
    assert lrs[54] == pytest.approx((2e-3 + MIN_LR) / 2, rel=0.05)  # half way down the cosine
    flat = lr_schedule(_recipe(lr=1e-3, warmup_epochs=0.4, epochs=10, schedule="constant"), steps_per_epoch=10)
    assert flat(2) == pytest.approx(5e-4) and flat(4) == flat(50) == flat(100) == pytest.approx(1e-3)


def test_small_data_schedule_and_augmentation_run(tmp_path):
    est = get_estimator(save_dir=str(tmp_path), warmup_epochs=1, lr=2e-3, **dict(TINY, epochs=5))
    lrs = []
    sched = next(t for t in est.traces if isinstance(t, LRScheduler))
    fn = sched.lr_fn
    sched.lr_fn = lambda step: lrs.append(fn(step)) or fn(step)
    est.fit(warmup=False)
    # 3 steps an epoch: warmup over steps 1-3 (a fifth of the 15 steps at most), then a cosine down to MIN_LR.
    assert lrs[:3] == pytest.approx([2e-3 / 3, 4e-3 / 3, 2e-3]) and len(lrs) == 15
    assert np.all(np.diff(lrs[2:]) < 0) and lrs[-1] == pytest.approx(MIN_LR)
    assert est.model.optimizer.param_groups[0]["lr"] == pytest.approx(MIN_LR)


def test_augmentation_only_changes_training_images(tmp_path):
    est = get_estimator(save_dir=str(tmp_path), **TINY)
    np.random.seed(0)
    train = [est.pipeline.transform(est.pipeline.data["train"][""][0], mode="train")["x"] for _ in range(4)]
    evals = [est.pipeline.transform(est.pipeline.data["train"][""][0], mode="eval")["x"] for _ in range(2)]
    assert train[0].shape[-3:] == (1, 28, 28)
    assert any(not np.array_equal(train[0], t) for t in train[1:])  # random per call
    assert np.array_equal(evals[0], evals[1])


def test_gpu_options_and_their_errors_on_a_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU defaults do not apply")
    from apphub_vit.device_network import DeviceNetwork
    est = get_estimator(save_dir=str(tmp_path), **TINY)
    assert isinstance(est.network, DeviceNetwork)  # FastEstimator's TorchNetwork step on a CPU in fp32
    assert est.network.cuda_graph is False and est.network.autocast_dtype is None
    assert est.config["hardware"]["precision"] == "fp32" and est.config["recipe"]["batch_size"] == 8
    for kwargs in (dict(precision="bf16"), dict(cuda_graph=True)):
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            get_estimator(save_dir=str(tmp_path / "refused"), **dict(TINY, **kwargs))
    with pytest.raises(ValueError, match="precision must be one of"):
        get_estimator(save_dir=str(tmp_path / "refused"), **dict(TINY, precision="fp8"))
    assert not (tmp_path / "refused").exists()  # refused before anything was written
