"""Finetune a pretrained ViT encoder on CIFAR-10 (FastEstimator apphub `image_classification/vit/vit_torch.py`).

    fastestimator train apphub_vit/finetune.py --encoder_weights runs/pretrain-.../vit_encoder.pt --epochs 1
    fastestimator train apphub_vit/finetune.py --from_scratch True --epochs 100   # the same ViT, no pretraining
    fastestimator train apphub_vit/finetune.py --encoder_weights ... --data_dir ~/data   # cifar-10-batches-py here
    fastestimator train apphub_vit/finetune.py --dataset cifar10_split_b --data_dir /tmp/c10 --encoder_weights ...
    torchrun --nproc_per_node 4 -m apphub_vit.distributed finetune --encoder_weights ...   # one process per GPU

Unlike the apphub, the head has 10 classes (5 on a CIFAR-10 split: `apphub_vit.data.num_classes_of`). The
architecture is read from the encoder file (or model); an override that contradicts it is an error naming the field.
"""
from typing import Any, List, Optional, Union

import fastestimator as fe
import torch

from apphub_vit import options
from apphub_vit.common import run_options
from apphub_vit.data import num_classes_of
from apphub_vit.encoder_io import load_encoder, load_encoder_state, pretrained_architecture
from apphub_vit.vit_app import build_vit_estimator, resolve_vit_recipe, saved_architecture


def get_estimator(epochs: Optional[int] = 1,
                  batch_size: Optional[int] = None,
                  train_steps_per_epoch: Optional[int] = None,
                  eval_steps_per_epoch: Optional[int] = None,
                  save_dir: Optional[str] = None,
                  data_dir: Optional[str] = None,
                  dataset: str = "cifair10",
                  encoder_weights: Union[None, str, torch.nn.Module] = None,
                  from_scratch: bool = False,
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
    """The finetuning Estimator: a 10-class ViT (5 on a CIFAR-10 split) whose encoder starts from `encoder_weights`.

    Args:
        epochs: Training epochs (the apphub finetunes for 1; None: the recipe's, 100).
        encoder_weights: `vit_encoder.pt` from pretraining, a ViTModel checkpoint, or a model in memory.
        from_scratch: Train without pretrained weights (for comparison); excludes encoder_weights.
        weights_path: A saved finetuned model (`vit_finetune_best_accuracy.pt`) to start from, e.g. for
            `fastestimator test`; needs neither encoder_weights nor from_scratch.
        Everything else: as `apphub_vit.pretrain.get_estimator` (dataset: "cifair10", "synthetic" or a CIFAR-10
        split); the model fields of a pretrained encoder come from it (an override of `pool`, which only the head
        reads, is allowed).
    """
    from_scratch = options.boolean("from_scratch", from_scratch)
    if from_scratch and encoder_weights is not None:
        raise options.OptionError("Both from_scratch=True and encoder_weights were given: pick one (finetune the "
                                  "pretrained encoder, or train the same ViT from scratch for comparison).")
    if not from_scratch and encoder_weights is None and weights_path is None:
        raise options.OptionError("finetune needs pretrained encoder weights: pass encoder_weights=<save_dir of "
                                  "pretraining>/vit_encoder.pt (--encoder_weights PATH), or from_scratch=True "
                                  "(--from_scratch True) to train without them.")
    run = run_options(epochs, batch_size, train_steps_per_epoch, eval_steps_per_epoch, log_steps, synthetic_size)
    pretrained, fixed, init = None, {}, None
    if encoder_weights is not None:
        pretrained = load_encoder_state(encoder_weights)  # reads the file once, fails fast on a bad path
        fixed = pretrained_architecture(pretrained)
        overrides = {"pool": fixed.pop("pool"), **overrides} if "pool" in fixed else overrides
        init = lambda model: load_encoder(model, pretrained)  # noqa: E731  (a mismatch fails here, before data)
    resolved, applied = resolve_vit_recipe("finetune", recipe, run, {**saved_architecture(weights_path), **overrides},
                                           pretrained=fixed)
    source = encoder_weights if isinstance(encoder_weights, str) or encoder_weights is None else pretrained["source"]
    return build_vit_estimator(app="finetune", num_classes=num_classes_of(dataset, 10), dataset=dataset,
                               data_dir=data_dir, recipe=resolved, overrides=applied, run=run, save_dir=save_dir,
                               overwrite=overwrite, device_augment=device_augment, precision=precision, compile=compile,
                               cuda_graph=cuda_graph, num_process=num_process, resume=resume, seed=seed,
                               validation=validation,
                               weights_path=weights_path,
                               init_model=init, hparams={"encoder_weights": source, "from_scratch": from_scratch})


def finetune(pretrained: Union[None, str, torch.nn.Module], **kwargs: Any) -> torch.nn.Module:
    """Finetune from `pretrained` (a model from `pretrain()`, or a weights path; None with from_scratch=True) and
    return the trained 10-class (or 5-class) `ViTModel`. Other arguments as `get_estimator`."""
    estimator = get_estimator(encoder_weights=pretrained, **kwargs)
    estimator.fit(warmup=False)
    return estimator.model


if __name__ == "__main__":
    finetune(None, from_scratch=True)
