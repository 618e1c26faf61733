"""`fastestimator test <app> --weights_path PATH`: every app evaluates a saved model on its test split (the held-out
split) and prints its test metrics, which equal the eval metrics the run recorded for that model."""
import re

import pytest

from apphub_vit import autoencoder, finetune, mnist, pretrain, resnet, vit_b16
from apphub_vit.records import RECORD_FILE, read_record
from tests.conftest import REPO, TINY_RUN, TINY_VIT, cli

# the whole held-out split in eval, as the test reads it all
MNIST_TINY = dict(dataset="synthetic", synthetic_size=[64, 32], epochs=1, batch_size=8, train_steps_per_epoch=2,
                  num_process=0)
CIFAR_TINY = dict(TINY_RUN, dataset="synthetic", eval_steps_per_epoch=None)
# app module, training arguments (from Python), the file its best model is saved to, the metrics its test prints
APPS = {
    "pretrain": (pretrain, dict(CIFAR_TINY, **TINY_VIT), "vit_pretrain_best_accuracy.pt", ("accuracy", "ce")),
    "finetune": (finetune, dict(CIFAR_TINY, from_scratch=True, **TINY_VIT), "vit_finetune_best_accuracy.pt",
                 ("accuracy", "ce")),
    "mnist": (mnist, dict(MNIST_TINY, num_layers=1, em_dim=16, num_heads=2, ff_dim=32), "mnist_vit_best_accuracy.pt",
              ("accuracy", "ce")),
    "autoencoder": (autoencoder, MNIST_TINY, ".", ("mse", )),
    "resnet": (resnet, dict(CIFAR_TINY, weights=None, image_size=32, batch_size=8), "resnet18_best_accuracy.pt",
               ("accuracy", "ce")),
    "vit_b16": (vit_b16, dict(CIFAR_TINY, weights=None, image_size=32, batch_size=8, patch_size=8, num_layers=2,
                              num_heads=2, hidden_dim=16, mlp_dim=32, trainable_blocks=1),
                "vit_b16_best_accuracy.pt", ("accuracy", "ce")),
}


def _cli_args(kwargs):
    args = []
    for key, value in kwargs.items():
        args += [f"--{key}", str(value).replace(" ", "")]
    return args


@pytest.mark.parametrize("name", list(APPS))
def test_fastestimator_test_prints_the_saved_models_test_metrics(tmp_path, name):
    module, kwargs, weights, metrics = APPS[name]
    trained = module.get_estimator(save_dir=str(tmp_path / "train"), **kwargs)
    trained.fit(warmup=False)
    recorded = read_record(str(tmp_path / "train" / RECORD_FILE))["eval"][-1]["metrics"]
    test_kwargs = {k: v for k, v in kwargs.items() if k not in ("epochs", "train_steps_per_epoch", "from_scratch")}
    out = cli(["test", str(REPO / "apphub_vit" / f"{name}.py")] + _cli_args(
        dict(test_kwargs, save_dir=tmp_path / "test", weights_path=tmp_path / "train" / weights)), tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("FastEstimator-Test"))
    for metric in metrics:
        value = float(re.search(rf"\b{metric}: ([-0-9.e]+)", line).group(1))
        assert value == pytest.approx(recorded[metric], rel=1e-4, abs=1e-6), (metric, line, recorded)
    assert not (tmp_path / "test" / RECORD_FILE).exists()  # testing writes no run record over anything
