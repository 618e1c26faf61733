"""The estimator the two ImageNet-pretrained baselines (resnet.py, vit_b16.py) build: CIFAR data through the
ImageNet pipeline, a torchvision classifier trained with Adam on its unfrozen parameters, in FastEstimator's apphub
order (pipeline, network, estimator).
"""
from typing import Any, Callable, List, Optional

import fastestimator as fe
import torch
from fastestimator.op.tensorop.loss import CrossEntropy
from fastestimator.op.tensorop.model import ModelOp, UpdateOp
from fastestimator.trace.metric import Accuracy

from apphub_vit import options
from apphub_vit.common import best_model_file, finish_estimator, load_weights, run_options, start_run, synthetic_sizes
from apphub_vit.data import class_names, load_cifar
from apphub_vit.prediction_grid import GRID_FILE, PredictionGrid
from apphub_vit.runs import build_model
from networks.baselines import adam_on_trainable
from networks.util import count_parameters
from pipelines.imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_pipeline


def build_classifier_estimator(*, model_name: str, model_fn: Callable[[], torch.nn.Module], num_classes: int,
                               dataset: str, data_dir: Optional[str], epochs: int, batch_size: int,
                               train_steps_per_epoch: Optional[int], eval_steps_per_epoch: Optional[int],
                               save_dir: Optional[str], image_size: int, augment: bool, lr: float, overwrite: Any,
                               grid_size: int = 16, num_process: Optional[int] = None, log_steps: int = 100,
                               synthetic_size: Optional[List[int]] = None, weights_path: Optional[str] = None,
                               resume: Any = False, seed: Optional[int] = None,
                               hparams: Optional[dict] = None) -> fe.Estimator:
    """A FastEstimator Estimator training `model_fn()` on CIFAR-`num_classes` resized to `image_size`; weights_path: a
    saved model of this app to start from (e.g. for `fastestimator test`)."""
    run = run_options(epochs, batch_size, train_steps_per_epoch, eval_steps_per_epoch, log_steps, synthetic_size)
    lr = options.number("lr", lr, low_open=True)
    image_size, grid_size = options.positive_int("image_size", image_size), options.positive_int("grid_size", grid_size)
    folder = start_run(model_name, save_dir, [best_model_file(model_name, "accuracy"), GRID_FILE], overwrite, resume,
                       seed)
    save_dir = folder.save_dir

    def build() -> torch.nn.Module:
        model = model_fn()
        if weights_path is not None:
            load_weights(model, weights_path)
        return model

    # The model before the data: missing weights should fail in seconds, not after reading CIFAR.
    model = build_model(model_fn=build, optimizer_fn=adam_on_trainable(lr), model_name=model_name)
    count = count_parameters(model)
    print(f"{model_name}: {count['trainable']:,} trainable of {count['total']:,} parameters")

    # 1. pipeline: the held-out split is both the eval and the test data
    train_data, eval_data = load_cifar(num_classes, dataset, data_dir, **synthetic_sizes(run["synthetic_size"]))
    pipeline = imagenet_pipeline(train_data, eval_data, batch_size=run["batch_size"], image_size=image_size,
                                 augment=augment, num_process=num_process, test_data=eval_data)

    # 2. network
    network = fe.Network(ops=[
        ModelOp(model=model, inputs="x", outputs="y_pred"),
        CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True),
        UpdateOp(model=model, loss_name="ce")
    ])

    # 3. estimator
    config = dict(num_classes=num_classes, dataset=dataset, data_dir=data_dir, epochs=run["epochs"],
                  batch_size=run["batch_size"], lr=lr, image_size=image_size, augment=augment,
                  synthetic_size=run["synthetic_size"], weights_path=weights_path,
                  trainable_parameters=count["trainable"], parameters=count["total"], **(hparams or {}))
    return finish_estimator(
        pipeline=pipeline, network=network, models=[model], app=model_name, folder=folder,
        dataset=f"synthetic CIFAR-{num_classes}" if dataset == "synthetic" else dataset, hparams=config,
        epochs=run["epochs"], train_steps_per_epoch=run["train_steps_per_epoch"],
        eval_steps_per_epoch=run["eval_steps_per_epoch"], log_steps=run["log_steps"],
        metrics=[Accuracy(true_key="y", pred_key="y_pred")], traces=[
            PredictionGrid("x", "y", "y_pred", class_names(num_classes, dataset), save_dir, n=grid_size,
                           mean=IMAGENET_MEAN, std=IMAGENET_STD)
        ])
