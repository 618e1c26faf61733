"""A Vision Transformer on MNIST, as FastEstimator ops, with this project's `ViTModel`.

The recipe is the small MNIST ViT of the "ViT from scratch on MNIST" tutorials (e.g. Brian Pulfer, "Vision
Transformers from Scratch (PyTorch)", and its many variants), which reports 98.5% on the MNIST test set: 28x28x1
input, 7x7 patches (16 tokens + CLS), embedding 64, 3 layers, 8 heads, MLP 2048, Adam lr 3e-4 with weight decay 1e-4,
batch 128, 15 epochs. Our `ViTModel` embeds patches with a Conv2d of kernel = stride = 7, the same function as a
linear map of the flattened patches.

    fastestimator train apphub_vit/mnist.py                                        # FastEstimator's loader (downloads)
    fastestimator train apphub_vit/mnist.py --data_dir ../shared/data/mnist        # local IDX files / mnist.npz
    fastestimator train apphub_vit/mnist.py --dataset synthetic --epochs 2         # rendered digits, no download

A folder with only the 10,000 test images is split in order: first 8,000 train, last 2,000 eval (the app says so).
The run writes the best model by eval accuracy (`mnist_vit_best_accuracy.pt`) and `prediction_grid.png`.
"""
from typing import List, Optional

import fastestimator as fe
import torch
from fastestimator.op.tensorop.loss import CrossEntropy
from fastestimator.op.tensorop.model import ModelOp, UpdateOp
from fastestimator.trace.io import BestModelSaver
from fastestimator.trace.metric import Accuracy

from apphub_vit.common import ensure_outputs_free, resolve_save_dir
from apphub_vit.mnist_data import MNIST_MEAN, MNIST_STD, load_mnist, mnist_class_names
from apphub_vit.prediction_grid import GRID_FILE, PredictionGrid
from apphub_vit.records import RECORD_FILE, RunRecorder
from networks.vit import ViTConfig, ViTModel
from pipelines.mnist import mnist_pipeline

MODEL_NAME = "mnist_vit"


def get_estimator(epochs: int = 15,
                  batch_size: int = 128,
                  train_steps_per_epoch: Optional[int] = None,
                  eval_steps_per_epoch: Optional[int] = None,
                  save_dir: Optional[str] = None,
                  data_dir: Optional[str] = None,
                  dataset: str = "mnist",
                  lr: float = 3e-4,
                  weight_decay: float = 1e-4,
                  num_layers: int = 3,
                  em_dim: int = 64,
                  num_heads: int = 8,
                  ff_dim: int = 2048,
                  patch_size: int = 7,
                  drop: float = 0.1,
                  grid_size: int = 16,
                  overwrite: bool = False,
                  num_process: Optional[int] = None,
                  log_steps: int = 100,
                  synthetic_size: Optional[List[int]] = None) -> fe.Estimator:
    """The MNIST ViT Estimator.

    Args:
        epochs: Training epochs.
        batch_size: Images per step.
        train_steps_per_epoch: Cap on steps per epoch (None: the whole training set).
        eval_steps_per_epoch: Cap on eval steps (None: the whole eval set).
        save_dir: Output folder (None: a new `runs/mnist-<time>`).
        data_dir: A local folder with MNIST IDX files or mnist.npz (see `apphub_vit.mnist_data`).
        dataset: "mnist" (real digits) or "synthetic" (rendered digits, no download).
        lr: Adam learning rate.
        weight_decay: Adam weight decay (L2, as torch.optim.Adam applies it).
        num_layers, em_dim, num_heads, ff_dim, patch_size, drop: The ViT (defaults: the recipe's).
        grid_size: Eval images in prediction_grid.png.
        overwrite: Replace outputs an earlier run left in save_dir (otherwise the run refuses to start).
        num_process: Pipeline worker processes (None: FastEstimator's default, one per CPU; 0: in the main process).
        log_steps: Log the training loss every this many steps.
        synthetic_size: [train, eval] image counts for dataset="synthetic" (default 8,000 / 2,000).
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    cfg = ViTConfig(num_layers=num_layers, image_size=28, patch_size=patch_size, num_channels=1, em_dim=em_dim,
                    num_heads=num_heads, ff_dim=ff_dim, drop=drop)  # fails fast on e.g. a patch size not dividing 28
    save_dir = resolve_save_dir(save_dir, "mnist")
    ensure_outputs_free(save_dir, [f"{MODEL_NAME}_best_accuracy.pt", GRID_FILE, RECORD_FILE], overwrite)
    sizes = {} if synthetic_size is None else {"num_train": synthetic_size[0], "num_eval": synthetic_size[1]}

    # 1. pipeline
    train_data, eval_data = load_mnist(dataset, data_dir, **sizes)
    pipeline = mnist_pipeline(train_data, eval_data, batch_size=batch_size, num_process=num_process)

    # 2. network
    model = fe.build(model_fn=lambda: ViTModel.from_config(10, cfg),
                     optimizer_fn=lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
                     model_name=MODEL_NAME)
    network = fe.Network(ops=[
        ModelOp(model=model, inputs="x", outputs="y_pred"),
        CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True),
        UpdateOp(model=model, loss_name="ce")
    ])

    # 3. estimator
    traces = [
        Accuracy(true_key="y", pred_key="y_pred"),
        BestModelSaver(model=model, save_dir=save_dir, metric="accuracy", save_best_mode="max"),
        PredictionGrid("x", "y", "y_pred", mnist_class_names(), save_dir, n=grid_size, mean=MNIST_MEAN, std=MNIST_STD),
        RunRecorder(MODEL_NAME, save_dir, "MNIST" if dataset == "mnist" else "synthetic digits",
                    hparams=dict(model=cfg.__dict__.copy(), data_dir=data_dir, epochs=epochs, batch_size=batch_size,
                                 lr=lr, weight_decay=weight_decay, synthetic_size=synthetic_size),
                    models=[model], overwrite=overwrite)
    ]
    estimator = fe.Estimator(pipeline=pipeline, network=network, epochs=epochs, traces=traces,
                             train_steps_per_epoch=train_steps_per_epoch, eval_steps_per_epoch=eval_steps_per_epoch,
                             log_steps=log_steps)
    estimator.model = model
    estimator.config = {"model": cfg.__dict__.copy(), "dataset": dataset, "data_dir": data_dir,
                        "num_train": len(train_data), "num_eval": len(eval_data)}
    return estimator


if __name__ == "__main__":
    get_estimator().fit()
