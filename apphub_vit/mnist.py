"""A Vision Transformer on MNIST, as FastEstimator ops, with this project's `ViTModel`.

Two recipes (`apphub_vit.recipes.MNIST_RECIPES`; pick with ``recipe=``, override any field by name):

* ``"reference"``: the small MNIST ViT of the "ViT from scratch on MNIST" tutorials (e.g. Brian Pulfer, "Vision
  Transformers from Scratch (PyTorch)", and its many variants), which reports 98.5% on the MNIST test set after
  training on all 60,000 training images: 28x28x1 input, 7x7 patches (16 tokens + CLS), embedding 64, 3 post-norm
  layers, 8 heads, MLP 2048, Adam lr 3e-4 with weight decay 1e-4, batch 128, 15 epochs, no augmentation.
* ``"small_data"`` (the default): the same patches, width, depth and heads, made to learn from 8,000 images on a
  CPU: MLP 256 (a training step with MLP 2048 takes about 4x as long on a CPU), pre-norm blocks, AdamW lr 2e-3 with
  weight decay 0.05, 2 warmup epochs then a cosine decay to 1e-6, label smoothing 0.1, random shift (10%), scale
  (0.9-1.1) and rotation (10 degrees) of the training digits, batch 128, 30 epochs. It reaches >= 97% on the last
  2,000 of the real MNIST test images when trained on the first 8,000, in minutes on a 2-core CPU
  (`benchmarks/mnist_accuracy.py`; measurements in docs/results-cifar10.md, "Also measured").

On a GPU the app runs bf16 autocast on `DeviceNetwork` and replays each train step as a CUDA graph; `compile` is off by
default, as the model is small and a run short.

    fastestimator train apphub_vit/mnist.py                                        # FastEstimator's loader (downloads)
    fastestimator train apphub_vit/mnist.py --data_dir ../shared/data/mnist        # local IDX files / mnist.npz
    fastestimator train apphub_vit/mnist.py --data_dir ../shared/data/mnist --recipe reference   # the tutorials'
    fastestimator train apphub_vit/mnist.py --dataset synthetic --epochs 2         # rendered digits, no download

A folder with only the 10,000 test images is split in order: first 8,000 train, last 2,000 eval (the app says so).
The run writes the best model by eval accuracy (`mnist_vit_best_accuracy.pt`) and `prediction_grid.png`.
"""
from dataclasses import asdict
from typing import Any, List, Optional

import fastestimator as fe
from fastestimator.trace.adapt import LRScheduler
from fastestimator.trace.metric import Accuracy

from apphub_vit import options
from apphub_vit.common import best_model_file, finish_estimator, load_weights, run_options, start_run, synthetic_sizes
from apphub_vit.hardware import resolve_hardware
from apphub_vit.mnist_data import MNIST_MEAN, MNIST_STD, load_mnist, mnist_class_names
from apphub_vit.prediction_grid import GRID_FILE, PredictionGrid
from apphub_vit.recipes import MNIST_AUGMENTS, MNIST_RECIPES, RecipeBook
from apphub_vit.training import build_vit, classifier_network, lr_schedule
from pipelines.mnist import mnist_pipeline

MODEL_NAME = "mnist_vit"
# what the CIFAR apps' teacher, batched augmentation and eval ops do: the MNIST app has none of them
BOOK = RecipeBook("mnist", MNIST_RECIPES, MNIST_AUGMENTS,
                  fixed=("mix_prob", "distill", "teacher_epochs", "distill_head", "guide", "ema", "tta"))


