"""The estimator both ViT apps build: pipeline, network, estimator, in FastEstimator's apphub order.

`pretrain.py` (CIFAR-100, 100 classes, saves the encoder) and `finetune.py` (CIFAR-10, 10 classes, loads an encoder)
differ only in the arguments they pass here.
"""
from dataclasses import asdict
from typing import Any, Callable, List, Optional

import fastestimator as fe
import torch
from fastestimator.op.tensorop.loss import CrossEntropy
from fastestimator.op.tensorop.model import ModelOp, UpdateOp
from fastestimator.trace import Trace
from fastestimator.trace.io import BestModelSaver
from fastestimator.trace.metric import Accuracy

from apphub_vit.common import ensure_outputs_free
from apphub_vit.data import load_cifar
from apphub_vit.encoder_io import ENCODER_FILE, EncoderSaver
from networks.vit import ViTConfig, ViTModel
from pipelines.cifar import cifar_pipeline


def apphub_optimizer(lr: float = 0.01) -> Callable[[Any], torch.optim.Optimizer]:
    """The apphub's optimizer: SGD with momentum 0.9 and weight decay 1e-4."""
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


def build_vit_estimator(*, model_name: str, num_classes: int, dataset: str, data_dir: Optional[str], epochs: int,
                        batch_size: int, train_steps_per_epoch: Optional[int], eval_steps_per_epoch: Optional[int],
                        save_dir: str, cfg: ViTConfig, lr: float, overwrite: bool,
                        init_model: Optional[Callable[[torch.nn.Module], None]] = None, save_encoder: bool = False,
                        num_process: Optional[int] = None, log_steps: int = 100,
                        synthetic_size: Optional[List[int]] = None) -> fe.Estimator:
    """A FastEstimator Estimator training a `ViTModel` on a CIFAR-shaped task with the apphub recipe."""
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    outputs = [f"{model_name}_best_accuracy.pt"] + ([ENCODER_FILE] if save_encoder else [])
    ensure_outputs_free(save_dir, outputs, overwrite)
    sizes = {} if synthetic_size is None else {"num_train": synthetic_size[0], "num_eval": synthetic_size[1]}

    # 1. pipeline
    train_data, eval_data = load_cifar(num_classes, dataset, data_dir, **sizes)
    pipeline = cifar_pipeline(train_data, eval_data, batch_size=batch_size, num_process=num_process)

    # 2. network
    def model_fn() -> ViTModel:
        model = ViTModel.from_config(num_classes, cfg)
        if init_model is not None:
            init_model(model)
        return model

    model = fe.build(model_fn=model_fn, optimizer_fn=apphub_optimizer(lr), model_name=model_name)
    network = fe.Network(ops=[
        ModelOp(model=model, inputs="x", outputs="y_pred"),
        CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True),
        UpdateOp(model=model, loss_name="ce")
    ])

    # 3. estimator
    traces: List[Trace] = [
        Accuracy(true_key="y", pred_key="y_pred"),
        BestModelSaver(model=model, save_dir=save_dir, metric="accuracy", save_best_mode="max")
    ]
    if save_encoder:
        traces.append(EncoderSaver(model, save_dir, overwrite=overwrite))
    estimator = fe.Estimator(pipeline=pipeline, network=network, epochs=epochs, traces=traces,
                             train_steps_per_epoch=train_steps_per_epoch, eval_steps_per_epoch=eval_steps_per_epoch,
                             log_steps=log_steps)
    estimator.model = model  # handy for pretrain() / finetune(), which return it
    estimator.config = {"model": asdict(cfg), "num_classes": num_classes, "dataset": dataset, "data_dir": data_dir}
    return estimator
