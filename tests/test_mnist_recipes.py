"""The MNIST ViT's recipes: "small_data" (default) and "reference", their schedule, augmentation and overrides."""
import numpy as np
import pytest
import torch
from fastestimator.op.numpyop.multivariate import ShiftScaleRotate
from fastestimator.op.numpyop.univariate import Onehot
from fastestimator.trace.adapt import LRScheduler

from apphub_vit.mnist import MIN_LR, RECIPES, get_estimator, lr_schedule

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
    assert est.config["recipe"] == "small_data" and est.config["hparams"] == RECIPES["small_data"]
    assert est.config["hparams"]["epochs"] == 30
    assert est.model.config.ff_dim == 256 and est.model.config.norm_first
    opt = optimizer_of(est)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.05
    assert any(isinstance(t, LRScheduler) for t in est.traces)
    ops = est.pipeline.ops
    assert any(isinstance(op, ShiftScaleRotate) and op.mode == {"train"} for op in ops)
    smooth = [op for op in ops if isinstance(op, Onehot)]
    assert len(smooth) == 1 and smooth[0].label_smoothing == 0.1


def test_reference_recipe_is_the_tutorials(tmp_path):
    est = get_estimator(recipe="reference", save_dir=str(tmp_path), **dict(TINY, epochs=None))
    assert est.config["hparams"]["epochs"] == 15
    assert est.model.config.ff_dim == 2048 and not est.model.config.norm_first
    opt = optimizer_of(est)
    assert type(opt) is torch.optim.Adam and opt.defaults["lr"] == 3e-4 and opt.defaults["weight_decay"] == 1e-4
    assert not any(isinstance(t, LRScheduler) for t in est.traces)
    assert not any(isinstance(op, (ShiftScaleRotate, Onehot)) for op in est.pipeline.ops)
    est.fit(warmup=False)  # the reference recipe still trains
    assert (tmp_path / "mnist_vit_best_accuracy.pt").is_file()


def test_arguments_override_the_recipe(tmp_path):
    est = get_estimator(recipe="reference", lr=1e-3, optimizer="adamw", ff_dim=128, augment=True,
                        save_dir=str(tmp_path), **TINY)
    assert est.config["hparams"]["lr"] == 1e-3 and est.model.config.ff_dim == 128
    assert isinstance(optimizer_of(est), torch.optim.AdamW)
    assert any(isinstance(op, ShiftScaleRotate) for op in est.pipeline.ops)


@pytest.mark.parametrize("kwargs, match", [(dict(recipe="huge"), "recipe='huge'"),
                                           (dict(optimizer="sgd"), "optimizer='sgd'"),
                                           (dict(warmup_epochs=-1), "warmup_epochs"),
                                           (dict(label_smoothing=1.0), "label_smoothing")])
def test_bad_recipe_arguments_fail_fast(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_estimator(save_dir=str(tmp_path), **dict(TINY, **kwargs))


def test_lr_schedule_warms_up_then_decays_to_min():
    fn = lr_schedule(2e-3, warmup_steps=10, total_steps=100, cosine=True)
    lrs = np.array([fn(step) for step in range(1, 101)])
    assert lrs[0] == pytest.approx(2e-4) and lrs[9] == pytest.approx(2e-3)
    assert np.all(np.diff(lrs[:10]) > 0) and np.all(np.diff(lrs[9:]) <= 0)
    assert lrs[-1] == pytest.approx(MIN_LR)
    assert lrs[54] == pytest.approx((2e-3 + MIN_LR) / 2, rel=0.05)  # half way down the cosine
    flat = lr_schedule(1e-3, warmup_steps=4, total_steps=100, cosine=False)
    assert flat(2) == pytest.approx(5e-4) and flat(4) == flat(50) == flat(100) == pytest.approx(1e-3)


def test_small_data_schedule_and_augmentation_run(tmp_path):
    est = get_estimator(save_dir=str(tmp_path), warmup_epochs=1, **dict(TINY, epochs=2))
    lrs = []
    sched = next(t for t in est.traces if isinstance(t, LRScheduler))
    fn = sched.lr_fn
    sched.lr_fn = lambda step: lrs.append(fn(step)) or fn(step)
    est.fit(warmup=False)
    # 3 steps a epoch: warmup over steps 1-3, then a cosine over 3 more steps down to MIN_LR.
    assert lrs == pytest.approx([2e-3 / 3, 4e-3 / 3, 2e-3, fn(4), fn(5), MIN_LR])
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
    assert est.config["hardware"]["precision"] == "fp32" and est.config["hardware"]["batch_size"] == 8
    for kwargs in (dict(precision="bf16"), dict(cuda_graph=True)):
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            get_estimator(save_dir=str(tmp_path / "refused"), **dict(TINY, **kwargs))
    with pytest.raises(ValueError, match="precision must be"):
        get_estimator(save_dir=str(tmp_path / "refused"), **dict(TINY, precision="fp8"))
    assert not (tmp_path / "refused").exists()  # refused before anything was written
