"""Pretrain a Vision Transformer on CIFAR-100 (FastEstimator apphub `image_classification/vit/vit_torch.py`).

    fastestimator train apphub_vit/pretrain.py                                    # ciFAIR-100, downloads once
    fastestimator train apphub_vit/pretrain.py --data_dir ~/data                  # a local cifar-100-python folder
    fastestimator train apphub_vit/pretrain.py --dataset synthetic --epochs 2     # generated data, no download
    fastestimator train apphub_vit/pretrain.py --dataset cifar10_split_a --data_dir /tmp/c10   # 5 CIFAR-10 classes
    fastestimator train apphub_vit/pretrain.py --recipe apphub                    # the FastEstimator apphub's recipe
    fastestimator train apphub_vit/pretrain.py --lr 1e-3 --stem patch             # any recipe field, by name
    torchrun --nproc_per_node 4 -m apphub_vit.distributed pretrain --data_dir ~/data   # one process per GPU (README)

The run writes `<save_dir>/vit_encoder.pt` (the encoder at the end of training, for `finetune.py`), the best model
by eval accuracy (`vit_pretrain_best_accuracy.pt`, FastEstimator's BestModelSaver), `prediction_grid.png` and
`run_record.json`.
"""
from typing import Any, List, Optional

import fastestimator as fe
import torch

from apphub_vit.common import run_options
from apphub_vit.data import num_classes_of
from apphub_vit.vit_app import build_vit_estimator, resolve_vit_recipe, saved_architecture


def get_estimator(epochs: Optional[int] = None,
                  batch_size: Optional[int] = None,
                  train_steps_per_epoch: Optional[int] = None,
                  eval_steps_per_epoch: Optional[int] = None,
                  save_dir: Optional[str] = None,
                  data_dir: Optional[str] = None,
                  dataset: str = "cifair100",
                  recipe: str = "vit",
                  weights_path: Optional[str] = None,
                  device_augment: Optional[bool] = None,
                  precision: Optional[str] = None,
                  compile: Optional[bool] = None,
                  cuda_graph: Optional[bool] = None,
                  num_process: Optional[int] = None,
                  log_steps: int = 100,
                  overwrite: bool = False,
                  resume: bool = False,
                  seed: Optional[int] = None,
                  validation: int = 0,
                  synthetic_size: Optional[List[int]] = None,
                  **overrides: Any) -> fe.Estimator:
    """The pretraining Estimator: a 100-class ViT (5 on a CIFAR-10 split), saving its encoder at the end.

    Args:
        epochs: Training epochs (None: the recipe's, 100).
        batch_size: Images per step (None: the recipe's; the learning rate scales linearly with it).
        train_steps_per_epoch: Cap on steps per epoch (None: the whole training set).
        eval_steps_per_epoch: Cap on eval steps (None: the whole eval set); eval batches are the train batch on a
            CPU, 5,000 images on a GPU (`apphub_vit.hardware.GPU_EVAL_BATCH`).
        save_dir: Output folder (None: a new `runs/pretrain-<time>`).
        data_dir: A local folder with CIFAR-100 / ciFAIR-100, e.g. `cifar-100-python` (see `apphub_vit.data`).
        dataset: "cifair100" (real), "synthetic" (generated, no download), or "cifar10_split_a" / "cifar10_split_b"
            (five real CIFAR-10 classes from data_dir, a cifar-10-batches-py folder; see `apphub_vit.data`).
        recipe: "vit" (default, the best measured) or "apphub" (the seed's); see `apphub_vit.recipes`.
        weights_path: A saved model (`vit_pretrain_best_accuracy.pt`) to start from, e.g. for `fastestimator test`.
        device_augment: Run the augmentation batched where the model runs (None: yes) instead of per sample.
        precision: "fp32", "bf16" or "fp16" (None: bf16 on a GPU, fp32 on a CPU).
        compile: torch.compile the model (None: on a GPU only).
        cuda_graph: Replay each training step as a CUDA graph (None: on a GPU wherever the recipe allows it).
        num_process: Workers of the per-sample pipeline (None: FastEstimator's default).
        log_steps: Log the training loss every this many steps.
        overwrite: Replace what an earlier run left in save_dir (otherwise the run refuses to start).
        resume: Continue the run a kill interrupted in save_dir, from its last completed epoch (same command again,
            with resume=True).
        seed: Seed every random generator (`fe.enable_deterministic`) for a reproducible run.
        validation: Hold out the last this many training images (e.g. 5000 of 50,000) and evaluate, and pick the best
            model, on them instead of the test set: for choosing hyperparameters (0: train on all of them).
        synthetic_size: [train, eval] image counts for dataset="synthetic" (default 50,000 / 10,000).
        **overrides: Any recipe field by name (`apphub_vit.recipes.Recipe` and its model's `MODEL_FIELDS`), e.g.
            lr=1e-3, weight_decay=0.05, stem="patch", num_layers=9.
    """
    run = run_options(epochs, batch_size, train_steps_per_epoch, eval_steps_per_epoch, log_steps, synthetic_size)
    resolved, applied = resolve_vit_recipe("pretrain", recipe, run, {**saved_architecture(weights_path), **overrides})
    return build_vit_estimator(app="pretrain", num_classes=num_classes_of(dataset, 100), dataset=dataset,
                               data_dir=data_dir, recipe=resolved, overrides=applied, run=run, save_dir=save_dir,
                               overwrite=overwrite, device_augment=device_augment, precision=precision, compile=compile,
                               cuda_graph=cuda_graph, num_process=num_process, resume=resume, seed=seed,
                               validation=validation,
                               weights_path=weights_path,
                               save_encoder=True)


def pretrain(**kwargs: Any) -> torch.nn.Module:
    """Run pretraining (arguments as `get_estimator`) and return the trained 100-class (or 5-class) `ViTModel`."""
    estimator = get_estimator(**kwargs)
    estimator.fit(warmup=False)
    return estimator.model


if __name__ == "__main__":
    pretrain()
