"""The estimator the two ImageNet-pretrained baselines (resnet.py, vit_b16.py) build: CIFAR data through the
ImageNet pipeline, a torchvision classifier trained with Adam on its unfrozen parameters, in FastEstimator's apphub
order (pipeline, network, estimator).
"""
from typing import Callable, List, Optional

import fastestimator as fe
import torch
from fastestimator.op.tensorop.loss import CrossEntropy
from fastestimator.op.tensorop.model import ModelOp, UpdateOp
from fastestimator.trace.io import BestModelSaver
from fastestimator.trace.metric import Accuracy

from apphub_vit.common import ensure_outputs_free
from apphub_vit.data import class_names, load_cifar
from apphub_vit.prediction_grid import GRID_FILE, PredictionGrid
from apphub_vit.records import RECORD_FILE, RunRecorder
from networks.baselines import adam_on_trainable, count_parameters
from pipelines.imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_pipeline


def build_classifier_estimator(*, model_name: str, model_fn: Callable[[], torch.nn.Module], num_classes: int,
                               dataset: str, data_dir: Optional[str], epochs: int, batch_size: int,
                               train_steps_per_epoch: Optional[int], eval_steps_per_epoch: Optional[int],
                               save_dir: str, image_size: int, augment: bool, lr: float, overwrite: bool,
                               grid_size: int = 16, num_process: Optional[int] = None, log_steps: int = 100,
                               synthetic_size: Optional[List[int]] = None) -> fe.Estimator:
    """A FastEstimator Estimator training `model_fn()` on CIFAR-`num_classes` resized to `image_size`."""
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    ensure_outputs_free(save_dir, [f"{model_name}_best_accuracy.pt", GRID_FILE, RECORD_FILE], overwrite)
    sizes = {} if synthetic_size is None else {"num_train": synthetic_size[0], "num_eval": synthetic_size[1]}
    # Build the model before loading data: missing weights should fail in seconds, not after reading CIFAR.
    model = fe.build(model_fn=model_fn, optimizer_fn=adam_on_trainable(lr), model_name=model_name)
    trainable, total = count_parameters(model)
    print(f"{model_name}: {trainable:,} trainable of {total:,} parameters")

    # 1. pipeline
    train_data, eval_data = load_cifar(num_classes, dataset, data_dir, **sizes)
    pipeline = imagenet_pipeline(train_data, eval_data, batch_size=batch_size, image_size=image_size, augment=augment,
                                 num_process=num_process)

    # 2. network
    network = fe.Network(ops=[
        ModelOp(model=model, inputs="x", outputs="y_pred"),
        CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True),
        UpdateOp(model=model, loss_name="ce")
    ])

    # 3. estimator
    traces = [
        Accuracy(true_key="y", pred_key="y_pred"),
        BestModelSaver(model=model, save_dir=save_dir, metric="accuracy", save_best_mode="max"),
        PredictionGrid("x", "y", "y_pred", class_names(num_classes, dataset), save_dir, n=grid_size,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD),
        RunRecorder(model_name, save_dir, f"synthetic CIFAR-{num_classes}" if dataset == "synthetic" else dataset,
                    hparams=dict(num_classes=num_classes, data_dir=data_dir, epochs=epochs, batch_size=batch_size,
                                 lr=lr, image_size=image_size, augment=augment, synthetic_size=synthetic_size),
                    models=[model], overwrite=overwrite)
    ]
    estimator = fe.Estimator(pipeline=pipeline, network=network, epochs=epochs, traces=traces,
                             train_steps_per_epoch=train_steps_per_epoch, eval_steps_per_epoch=eval_steps_per_epoch,
                             log_steps=log_steps)
    estimator.model = model
    estimator.config = {"num_classes": num_classes, "dataset": dataset, "data_dir": data_dir,
                        "image_size": image_size, "trainable_parameters": trainable, "parameters": total}
    return estimator