def get_estimator(recipe: str = "small_data",
                  epochs: Optional[int] = None,
                  batch_size: Optional[int] = None,
                  train_steps_per_epoch: Optional[int] = None,
                  eval_steps_per_epoch: Optional[int] = None,
                  save_dir: Optional[str] = None,
                  data_dir: Optional[str] = None,
                  dataset: str = "mnist",
                  weights_path: Optional[str] = None,
                  grid_size: int = 16,
                  precision: Optional[str] = None,
                  compile: bool = False,
                  cuda_graph: Optional[bool] = None,
                  num_process: Optional[int] = None,
                  log_steps: int = 100,
                  overwrite: bool = False,
                  resume: bool = False,
                  seed: Optional[int] = None,
                  synthetic_size: Optional[List[int]] = None,
                  **overrides: Any) -> fe.Estimator:
    """The MNIST ViT Estimator.

    Args:
        recipe: "small_data" (default: 8,000 real training digits reach >= 97% in minutes on a CPU) or "reference"
            (the tutorials' recipe).
        epochs, batch_size: None: the recipe's (the learning rate scales linearly with the batch).
        train_steps_per_epoch, eval_steps_per_epoch: Caps on steps per epoch (None: the whole data set).
        save_dir: Output folder (None: a new `runs/mnist-<time>`).
        data_dir: A local folder with MNIST IDX files or mnist.npz (see `apphub_vit.mnist_data`).
        dataset: "mnist" (real digits) or "synthetic" (rendered digits, no download).
        weights_path: A saved model (`mnist_vit_best_accuracy.pt`) to start from, e.g. for `fastestimator test`.
        grid_size: Eval images in prediction_grid.png.
        precision, cuda_graph, num_process, log_steps, overwrite, resume, seed, synthetic_size: As
            `apphub_vit.pretrain` (synthetic default 8,000 / 2,000 digits).
        compile: `torch.compile` the model (off by default).
        **overrides: Any recipe field by name (`apphub_vit.recipes.Recipe`, its model's fields), e.g. lr=1e-3,
            augment="none", ff_dim=128.
    """
    run = run_options(epochs, batch_size, train_steps_per_epoch, eval_steps_per_epoch, log_steps, synthetic_size)
    resolved, applied = BOOK.resolve(recipe, {**overrides, **{k: run[k] for k in ("epochs", "batch_size")
                                                              if run[k] is not None}})
    grid_size = options.positive_int("grid_size", grid_size)
    hw = resolve_hardware(resolved, device_augment=False, precision=precision, compile=compile,
                          num_process=num_process, cuda_graph=cuda_graph)
    folder = start_run("mnist", save_dir, [best_model_file(MODEL_NAME, "accuracy"), GRID_FILE], overwrite, resume, seed)
    save_dir = folder.save_dir
    model = build_vit(MODEL_NAME, 10, resolved, hw,
                      init=None if weights_path is None else lambda m: load_weights(m, weights_path))

    # 1. pipeline: the held-out digits are both the eval and the test data
    train_data, eval_data = load_mnist(dataset, data_dir, **synthetic_sizes(run["synthetic_size"]))
    pipeline = mnist_pipeline(train_data, eval_data, batch_size=resolved.batch_size, test_data=eval_data,
                              num_process=hw.num_process, augment=resolved.augment == "shift_scale_rotate")

    # 2. network
    network = classifier_network(model, [], 10, resolved, hw)

    # 3. estimator
    steps_per_epoch = run["train_steps_per_epoch"] or -(-len(train_data) // resolved.batch_size)
    schedule = lr_schedule(resolved, steps_per_epoch)
    config = {"recipe": asdict(resolved), "overrides": applied, "hardware": asdict(hw), "dataset": dataset,
              "data_dir": data_dir, "weights_path": weights_path, "num_train": len(train_data),
              "num_eval": len(eval_data), **{k: v for k, v in run.items() if k not in ("epochs", "batch_size")}}
    return finish_estimator(
        pipeline=pipeline, network=network, models=[model], app=MODEL_NAME, folder=folder,
        dataset="MNIST" if dataset == "mnist" else "synthetic digits", hparams=config, epochs=resolved.epochs,
        train_steps_per_epoch=run["train_steps_per_epoch"], eval_steps_per_epoch=run["eval_steps_per_epoch"],
        log_steps=run["log_steps"], metrics=[Accuracy(true_key="y", pred_key="y_pred")],
        traces=([] if schedule is None else [LRScheduler(model=model, lr_fn=schedule)]) + [
            PredictionGrid("x", "y", "y_pred", mnist_class_names(), save_dir, n=grid_size, mean=MNIST_MEAN,
                           std=MNIST_STD)
        ], compiling=hw.compile)


if __name__ == "__main__":
    get_estimator().fit()
