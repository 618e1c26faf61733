"""The estimator both ViT apps build: pipeline, network, estimator, in FastEstimator's apphub order.

`pretrain.py` (CIFAR-100, 100 classes, saves the encoder) and `finetune.py` (CIFAR-10, 10 classes, loads an encoder)
differ only in the arguments they pass here. Two training recipes:

* ``recipe="apphub"``: the seed, FastEstimator apphub `vit_torch.py`: post-norm, dropout 0.1, SGD lr 0.01 momentum 0.9
  weight decay 1e-4, batch 128, the six per-sample pipeline ops.
* ``recipe="vit"`` (default): the small-data ViT recipe of DeiT (Touvron et al. 2021) and "Vision Transformer for
  Small-Size Datasets" (Lee et al. 2021): pre-norm, no dropout, AdamW with weight decay 0.2 on the weight matrices
  only (timm's and DeiT's split: not on biases, norms and embeddings; `decay_all`), linear warmup then cosine decay per
  step, label smoothing 0.1, AutoAugment's CIFAR-10 policy (Cubuk et al. 2019, as the ≥90% recipes of CCT and Lee et
  al. use it) per image before the six ops, and a head on the mean of the patch tokens.
  TrivialAugment (Müller & Hutter 2021), MixUp / CutMix, the older affine + colour jitter policy, stochastic depth
  (both papers use 0.1), DeiT's repeated augmentation and He et al. 2019's refinement without the strong augmentation
  in the last epochs stay available (`augment_policy`, `mix_prob`, `drop_path`, `repeated_aug`, `refine_epochs`): on
  real CIFAR-10 in 100 epochs they scored lower (benchmarks/accuracy.py).

And the GPU path (each a flag, all on by default when a GPU is present): the six ops run batched on the GPU
(`pipelines/batched.py`), bf16 autocast, `torch.compile`, batch 512 with the learning rate scaled to it, fewer pipeline
workers, and `DeviceNetwork`, which removes FastEstimator's per-step device syncs and replays the whole train step as
a CUDA graph (`cuda_graph`; see `apphub_vit/device_network.py`).
"""
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

import fastestimator as fe
import torch
from fastestimator.op.tensorop import TensorOp
from fastestimator.op.tensorop.loss import CrossEntropy
from fastestimator.op.tensorop.model import ModelOp, UpdateOp
from fastestimator.schedule import EpochScheduler, cosine_decay
from fastestimator.trace import Trace
from fastestimator.trace.adapt import LRScheduler
from fastestimator.trace.io import BestModelSaver
from fastestimator.trace.metric import Accuracy

from apphub_vit.common import ensure_outputs_free
from apphub_vit.data import class_names, dataset_arrays, load_cifar
from apphub_vit.device_network import DeviceNetwork
from apphub_vit.encoder_io import ENCODER_FILE, EncoderSaver
from apphub_vit.prediction_grid import GRID_FILE, PredictionGrid
from apphub_vit.records import RECORD_FILE, RunRecorder
from networks.vit import ViTConfig, ViTModel, init_trunc_normal_
from pipelines.batched import (POLICIES, BatchLoader, FusedImageOps, MixUpCutMix, batched_cifar_ops, check_repeats,
                               smooth_one_hot)
from pipelines.cifar import CIFAR_MEAN, CIFAR_STD, cifar_pipeline


@dataclass(frozen=True)
class Recipe:
    """How to train: optimiser, schedule, regularisation and augmentation. `lr` is for a batch of `base_batch`."""
    name: str
    norm_first: bool
    drop: float
    drop_path: float
    optimizer: str  # "sgd" or "adamw"
    lr: float
    base_batch: int
    weight_decay: float
    schedule: str  # "constant" (the apphub's) or "warmup_cosine": linear warmup, then cosine decay per step to 0
    warmup_epochs: float
    label_smoothing: float
    strong_augment: bool
    mix_prob: float  # share of batches mixed by MixUp / CutMix (with strong_augment)
    policy: str  # the strong augmentation's per-image policy (pipelines.batched.POLICIES)
    pool: str  # what the head reads: "cls" token or "mean" of the patch tokens (networks.vit.ViTConfig)
    weight_init: str  # "torch" (PyTorch's per-layer defaults) or "trunc_normal" (timm's and CCT's, std 0.02)
    decay_all: bool  # weight decay on every parameter; False: not on `ViTModel.no_weight_decay()` (timm's split)


