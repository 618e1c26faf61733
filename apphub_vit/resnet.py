"""A frozen ImageNet ResNet-18 on CIFAR-10, as FastEstimator ops: the "ConvNet as fixed feature extractor" setup of
PyTorch's "Transfer learning for computer vision" tutorial, with this recipe's optimizer and data.

The recipe: torchvision `resnet18` with its IMAGENET1K_V1 weights (He et al. 2016), every parameter frozen, `fc`
replaced by a new 10-class layer and only that trained (Adam 1e-3, batch 32, 10 epochs), images resized to 224 and
normalized with the ImageNet mean / std. The frozen backbone's BatchNorm statistics stay frozen too
(`networks.baselines.ResNet18`). `weights=None` trains the same network from scratch with every layer trainable.

    fastestimator train apphub_vit/resnet.py --data_dir ~/data                   # a local cifar-10-batches-py
    fastestimator train apphub_vit/resnet.py --weights /path/resnet18-f37072fd.pth
    fastestimator train apphub_vit/resnet.py --weights None --dataset synthetic --image_size 64 --epochs 1

ImageNet weights come from the torch hub cache (`torch.hub.get_dir()/checkpoints/resnet18-f37072fd.pth`) or the
path given; offline without them the app stops at once saying which file to put where.
"""
from typing import List, Optional

import fastestimator as fe

from apphub_vit.baseline_app import build_classifier_estimator
from networks.baselines import resnet18_classifier


def get_estimator(epochs: int = 10,
                  batch_size: int = 32,
                  train_steps_per_epoch: Optional[int] = None,
                  eval_steps_per_epoch: Optional[int] = None,
                  save_dir: Optional[str] = None,
                  data_dir: Optional[str] = None,
                  dataset: str = "cifair10",
                  weights: Optional[str] = "imagenet",
                  freeze_backbone: Optional[bool] = None,
                  image_size: int = 224,
                  lr: float = 1e-3,
                  grid_size: int = 16,
                  overwrite: bool = False,
                  num_process: Optional[int] = None,
                  log_steps: int = 100,
                  synthetic_size: Optional[List[int]] = None,
                  weights_path: Optional[str] = None,
                  resume: bool = False,
                  seed: Optional[int] = None) -> fe.Estimator:
    """The ResNet-18 baseline Estimator.

    Args:
        epochs: Training epochs.
        batch_size: Images per step.
        train_steps_per_epoch: Cap on steps per epoch (None: the whole training set).
        eval_steps_per_epoch: Cap on eval steps (None: the whole eval set).
        save_dir: Output folder (None: a new `runs/resnet18-<time>`).
        data_dir: A local folder with CIFAR-10 / ciFAIR-10 (see `apphub_vit.data`).
        dataset: "cifair10" (real) or "synthetic" (generated, no download).
        weights: "imagenet" (torchvision IMAGENET1K_V1 from the torch hub cache), a path to that file, or None (from
            scratch).
        freeze_backbone: Train only the new fc. None: True with pretrained weights, False from scratch.
        image_size: Side the images are resized to (224 in the recipe; smaller is faster).
        lr: Adam learning rate.
        grid_size: Eval images in prediction_grid.png.
        overwrite: Replace outputs an earlier run left in save_dir (otherwise the run refuses to start).
        num_process: Pipeline worker processes (None: FastEstimator's default, one per CPU; 0: in the main process).
        log_steps: Log the training loss every this many steps.
        synthetic_size: [train, eval] image counts for dataset="synthetic" (default 50,000 / 10,000).
        weights_path: A model this app saved (its `*_best_accuracy.pt`) to start from, e.g. for `fastestimator test`.
        resume, seed: As `apphub_vit.pretrain.get_estimator`.
    """
    return build_classifier_estimator(
        model_name="resnet18", model_fn=lambda: resnet18_classifier(10, weights, freeze_backbone), num_classes=10,
        dataset=dataset, data_dir=data_dir, epochs=epochs, batch_size=batch_size,
        train_steps_per_epoch=train_steps_per_epoch, eval_steps_per_epoch=eval_steps_per_epoch,
        save_dir=save_dir, image_size=image_size, augment=False, lr=lr,
        overwrite=overwrite, grid_size=grid_size, num_process=num_process, log_steps=log_steps,
        synthetic_size=synthetic_size, weights_path=weights_path, resume=resume, seed=seed)


if __name__ == "__main__":
    get_estimator().fit()
