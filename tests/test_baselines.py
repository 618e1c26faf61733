"""The baseline apps end to end on CPU (tiny configurations): MNIST ViT, ResNet-18, ViT-B/16, MNIST autoencoder.

Covers: get_estimator(...).fit() for every app and `fastestimator train` for one; real freezing (frozen parameters and
BatchNorm statistics bit-identical after training, trainable ones changed); the prediction grid after a run; weights
from the torch hub cache or a path; clear errors for missing weights, missing data and unknown data layouts.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from apphub_vit import mnist_data
from apphub_vit.data import DataNotFoundError
from networks import baselines
from networks.baselines import WeightsNotFoundError, resnet18_classifier, vit_b16_classifier
from networks.util import count_parameters

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
TINY = dict(epochs=1, batch_size=8, train_steps_per_epoch=3, eval_steps_per_epoch=2, num_process=0, log_steps=None)
TINY_VIT_B = dict(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP threads spinning against each other
    # (and against other processes), which made single steps 50x slower in trials.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and no network: the situation of a fresh offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(baselines, "online", lambda *a, **k: False)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def trainable_and_total(model):
    counts = count_parameters([model])
    return counts["trainable"], counts["total"]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def grid_of(estimator):
    return next(t for t in estimator.traces if type(t).__name__ == "PredictionGrid")


# --- MNIST ViT -----------------------------------------------------------------------------------------------------


def test_mnist_vit_fit_writes_model_and_grid(tmp_path):
    from apphub_vit.mnist import get_estimator
    est = get_estimator(dataset="synthetic", synthetic_size=[64, 32], save_dir=str(tmp_path), grid_size=12, **TINY)
    assert est.model.config.num_patches == 16 and est.model.config.num_channels == 1
    before = snapshot(est.model)
    est.fit(warmup=False)
    assert (tmp_path / "mnist_vit_best_accuracy.pt").is_file() and (tmp_path / "prediction_grid.png").is_file()
    assert grid_of(est).shown == 12
    assert not torch.equal(before["linear_classifier.weight"], est.model.state_dict()["linear_classifier.weight"])
    with pytest.raises(FileExistsError, match="not overwriting"):  # a second run into the same folder
        get_estimator(dataset="synthetic", synthetic_size=[64, 32], save_dir=str(tmp_path), **TINY)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST not found at {SHARED_MNIST} "
                    f"(<repo>/../shared/data/mnist)")
def test_mnist_vit_on_shared_real_digits(tmp_path, capsys):
    from apphub_vit.mnist import get_estimator
    est = get_estimator(data_dir=str(SHARED_MNIST), save_dir=str(tmp_path), **TINY)
    assert "first 8000 images for training and its last 2000 for evaluation" in capsys.readouterr().out
    assert len(est.pipeline.data["train"][""]) == 8000 and len(est.pipeline.data["eval"][""]) == 2000
    est.fit(warmup=False)
    assert grid_of(est).shown == 16


def test_mnist_vit_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    from apphub_vit.mnist import get_estimator
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(mnist_data, "online", lambda *a, **k: False)
    with pytest.raises(DataNotFoundError, match="cannot be downloaded"):
        get_estimator(save_dir=str(tmp_path / "run"), **TINY)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "train.csv").write_text("1,2,3")
    with pytest.raises(DataNotFoundError, match=r"No MNIST data in data_dir.*train\.csv"):
        get_estimator(data_dir=str(tmp_path / "junk"), save_dir=str(tmp_path / "run2"), **TINY)


def test_cli_trains_mnist_vit(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3")
    # The `fastestimator` command users type; the same entry point through the interpreter if it is not on PATH.
    launcher = [shutil.which("fastestimator")] if shutil.which("fastestimator") else [sys.executable, "-m",
                                                                                      "fastestimator.cli.main"]
    cmd = launcher + ["train", "apphub_vit/mnist.py", "--warmup", "False",
                      "--dataset", "synthetic", "--synthetic_size", "[48,16]", "--epochs", "1", "--batch_size", "8",
                      "--train_steps_per_epoch", "2", "--eval_steps_per_epoch", "1", "--num_process", "0",
                      "--grid_size", "8", "--save_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FastEstimator-Finish" in proc.stdout
    assert (tmp_path / "mnist_vit_best_accuracy.pt").is_file() and (tmp_path / "prediction_grid.png").is_file()


# --- ResNet-18 -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_resnet18_file(tmp_path_factory):
    """A file in the format of torchvision's resnet18 ImageNet weights (random values: no download here). Its BN
    statistics are made non-trivial so that re-estimating them would show."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(model.state_dict(), path)
    return path


def test_resnet_frozen_backbone_is_really_frozen(tmp_path, fake_resnet18_file):
    from apphub_vit.resnet import get_estimator
    est = get_estimator(weights=str(fake_resnet18_file), dataset="synthetic", synthetic_size=[48, 24], image_size=32,
                        save_dir=str(tmp_path), **TINY)
    assert trainable_and_total(est.model) == (5130, 11181642)  # 512 * 10 + 10 trainable
    loaded = torch.load(fake_resnet18_file, weights_only=True)
    before = snapshot(est.model)
    assert all(torch.equal(before[k], v) for k, v in loaded.items() if not k.startswith("fc."))
    est.fit(warmup=False)
    after = est.model.state_dict()
    backbone = [k for k in before if not k.startswith("fc.")]
    changed = [k for k in backbone if not torch.equal(before[k], after[k])]
    assert changed == []  # weights and BatchNorm running statistics alike
    assert not torch.equal(before["fc.weight"], after["fc.weight"]) and after["fc.weight"].shape == (10, 512)
    assert grid_of(est).shown == 16 and (tmp_path / "prediction_grid.png").is_file()