RECIPES = {
    "apphub": Recipe("apphub", norm_first=False, drop=0.1, drop_path=0.0, optimizer="sgd", lr=0.01, base_batch=128,
                     weight_decay=1e-4, schedule="constant", warmup_epochs=0, label_smoothing=0.0,
                     strong_augment=False, mix_prob=0.0, policy="trivialaugment", pool="cls",
                     weight_init="torch", decay_all=True),
    # measured on real CIFAR-10 (benchmarks/accuracy.py): without MixUp / CutMix and with the mean-pooled head,
    # AutoAugment 85.0-85.8% beat TrivialAugment 84.0-84.9% (100 epochs); lr 1e-3 at batch 256 (2e-3 at 512 scored
    # the same as 1e-3 there); no stochastic depth 85.5-86.0% (3 runs) beat 0.1's 85.0-85.2% (2 runs): at 100 epochs
    # this ViT underfits. Weight decay 0.2 on the weight matrices only (timm's and DeiT's split, decay_all=False):
    # with SPT + LSA, batch 256, lr 2e-3, eight runs ended at 89.81-90.55% (mean 90.21%) against 88.88-90.02% for
    # 0.05 on every parameter; with the defaults, 86.10% and 86.24% against 85.12-86.01% (five runs) and
    # 85.26% in the same call
    "vit": Recipe("vit", norm_first=True, drop=0.0, drop_path=0.0, optimizer="adamw", lr=1e-3, base_batch=256,
                  weight_decay=0.2, schedule="warmup_cosine", warmup_epochs=10, label_smoothing=0.1,
                  strong_augment=True, mix_prob=0.0, policy="autoaugment", pool="mean",
                  weight_init="torch", decay_all=False),
}
WEIGHT_INITS = ("torch", "trunc_normal")


@dataclass(frozen=True)
class Hardware:
    """Where and how fast to run. None in the app arguments means: the best choice for the device found."""
    gpu: bool
    batch_size: int
    device_augment: bool
    precision: str  # "fp32", "bf16" (autocast, no loss scaling) or "fp16" (FastEstimator's mixed_precision)
    compile: bool
    num_process: Optional[int]
    cuda_graph: Optional[bool]  # None: decided by build_vit_estimator (on where the recipe's ops allow it)


