"""torchvision's ViT-B/16 with its last three encoder blocks finetuned on CIFAR-100, as FastEstimator ops.

The recipe (a common partial-finetuning baseline, reported at 80.3% on CIFAR-100): `vit_b_16` (Dosovitskiy et al.
2021) with IMAGENET1K_V1 weights, every parameter frozen except the last 3 encoder blocks and a new 100-class head
(21,340,516 trainable of 85,875,556), images resized to 224 and normalized with the ImageNet mean / std, train-time
horizontal flip and rotation up to 10 degrees, Adam 1e-3, batch 64, 5 epochs.

    fastestimator train apphub_vit/vit_b16.py --data_dir ~/data                  # a local cifar-100-python
    fastestimator train apphub_vit/vit_b16.py --weights /path/vit_b_16-c867db91.pth

ImageNet weights come from the torch hub cache (`torch.hub.get_dir()/checkpoints/vit_b_16-c867db91.pth`) or the path
given; offline without them the app stops at once saying which file to put where. The architecture arguments
(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim) build smaller VisionTransformers of the same code
for quick runs (with weights=None); with ImageNet weights only image_size may change (position embeddings are
interpolated).
"""
from typing import List, Optional

import fastestimator as fe

from apphub_vit.baseline_app import build_classifier_estimator
from networks.baselines import vit_b16_classifier


def get_estimator(epochs: int = 5,
                  batch_size: int = 64,
                  train_steps_per_epoch: Optional[int] = None,
                  eval_steps_per_epoch: Optional[int] = None,
                  save_dir: Optional[str] = None,
                  data_dir: Optional[str] = None,
                  dataset: str = "cifair100",
                  weights: Optional[str] = "imagenet",
                  trainable_blocks: int = 3,
                  image_size: int = 224,
                  patch_size: int = 16,
                  num_layers: int = 12,
                  num_heads: int = 12,
                  hidden_dim: int = 768,
                  mlp_dim: int = 3072,
                  lr: float = 1e-3,
                  grid_size: int = 16,
                  overwrite: bool = False,
                  num_process: Optional[int] = None,
                  log_steps: int = 100,
                  synthetic_size: Optional[List[int]] = None,
                  weights_path: Optional[str] = None,
                  resume: bool = False,
                  seed: Optional[int] = None) -> fe.Estimator:
    """The ViT-B/16 baseline Estimator.

    Args:
        epochs: Training epochs.
        batch_size: Images per step.
        train_steps_per_epoch: Cap on steps per epoch (None: the whole training set).
        eval_steps_per_epoch: Cap on eval steps (None: the whole eval set).
        save_dir: Output folder (None: a new `runs/vit_b16-<time>`).
        data_dir: A local folder with CIFAR-100 / ciFAIR-100 (see `apphub_vit.data`).
        dataset: "cifair100" (real) or "synthetic" (generated, no download).
        weights: "imagenet" (torchvision IMAGENET1K_V1 from the torch hub cache), a path to that file, or None
            (random initialization; still only the last blocks and head train).
        trainable_blocks: Encoder blocks finetuned, counted from the top.
        image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim: The VisionTransformer (defaults: B/16).
        lr: Adam learning rate.
        grid_size: Eval images in prediction_grid.png.
        overwrite: Replace outputs an earlier run left in save_dir (otherwise the run refuses to start).
        num_process: Pipeline worker processes (None: FastEstimator's default, one per CPU; 0: in the main process).
        log_steps: Log the training loss every this many steps.
        synthetic_size: [train, eval] image counts for dataset="synthetic" (default 50,000 / 10,000).
        weights_path: A model this app saved (its `*_best_accuracy.pt`) to start from, e.g. for `fastestimator test`.
        resume, seed: As `apphub_vit.pretrain.get_estimator`.
    """
    def model_fn():
        return vit_b16_classifier(100, weights, trainable_blocks=trainable_blocks, image_size=image_size,
                                  patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
                                  hidden_dim=hidden_dim, mlp_dim=mlp_dim)

    return build_classifier_estimator(
        model_name="vit_b16", model_fn=model_fn, num_classes=100, dataset=dataset, data_dir=data_dir, epochs=epochs,
        batch_size=batch_size, train_steps_per_epoch=train_steps_per_epoch,
        eval_steps_per_epoch=eval_steps_per_epoch, save_dir=save_dir,
        image_size=image_size, augment=True, lr=lr, overwrite=overwrite, grid_size=grid_size,
        num_process=num_process, log_steps=log_steps, synthetic_size=synthetic_size, weights_path=weights_path,
        resume=resume, seed=seed)


if __name__ == "__main__":
    get_estimator().fit()