def test_resnet_imagenet_weights_from_torch_hub_cache(offline_hub, fake_resnet18_file):
    offline_hub.mkdir(parents=True)
    (offline_hub / "resnet18-f37072fd.pth").write_bytes(fake_resnet18_file.read_bytes())
    model = resnet18_classifier(10, "imagenet")
    assert torch.equal(model.conv1.weight, torch.load(fake_resnet18_file, weights_only=True)["conv1.weight"])
    assert count_parameters(model)["trainable"] == 5130


def test_resnet_from_scratch_trains_everything(tmp_path):
    from apphub_vit.resnet import get_estimator
    est = get_estimator(weights=None, dataset="synthetic", synthetic_size=[48, 24], image_size=32,
                        save_dir=str(tmp_path), **TINY)
    trainable, total = trainable_and_total(est.model)
    assert trainable == total == 11181642
    before = snapshot(est.model)
    est.fit(warmup=False)
    after = est.model.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])


def test_resnet_missing_weights_is_a_clear_fast_error(tmp_path, offline_hub):
    from apphub_vit.resnet import get_estimator
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as err:
        get_estimator(dataset="synthetic", save_dir=str(tmp_path), **TINY)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert str(offline_hub / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message and "weights=None" in message
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resnet18_classifier(10, str(tmp_path / "missing.pth"))
    (tmp_path / "broken.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsNotFoundError, match="Cannot read resnet18 weights"):
        resnet18_classifier(10, str(tmp_path / "broken.pth"))
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ValueError, match="not torchvision resnet18 ImageNet weights"):
        resnet18_classifier(10, str(tmp_path / "resnet34.pth"))


def test_resnet_unknown_data_layout_is_a_clear_error(tmp_path):
    from apphub_vit.resnet import get_estimator
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "images.zip").write_bytes(b"")
    with pytest.raises(DataNotFoundError, match=r"No CIFAR-10 data in data_dir.*images\.zip"):
        get_estimator(weights=None, data_dir=str(tmp_path / "data"), save_dir=str(tmp_path / "run"), **TINY)


# --- ViT-B/16 ------------------------------------------------------------------------------------------------------


def test_vit_b16_full_size_parameter_counts():
    assert trainable_and_total(vit_b16_classifier(100, weights=None)) == (21340516, 85875556)


def test_vit_b16_trains_only_last_three_blocks_and_head(tmp_path):
    from apphub_vit.vit_b16 import get_estimator
    est = get_estimator(weights=None, dataset="synthetic", synthetic_size=[48, 24], save_dir=str(tmp_path),
                        **TINY_VIT_B, **TINY)
    trainable = {n for n, p in est.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.layers.encoder_layer_1.", "encoder.layers.encoder_layer_2.",
                                           "encoder.layers.encoder_layer_3.", "heads.head.")) for n in trainable)
    before = snapshot(est.model)
    est.fit(warmup=False)
    after = est.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every trainable tensor moved, nothing else did
    assert after["heads.head.weight"].shape == (100, 32)
    assert grid_of(est).shown == 16 and (tmp_path / "prediction_grid.png").is_file()


def test_vit_b16_weights_from_a_path(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.VisionTransformer(**TINY_VIT_B)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    model = vit_b16_classifier(100, str(tmp_path / "vit.pth"), **TINY_VIT_B)
    assert torch.equal(model.conv_proj.weight, source.conv_proj.weight)
    assert torch.equal(model.encoder.layers[0].mlp[0].weight, source.encoder.layers[0].mlp[0].weight)


def test_vit_b16_missing_weights_is_a_clear_error(tmp_path, offline_hub):
    from apphub_vit.vit_b16 import get_estimator
    with pytest.raises(WeightsNotFoundError, match=r"vit_b_16.*vit_b_16-c867db91\.pth"):
        get_estimator(dataset="synthetic", save_dir=str(tmp_path), **TINY)


# --- Autoencoder ---------------------------------------------------------------------------------------------------


def test_autoencoder_learns_and_writes_codes(tmp_path):
    from apphub_vit.autoencoder import get_estimator
    est = get_estimator(epochs=2, batch_size=32, dataset="synthetic", synthetic_size=[320, 64], save_dir=str(tmp_path),
                        num_process=0, log_steps=None)
    enc_before, dec_before = snapshot(est.encoder), snapshot(est.decoder)
    x = torch.from_numpy(mnist_data.make_synthetic_digits(64, seed=1)["x"].reshape(64, 784) / 255.0).float()
    with torch.no_grad():
        mse_before = torch.mean((est.decoder(est.encoder(x)) - x)**2).item()
    est.fit(warmup=False)
    with torch.no_grad():
        code = est.encoder(x)
        mse_after = torch.mean((est.decoder(code) - x)**2).item()
    assert code.shape == (64, 3)
    assert mse_after < 0.8 * mse_before
    assert any(not torch.equal(v, est.encoder.state_dict()[k]) for k, v in enc_before.items())
    assert any(not torch.equal(v, est.decoder.state_dict()[k]) for k, v in dec_before.items())
    codes = np.load(tmp_path / "mnist_codes.npz")
    assert codes["code"].shape == (64, 3) and codes["y"].shape == (64, )
    assert (tmp_path / "mnist_encoder_best_mse.pt").is_file() and (tmp_path / "mnist_decoder_best_mse.pt").is_file()
