"""Finetune a pretrained ViT encoder on CIFAR-10 (FastEstimator apphub `image_classification/vit/vit_torch.py`).

    fastestimator train apphub_vit/finetune.py --encoder_weights runs/pretrain-.../vit_encoder.pt --epochs 1
    fastestimator train apphub_vit/finetune.py --from_scratch True                 # the same ViT, no pretraining
    fastestimator train apphub_vit/finetune.py --encoder_weights ... --data_dir ~/data   # cifar-10-batches-py here

Unlike the apphub, the head has 10 classes. The architecture is read from the encoder file (or model) unless given;
a given architecture that differs from the pretrained one is an error naming the difference.
"""
from dataclasses import asdict
from typing import List, Optional, Union

import fastestimator as fe
import torch

from apphub_vit.common import resolve_save_dir
from apphub_vit.encoder_io import load_encoder, load_encoder_state
from apphub_vit.vit_app import build_vit_estimator, model_config
from networks.vit import ViTConfig, ViTModel

_ARCH = ("num_layers", "em_dim", "num_heads", "ff_dim", "patch_size", "norm_first", "pool", "lsa", "spt")


def get_estimator(epochs: int = 1,
                  batch_size: Optional[int] = None,
                  train_steps_per_epoch: Optional[int] = None,
                  eval_steps_per_epoch: Optional[int] = None,
                  save_dir: Optional[str] = None,
                  data_dir: Optional[str] = None,
                  dataset: str = "cifair10",
                  encoder_weights: Union[None, str, torch.nn.Module] = None,
                  from_scratch: bool = False,
                  recipe: str = "vit",
                  lr: Optional[float] = None,
                  weight_decay: Optional[float] = None,
                  warmup_epochs: Optional[float] = None,
                  weight_init: Optional[str] = None,
                  label_smoothing: Optional[float] = None,
                  decay_all: Optional[bool] = None,
                  num_layers: Optional[int] = None,
                  em_dim: Optional[int] = None,
                  num_heads: Optional[int] = None,
                  ff_dim: Optional[int] = None,
                  patch_size: Optional[int] = None,
                  norm_first: Optional[bool] = None,
                  pool: Optional[str] = None,
                  lsa: Optional[bool] = None,
                  spt: Optional[bool] = None,
                  drop: Optional[float] = None,
                  drop_path: Optional[float] = None,
                  strong_augment: Optional[bool] = None,
                  augment_policy: Optional[str] = None,
                  mix_prob: Optional[float] = None,
                  repeated_aug: int = 1,
                  refine_epochs: int = 0,
                  device_augment: Optional[bool] = None,
                  precision: Optional[str] = None,
                  compile: Optional[bool] = None,
                  cuda_graph: Optional[bool] = None,
                  overwrite: bool = False,
                  num_process: Optional[int] = None,
                  log_steps: int = 100,
                  synthetic_size: Optional[List[int]] = None) -> fe.Estimator:
    """The finetuning Estimator: a 10-class ViT whose encoder starts from `encoder_weights`.

    Args:
        epochs: Training epochs (the apphub finetunes for 1).
        batch_size: Images per step (None: 512 on a GPU, 128 on a CPU).
        train_steps_per_epoch: Cap on steps per epoch (None: the whole training set).
        eval_steps_per_epoch: Cap on eval steps (None: the whole eval set).
        save_dir: Output folder (None: a new `runs/finetune-<time>`).
        data_dir: A local folder with CIFAR-10 / ciFAIR-10, e.g. `cifar-10-batches-py` (see `apphub_vit.data`).
        dataset: "cifair10" (real) or "synthetic" (generated, no download).
        encoder_weights: `vit_encoder.pt` from pretraining, a ViTModel checkpoint, or a model in memory.
        from_scratch: Train without pretrained weights (for comparison); excludes encoder_weights.
        recipe: "vit" or "apphub", as in pretraining (see `apphub_vit.vit_app`).
        lr: Peak learning rate (None: the recipe's, scaled linearly with batch_size).
        weight_decay: The optimizer's weight decay (None: the recipe's, 0.2 for "vit", 1e-4 for "apphub").
        warmup_epochs: Epochs of linear warmup before the cosine decay, recipe "vit" only (None: 10; at most a fifth
            of the run).
        weight_init: "torch" (PyTorch's per-layer defaults) or "trunc_normal" (timm's and CCT's: linear weights from
            a normal of std 0.02, zero biases); None: the recipe's ("torch"), which scored higher on CIFAR-10.
        label_smoothing, decay_all: As in `apphub_vit.pretrain.get_estimator`.
        num_layers, em_dim, num_heads, ff_dim, patch_size, norm_first, pool, lsa, spt: The ViT; None takes the
            pretrained one's (or the apphub's size, the recipe's norm placement, no LSA and no SPT when from scratch).
            `lsa`, `spt`: Lee et al.'s Locality Self-Attention and Shifted Patch Tokenization, as in
            `apphub_vit.pretrain.get_estimator`.
        drop, drop_path: Dropout and stochastic depth while finetuning (None: the recipe's).
        strong_augment, augment_policy, mix_prob, repeated_aug, refine_epochs, device_augment, precision, compile,
            cuda_graph: As in `apphub_vit.pretrain.get_estimator`.
        overwrite: Replace weights an earlier run left in save_dir (otherwise the run refuses to start).
        num_process: Pipeline worker processes (None: 8 on a GPU host, else FastEstimator's default).
        log_steps: Log the training loss every this many steps.
        synthetic_size: [train, eval] image counts for dataset="synthetic" (default 50,000 / 10,000).
    """
    if from_scratch and encoder_weights is not None:
        raise ValueError("Both from_scratch=True and encoder_weights were given: pick one (finetune the pretrained "
                         "encoder, or train the same ViT from scratch for comparison).")
    if not from_scratch and encoder_weights is None:
        raise ValueError("finetune needs pretrained encoder weights: pass encoder_weights=<save_dir of pretraining>/"
                         "vit_encoder.pt (--encoder_weights PATH), or from_scratch=True (--from_scratch True) to train "
                         "without them.")
    given = {k: v for k, v in dict(num_layers=num_layers, em_dim=em_dim, num_heads=num_heads, ff_dim=ff_dim,
                                   patch_size=patch_size, norm_first=norm_first, pool=pool, lsa=lsa,
                                   spt=spt).items() if v is not None}
    # the apphub's size; norm placement and pooling come from the recipe (see model_config) unless given or pretrained
    arch = {k: v for k, v in asdict(ViTConfig()).items() if k in _ARCH and k not in ("norm_first", "pool")}
    if encoder_weights is not None:
        pretrained = load_encoder_state(encoder_weights)  # reads the file once, fails fast on a bad path
        if pretrained["config"] is not None:
            # encoder files from before the pool option held CLS-token encoders
            arch.update({"pool": "cls", **{k: v for k, v in pretrained["config"].items() if k in _ARCH}})
        encoder_weights = pretrained  # a dict in load_encoder's own format
    arch.update(given)
    cfg = model_config(recipe, arch.pop("norm_first", None), drop, drop_path, **arch)
    init = None
    if encoder_weights is not None:
        load_encoder(ViTModel.from_config(10, cfg), encoder_weights)  # a mismatch fails here, before data loads
        init = lambda model: load_encoder(model, encoder_weights)  # noqa: E731
    return build_vit_estimator(model_name="vit_finetune", num_classes=10, dataset=dataset, data_dir=data_dir,
                               epochs=epochs, batch_size=batch_size, train_steps_per_epoch=train_steps_per_epoch,
                               eval_steps_per_epoch=eval_steps_per_epoch,
                               save_dir=resolve_save_dir(save_dir, "finetune"),
                               cfg=cfg, recipe=recipe, lr=lr, weight_decay=weight_decay,
                               warmup_epochs=warmup_epochs, weight_init=weight_init,
                               label_smoothing=label_smoothing, decay_all=decay_all, strong_augment=strong_augment,
                               augment_policy=augment_policy, mix_prob=mix_prob, repeated_aug=repeated_aug,
                               refine_epochs=refine_epochs,
                               device_augment=device_augment, precision=precision, compile=compile,
                               cuda_graph=cuda_graph, overwrite=overwrite, init_model=init, num_process=num_process,
                               log_steps=log_steps, synthetic_size=synthetic_size)


def finetune(pretrained: Union[None, str, torch.nn.Module], **kwargs) -> torch.nn.Module:
    """Finetune from `pretrained` (a model from `pretrain()`, or a weights path; None with from_scratch=True) and
    return the trained 10-class `ViTModel`. Other arguments as `get_estimator`."""
    estimator = get_estimator(encoder_weights=pretrained, **kwargs)
    estimator.fit(warmup=False)
    return estimator.model


if __name__ == "__main__":
    finetune(None, from_scratch=True)