def resolve_hardware(batch_size: Optional[int] = None, device_augment: Optional[bool] = None,
                     precision: Optional[str] = None, compile: Optional[bool] = None,
                     num_process: Optional[int] = None, cuda_graph: Optional[bool] = None) -> Hardware:
    gpu = torch.cuda.is_available()
    if precision not in (None, "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if precision in ("bf16", "fp16") and not gpu:
        raise ValueError(f"precision={precision!r} needs a CUDA GPU; none is visible. Use precision='fp32' on a CPU.")
    if cuda_graph and not gpu:
        raise ValueError("cuda_graph=True needs a CUDA GPU; none is visible. Use cuda_graph=False on a CPU.")
    if compile and not gpu:
        print("vit_app: torch.compile is on without a GPU: the first steps will be slow while it compiles")
    return Hardware(gpu=gpu, batch_size=batch_size or (512 if gpu else 128),
                    device_augment=True if device_augment is None else bool(device_augment),
                    precision=precision or ("bf16" if gpu else "fp32"), compile=gpu if compile is None else compile,
                    num_process=num_process,  # per-sample pipeline only; None: FastEstimator's default
                    cuda_graph=False if not gpu else cuda_graph)


def make_optimizer(recipe: Recipe, lr: float, capturable: bool = False,
                   no_decay: Optional[Set[int]] = None) -> Callable[[Any], torch.optim.Optimizer]:
    """capturable: an AdamW a CUDA graph may capture (its step count stays on the device, it takes a tensor lr).
    no_decay: ids of parameters to leave out of weight decay (read when the optimizer is built, so the model's
    builder may fill it)."""
    def groups(params: Iterable[torch.nn.Parameter]) -> List[Dict[str, Any]]:
        params = list(params)
        skip = [p for p in params if id(p) in (no_decay or ())]
        keep = [p for p in params if id(p) not in (no_decay or ())]
        return [group for group in ({"params": keep}, {"params": skip, "weight_decay": 0.0}) if group["params"]]

    if recipe.optimizer == "sgd":
        return lambda params: torch.optim.SGD(groups(params), lr=lr, momentum=0.9, weight_decay=recipe.weight_decay)
    # fused AdamW: one kernel for all parameters on a GPU instead of a loop of small ones
    return lambda params: torch.optim.AdamW(groups(params), lr=lr, weight_decay=recipe.weight_decay,
                                            fused=torch.cuda.is_available(), capturable=capturable)


FP16_BLOCKER = "fp16 loss scaling syncs every step"  # why fp16 training cannot be a CUDA graph (GradScaler's check)


def cuda_graph_blockers(rec: Recipe, strong: bool, mix_prob: float, precision: str) -> List[str]:
    """Why a train step of this configuration cannot be a CUDA graph (empty: it can). A graph replays the step as
    captured: fine for random draws on the device, not for MixUpCutMix's draws on the host (mix or cut, box size),
    fp16's host-side inf check, or SGD (torch's SGD is not capturable)."""
    return [why for why, blocks in (("MixUp/CutMix draws on the host (mix_prob > 0)", strong and mix_prob > 0),
                                    (FP16_BLOCKER, precision == "fp16"),
                                    (f"recipe {rec.name!r} uses SGD", rec.optimizer != "adamw")) if blocks]


def settle_cuda_graph(hw: Hardware, blockers: List[str]) -> Hardware:
    """`hw` with cuda_graph decided: None becomes on where there is a GPU and no blocker; True with a blocker is an
    error that names it."""
    if hw.cuda_graph and blockers:
        raise ValueError(f"cuda_graph=True cannot capture this configuration: {'; '.join(blockers)}. "
                         f"Use cuda_graph=False (or None, which picks it where it works)")
    return replace(hw, cuda_graph=hw.gpu and not blockers) if hw.cuda_graph is None else hw


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step <= warmup_steps:
        return peak_lr * step / max(warmup_steps, 1)
    return float(cosine_decay(step - warmup_steps, cycle_length=max(total_steps - warmup_steps, 1), init_lr=peak_lr,
                              min_lr=0.0))


def build_vit_estimator(*, model_name: str, num_classes: int, dataset: str, data_dir: Optional[str], epochs: int,
                        batch_size: Optional[int], train_steps_per_epoch: Optional[int],
                        eval_steps_per_epoch: Optional[int], save_dir: str, cfg: ViTConfig, recipe: str = "vit",
                        lr: Optional[float] = None, weight_decay: Optional[float] = None,
                        warmup_epochs: Optional[float] = None, weight_init: Optional[str] = None,
                        label_smoothing: Optional[float] = None, decay_all: Optional[bool] = None,
                        strong_augment: Optional[bool] = None,
                        augment_policy: Optional[str] = None, mix_prob: Optional[float] = None,
                        device_augment: Optional[bool] = None, precision: Optional[str] = None,
                        compile: Optional[bool] = None, cuda_graph: Optional[bool] = None, overwrite: bool = False,
                        init_model: Optional[Callable[[torch.nn.Module], None]] = None, save_encoder: bool = False,
                        num_process: Optional[int] = None, log_steps: int = 100,
                        synthetic_size: Optional[List[int]] = None, repeated_aug: int = 1,
                        refine_epochs: int = 0) -> fe.Estimator:
    """A FastEstimator Estimator training a `ViTModel` on a CIFAR-shaped task. `cfg` should already carry the
    recipe's norm_first / drop / drop_path (see `model_config`). `refine_epochs`: see `refine_schedule`."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    rec = RECIPES[recipe]
    for name, value in (("epochs", epochs), ("batch_size", batch_size or 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    rec = _override(rec, weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing)
    if decay_all is not None:
        if decay_all not in (True, False):  # 0 and 1 pass; a string such as "false" would be truthy
            raise ValueError(f"decay_all must be True (weight decay on every parameter) or False (not on biases, norms "
                             f"and embeddings); got {decay_all!r}")
        rec = replace(rec, decay_all=bool(decay_all))
    if weight_init is not None:
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {WEIGHT_INITS} (None: the recipe's), got {weight_init!r}")
        rec = replace(rec, weight_init=weight_init)
    hw = resolve_hardware(batch_size, device_augment, precision, compile, num_process, cuda_graph)
    check_repeats(repeated_aug, "repeated_aug")
    if repeated_aug > 1 and not hw.device_augment:
        raise ValueError("repeated_aug runs in the batch loader of the batched ops: use device_augment=True with it, "
                         "or repeated_aug=1 for the per-sample pipeline")
    outputs = [f"{model_name}_best_accuracy.pt", GRID_FILE, RECORD_FILE] + ([ENCODER_FILE] if save_encoder else [])
    ensure_outputs_free(save_dir, outputs, overwrite)
    strong = rec.strong_augment if strong_augment is None else bool(strong_augment)
    policy = rec.policy if augment_policy is None else augment_policy
    if policy not in POLICIES:
        raise ValueError(f"augment_policy must be one of {POLICIES}, got {policy!r}")
    mix_prob = rec.mix_prob if mix_prob is None else float(mix_prob)
    if not 0 <= mix_prob <= 1:
        raise ValueError(f"mix_prob is the share of batches mixed, between 0 and 1; got {mix_prob}")
    check_refine_epochs(refine_epochs, epochs, strong)
    hw = settle_cuda_graph(hw, cuda_graph_blockers(rec, strong, mix_prob, hw.precision))
    peak_lr = lr if lr is not None else rec.lr * hw.batch_size / rec.base_batch  # linear scaling rule
    sizes = {} if synthetic_size is None else {"num_train": synthetic_size[0], "num_eval": synthetic_size[1]}

    # 1. pipeline: per-sample NumpyOps in the workers, or (device_augment) uint8 batches gathered on the device for
    #    the batched ops; full batches only in training (one compiled shape, every step the same size)
    train_data, eval_data = load_cifar(num_classes, dataset, data_dir, **sizes)
    if hw.device_augment:
        pipeline = fe.Pipeline(train_data=BatchLoader(dataset_arrays(train_data), hw.batch_size, shuffle=True,
                                                      drop_last=True, repeats=repeated_aug),
                               eval_data=BatchLoader(dataset_arrays(eval_data), hw.batch_size, shuffle=False))
        augment_ops = batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, strong=strong, num_classes=num_classes,
                                        label_smoothing=rec.label_smoothing, fuse=True, compile=hw.compile,
                                        policy=policy, mix_prob=mix_prob)
        if refine_epochs:
            plain_ops = batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, fuse=True, compile=hw.compile)
            augment_ops = refine_schedule(augment_ops, plain_ops, epochs - refine_epochs + 1,
                                          _LabelSmoothing(num_classes, rec.label_smoothing))
    else:
        if strong:
            raise ValueError("strong_augment runs as batched ops: use device_augment=True with it, or "
                             "strong_augment=False for the per-sample pipeline")
        pipeline = cifar_pipeline(train_data, eval_data, batch_size=hw.batch_size, num_process=hw.num_process)
        augment_ops = []

    # 2. network
    no_decay: Set[int] = set()  # ids of the parameters left out of weight decay (decay_all=False), for the optimizer

    def model_fn() -> ViTModel:
        model = ViTModel.from_config(num_classes, cfg)
        if not rec.decay_all:
            names = model.no_weight_decay()
            no_decay.update(id(p) for n, p in model.named_parameters() if n in names)
        if rec.weight_init == "trunc_normal":
            init_trunc_normal_(model)
        if init_model is not None:  # pretrained encoder weights replace it; a new head keeps it
            init_model(model)
        if hw.compile:
            model.compile()  # in place: state_dict keys stay those of the plain model
        return model

    if hw.gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 leftovers (optimizer, norms) on tensor cores
    model = fe.build(model_fn=model_fn, optimizer_fn=make_optimizer(rec, peak_lr, hw.cuda_graph, no_decay),
                     model_name=model_name, mixed_precision=hw.precision == "fp16")
    train_label = "y"
    if strong and mix_prob:
        train_label = "y_soft"  # written by MixUpCutMix, label smoothing included
    elif rec.label_smoothing:
        augment_ops.append(_LabelSmoothing(num_classes, rec.label_smoothing))
        train_label = "y_soft"
    network = DeviceNetwork(ops=augment_ops + [
        ModelOp(model=model, inputs="x", outputs="y_pred"),
        CrossEntropy(inputs=("y_pred", train_label), outputs="ce", from_logits=True, mode="train"),
        CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True, mode="!train"),
        UpdateOp(model=model, loss_name="ce")
    ], autocast_dtype=torch.bfloat16 if hw.precision == "bf16" else None, cuda_graph=hw.cuda_graph)

    # 3. estimator
    traces: List[Trace] = [
        Accuracy(true_key="y", pred_key="y_pred"),
        BestModelSaver(model=model, save_dir=save_dir, metric="accuracy", save_best_mode="max")
    ]
    if rec.schedule == "warmup_cosine":
        steps_per_epoch = train_steps_per_epoch or len(train_data) // hw.batch_size
        total = steps_per_epoch * epochs
        warmup = min(int(rec.warmup_epochs * steps_per_epoch), total // 5)  # at most a fifth of a short run
        traces.append(LRScheduler(model=model, lr_fn=lambda step: warmup_cosine(step, total, warmup, peak_lr)))
    if save_encoder:
        traces.append(EncoderSaver(model, save_dir, overwrite=overwrite))
    config = {"model": asdict(cfg), "num_classes": num_classes, "dataset": dataset, "data_dir": data_dir,
              "recipe": asdict(rec), "hardware": asdict(hw), "lr": peak_lr, "strong_augment": strong,
              "augment_policy": policy if strong else None,
              "mix_prob": mix_prob if strong else None, "repeated_aug": repeated_aug, "refine_epochs": refine_epochs,
              "epochs": epochs,
              "synthetic_size": synthetic_size}
    traces += [
        # eval images as the model sees them: normalised, channels first, in both pipeline paths
        PredictionGrid("x", "y", "y_pred", class_names(num_classes, dataset), save_dir, mean=CIFAR_MEAN,
                       std=CIFAR_STD, channels_first=True),
        RunRecorder(model_name, save_dir, f"synthetic CIFAR-{num_classes}" if dataset == "synthetic" else dataset,
                    hparams=config, models=[model], overwrite=overwrite)
    ]
    estimator = fe.Estimator(pipeline=pipeline, network=network, epochs=epochs, traces=traces,
                             train_steps_per_epoch=train_steps_per_epoch, eval_steps_per_epoch=eval_steps_per_epoch,
                             log_steps=log_steps)
    estimator.model = model  # handy for pretrain() / finetune(), which return it
    estimator.config = config
    return estimator


def _override(rec: Recipe, **values: Optional[float]) -> Recipe:
    """`rec` with the numbers a caller gave (None: the recipe's), each checked to be a number >= 0."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0 (None: the recipe's, {getattr(rec, name)}), got {value!r}")
        if name == "label_smoothing" and not value < 1:
            raise ValueError(f"label_smoothing is the share of a label spread over all classes, from 0 (off) to below "
                             f"1 (None: the recipe's, {rec.label_smoothing}); got {value!r}")
        if name == "warmup_epochs" and rec.schedule != "warmup_cosine":
            raise ValueError(f"warmup_epochs is for a warmup + cosine schedule; recipe {rec.name!r} keeps its learning "
                             f"rate constant. Use recipe='vit', or leave warmup_epochs at None")
        rec = replace(rec, **{name: float(value)})
    return rec


def model_config(recipe: str, norm_first: Optional[bool], drop: Optional[float], drop_path: Optional[float],
                 **arch: Any) -> ViTConfig:
    """A `ViTConfig` whose regularisation, norm placement and pooling default to the recipe's."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    rec = RECIPES[recipe]
    arch["pool"] = arch.get("pool") or rec.pool
    return ViTConfig(image_size=32, num_channels=3, norm_first=rec.norm_first if norm_first is None else norm_first,
                     drop=rec.drop if drop is None else drop,
                     drop_path=rec.drop_path if drop_path is None else drop_path, **arch)


def check_refine_epochs(refine_epochs: Any, epochs: int, strong: bool) -> None:
    """Fail fast on a `refine_epochs` that cannot work, saying what to pass instead."""
    if not isinstance(refine_epochs, int) or isinstance(refine_epochs, bool) or not 0 <= refine_epochs < epochs:
        raise ValueError(f"refine_epochs is how many of the last epochs train without the strong augmentation: a whole "
                         f"number from 0 (off) to epochs - 1 = {epochs - 1}; got {refine_epochs!r}")
    if refine_epochs and not strong:
        raise ValueError("refine_epochs turns the strong augmentation off for the last epochs, but strong_augment is "
                         "off: leave refine_epochs at 0, or turn strong_augment on")


def refine_schedule(strong_ops: List[TensorOp], plain_ops: List[TensorOp], first_plain_epoch: int,
                    label_op: TensorOp) -> List[Any]:
    """The last epochs on lightly augmented images: "refined data augmentation" (He et al. 2019, "Data Augmentation
    Revisited: Rethinking the Distribution Gap between Clean and Augmented Data"), with the six ops kept.

    The paper's argument: a model trained on strongly augmented images fits them, not the plain images it is tested
    on, and training its last epochs without the per-image policy and MixUp / CutMix closes that gap. On real CIFAR-10
    (the ViT with SPT + LSA, 100 epochs) it did not help: 10, 20 and 30 such epochs ended 0.2-0.7 points below the
    mean of runs without (README: Results), so it is off by default.

    `strong_ops` and `plain_ops` come from `batched_cifar_ops(fuse=True)` (a fused train op first, then the eval ops,
    then MixUpCutMix if any): the fused train op is swapped by an `EpochScheduler` from `first_plain_epoch` on,
    MixUpCutMix by `label_op` (which writes the smoothed labels it wrote)."""
    if not (isinstance(strong_ops[0], FusedImageOps) and isinstance(plain_ops[0], FusedImageOps)):
        raise ValueError("refine_schedule needs batched_cifar_ops(fuse=True) lists (a FusedImageOps first)")
    scheduled: List[Any] = [EpochScheduler({1: strong_ops[0], first_plain_epoch: plain_ops[0]})]
    for op in strong_ops[1:]:
        scheduled.append(EpochScheduler({1: op, first_plain_epoch: label_op}) if isinstance(op, MixUpCutMix) else op)
    return scheduled


class _LabelSmoothing(fe.op.tensorop.TensorOp):
    """Integer labels -> smoothed one-hot `y_soft` (used when label smoothing is on without MixUp / CutMix)."""
    def __init__(self, num_classes: int, smoothing: float) -> None:
        super().__init__(inputs="y", outputs="y_soft", mode="train")
        self.num_classes, self.smoothing = num_classes, smoothing

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        return smooth_one_hot(data, self.num_classes, self.smoothing, torch.float32)

