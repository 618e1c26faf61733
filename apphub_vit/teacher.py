"""A CNN teacher for the ViT, trained in seconds on the same images, and DeiT's hard-label distillation from it.

Follows "Training data-efficient image transformers & distillation through attention" (Touvron et al. 2021, DeiT):
a convnet teacher's argmax on each (augmented) training image becomes a second target of the student, next to the
true label: the student learns from the teacher's inductive bias (locality), which a patch-4 ViT trained on 50,000
images lacks. DeiT gives the teacher's label a head of its own (`TeacherLabels` makes that head's target; the model's
`distill_head`, recipe `vit`'s default, is the head). Without it one head takes the mixed target
`(1 - distill) * y + distill * onehot(argmax teacher(x))` (`DistillTargets`), which for cross-entropy is the same loss
as DeiT's `(1 - distill) * CE(z, y) + distill * CE(z, y_teacher)` on a single head (DeiT's class-token-only variant).

With the model's `guide` (locality guidance, Li et al. 2022, "Locality Guidance for Improving Vision Transformers on
Tiny Datasets") the teacher's map after its third stage, on CIFAR the 8x8 grid of the ViT's tokens, is a second
target: the ViT's middle block imitates it (`LocalityGuidance`), as FitNets' hints (Romero et al. 2015) have a student
layer imitate a teacher's. The target is the map of the same augmented image, each position layer-normalised over its
channels (Wei et al. 2022's whitened feature targets), so that its scale is the student's, whatever the teacher's.

The teacher is `networks.resnet9.ResNet9` on David Page's recipe ("How to train your ResNet", 2018; as
`benchmarks/resnet9_reference.py`): batch 512, SGD with Nesterov momentum 0.9, weight decay 5e-4, the learning rate
linear from 0 to 0.4 over the first 5/24 of the run and back to 0, the six apphub ops (pad, crop, flip, cutout) batched
on the device, no label smoothing. It is trained by its own FastEstimator Estimator before the ViT's, on the ViT's
training images only (a validation split stays held out from it too), and saved beside the run (`TEACHER_FILE`), so
that a resumed run reloads it instead of training it again.

The student's step calls it frozen (`frozen_teacher`). Where the apps build the student's network and warm up its
compiled graphs on another thread while the teacher trains (`BesideTeacher`, with `vit_app.BESIDE_TEACHER`), that
frozen teacher is a copy built before the training and given the trained weights after it.
"""
import os
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence

import fastestimator as fe
import numpy as np
import torch
import torch.nn.functional as F
from fastestimator.op.tensorop import TensorOp
from fastestimator.op.tensorop.loss import CrossEntropy
from fastestimator.op.tensorop.model import ModelOp, UpdateOp
from fastestimator.schedule import EpochScheduler
from fastestimator.trace import Trace
from fastestimator.trace.adapt import LRScheduler
from fastestimator.trace.metric import Accuracy

from apphub_vit.device_network import DeviceNetwork
from apphub_vit.hardware import Hardware, channels_last, compile_model
from apphub_vit.runs import AppEstimator, atomic_path, build_model
from networks.resnet9 import ResNet9, WithFeatureMap
from pipelines.batched import batched_cifar_ops, smooth_one_hot
from pipelines.loader import Array, BatchLoader

TEACHER_FILE = "teacher_resnet9.pt"
TEACHER_BATCH = 512
TEACHER_LR, TEACHER_WEIGHT_DECAY = 0.4, 5e-4  # Page's, for a loss averaged over the batch
WARMUP_SHARE = 5 / 24  # Page's: the peak at epoch 5 of 24


def teacher_lr(steps_per_epoch: int, epochs: int):
    """Page's piecewise-linear schedule at FastEstimator's step (from 1): 0 -> 0.4 over 5/24 of the run -> 0."""
    total = steps_per_epoch * epochs
    peak = max(int(total * WARMUP_SHARE), 1)
    return lambda step: float(np.interp(step, [0, peak, total], [0.0, TEACHER_LR, 0.0]))


class BesideTeacher:
    """`work()` on a thread of its own, started by `train_teacher` once the teacher's train step is a CUDA graph (or
    will not be one): there the apps (with `vit_app.BESIDE_TEACHER`) build the student's network and warm up its
    compiled graphs (`DeviceNetwork.prewarm`) while the teacher's replayed steps keep the GPU busy. Started no sooner:
    CUDA calls of another thread during a capture can invalidate it. The work's random draws come from the GPU's
    generator, as the teacher's data order and augmentation do, so those depend on the two threads' timing: a seed
    then fixes the student's initial weights and data order (the work draws as much whenever it runs), not the
    teacher's draws (GPU kernels already fix no result bit for bit)."""
    def __init__(self, work: Callable[[], Any]) -> None:
        self.work = work
        self._thread: Optional[threading.Thread] = None
        self._result: Any = None
        self._error: Optional[BaseException] = None

    def start(self) -> None:
        """Start the work, once (later calls do nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="apphub_vit-beside-teacher", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self.work()
        except BaseException as err:  # handed to the main thread by result()
            self._error = err

    def wait(self) -> None:
        """Start the work if nothing did, and wait until it ends."""
        self.start()
        self._thread.join()

    def result(self, fallback: Callable[[], Any]) -> Any:
        """The work's result once it ends; where it raised, what `fallback()` returns on this thread, after saying
        why (the work as the main thread would do it: an error of its own then surfaces here)."""
        self.wait()
        if self._error is None:
            return self._result
        print(f"apphub_vit: the work beside the teacher failed ({type(self._error).__name__}: "
              f"{(str(self._error).splitlines() or [''])[0][:300]}); doing it now", flush=True)
        return fallback()


class _StartBeside(Trace):
    """Starts a `BesideTeacher` after the teacher's first train step that left no capture to come (the step captured,
    or its graph off or given up), at the first batch of an eval or test (a reused teacher), or at the end."""
    def __init__(self, network: DeviceNetwork, beside: BesideTeacher) -> None:
        super().__init__(mode=None)
        self.network, self.beside = network, beside

    def on_batch_end(self, data: Any) -> None:
        if self.system.mode != "train" or self.network.graph_captures or not self.network.cuda_graph:
            self.beside.start()

    def on_end(self, data: Any) -> None:
        self.beside.start()


def frozen_teacher(num_classes: int, hw: Hardware, feature_map: bool = False,
                   net: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """The teacher as the student's step calls it: a ResNet-9 without gradients or optimiser (an `fe.build` model for a
    `ModelOp`), channels_last on a GPU as the trained one, and with `feature_map` wrapped to give its map too,
    (logits, map) (`WithFeatureMap`). net: the ResNet-9 to freeze (the trained one); else a new one, whose weights
    `train_teacher(frozen=...)` fills."""
    net = (channels_last(ResNet9(num_classes), hw.gpu) if net is None else net).requires_grad_(False)
    # on one device (build_model) as the trained model: on a host with several GPUs fe.build would wrap the frozen
    # teacher in a DataParallel, whose scatter to every GPU the student's captured step cannot hold
    return build_model(model_fn=lambda: WithFeatureMap(net) if feature_map else net, optimizer_fn=None,
                       model_name="teacher")


def train_teacher(train: Dict[str, Array], eval_data: Dict[str, Array], num_classes: int, epochs: int,
                  hw: Hardware, mean: Sequence[float], std: Sequence[float], path: Optional[str] = None,
                  reuse: bool = False, train_steps_per_epoch: Optional[int] = None,
                  feature_map: bool = False, frozen: Optional[torch.nn.Module] = None,
                  beside: Optional[BesideTeacher] = None) -> Dict[str, Any]:
    """Train a ResNet-9 on `train` ({"x": uint8 [N, 32, 32, 3], "y": [N]}: numpy arrays, or tensors, which its loaders
    share where they are on the device already) for `epochs`, measure it on `eval_data` after its last epoch, save it
    to `path` (if given) and return {"model": the frozen teacher with its weights, "accuracy", "seconds" (the
    training's), "epochs", "reused", "cuda_graph" (whether its train step ran as a CUDA graph), "beside_wait_seconds"
    (how long it then waited for `beside`'s work; None without)}.
    reuse: load the teacher already at `path` (a resumed run's) instead of training one. Its train step is a CUDA graph
    where the student's may be one (`hw.cuda_graph`): its SGD is the fused one, which a graph can replay.
    feature_map: the returned teacher also gives its map for locality guidance, (logits, map) (`WithFeatureMap`).
    frozen: a `frozen_teacher` to return, given the trained weights (else the trained model itself is frozen).
    beside: started during the training (`BesideTeacher`), and waited for before the weights go into `frozen`, which
    its work may be using.
    With `hw.compile` the returned teacher is compiled (`torch.compile`, in place; already compiled, it stays so)."""
    start = time.perf_counter()
    model = build_model(model_fn=lambda: channels_last(ResNet9(num_classes), hw.gpu),
                        optimizer_fn=lambda p: torch.optim.SGD(p, lr=TEACHER_LR, momentum=0.9, nesterov=True,
                                                               weight_decay=TEACHER_WEIGHT_DECAY, fused=hw.gpu),
                        model_name="teacher")
    reused = bool(reuse and path and os.path.exists(path))
    if reused:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    batch = min(TEACHER_BATCH, len(train["y"]))
    steps = len(train["y"]) // batch
    steps = steps if train_steps_per_epoch is None else min(steps, train_steps_per_epoch)
    # the image ops uncompiled: compiling them again (another batch shape) would cost more start-up than it saves
    network = DeviceNetwork(ops=batched_cifar_ops(mean, std, fuse=True) + [
        ModelOp(model=model, inputs="x", outputs="y_pred"),
        CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True),
        UpdateOp(model=model, loss_name="ce"),
    ], autocast_dtype=torch.bfloat16 if hw.precision == "bf16" else None, cuda_graph=hw.cuda_graph)
    held_out = BatchLoader(eval_data, hw.eval_batch_size, shuffle=False)
    # evaluated after its last epoch only: the run records that accuracy, and each eval before it would cost an eval
    # epoch of FastEstimator's loop on the critical path to the student's start
    pipeline = fe.Pipeline(train_data=BatchLoader(train, batch, shuffle=True, drop_last=True),
                           eval_data=EpochScheduler({1: None, epochs: held_out}) if epochs > 1 else held_out,
                           test_data=held_out)
    # AppEstimator, as the student's: FastEstimator's full garbage collection after every epoch scans only what that
    # epoch made (gc.freeze), not the whole heap, which the compiler's imports beside the teacher make larger; and the
    # network unloaded at the end (its optimizer's state off the GPU; the model moves back as the student's runs)
    estimator = AppEstimator(pipeline=pipeline, network=network, epochs=epochs, log_steps=0,
                             train_steps_per_epoch=train_steps_per_epoch,
                             traces=[LRScheduler(model=model, lr_fn=teacher_lr(steps, epochs)),
                                     Accuracy(true_key="y", pred_key="y_pred")] +
                             ([_StartBeside(network, beside)] if beside is not None else []))
    print(f"apphub_vit: distillation teacher (a ResNet-9): "
          f"{'evaluating the one saved by this run' if reused else f'training it, {epochs} epochs'}", flush=True)
    summary = estimator.test(summary="teacher") if reused else estimator.fit(summary="teacher")
    history = summary.history["test" if reused else "eval"]["accuracy"]
    accuracy = float(history[max(history)])  # the last evaluation's
    if path and not reused:
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)
    seconds = time.perf_counter() - start
    if beside is not None:
        beside.wait()
    waited = time.perf_counter() - start - seconds
    if frozen is None:
        teacher = frozen_teacher(num_classes, hw, feature_map, net=model)
    else:
        teacher = frozen
        (teacher.net if isinstance(teacher, WithFeatureMap) else teacher).load_state_dict(model.state_dict())
    if hw.compile:
        # Compiled as the student's step calls it: with locality guidance that is `WithFeatureMap`, which runs the
        # teacher's layers one by one, so compiling the ResNet-9 inside it would compile nothing that runs. Compiled,
        # its frozen forward's ReLUs, poolings and residual adds fuse into the convolutions' neighbours instead of
        # running as eager kernels in every student step. In place, as the student (state_dict keys unchanged), one
        # static graph for the student's batch. Its own training above stays eager: compiling that too cost more
        # start-up than it saved (docs/performance.md).
        compile_model(teacher)
    print(f"apphub_vit: teacher accuracy {accuracy:.4f} on the eval images ({seconds:.1f} s"
          f"{f', then {waited:.1f} s for the work beside it' if beside is not None else ''})", flush=True)
    return {"model": teacher, "accuracy": accuracy, "seconds": seconds, "epochs": epochs, "reused": reused,
            "cuda_graph": network.graph_captures > 0, "beside_wait_seconds": waited if beside is not None else None}


class TeacherLabels(TensorOp):
    """teacher logits [B, C] -> `smooth(onehot(argmax))` [B, C], float32: the target of DeiT's distillation head, the
    teacher's label smoothed as the true one (`smoothing`)."""
    def __init__(self, inputs: str, outputs: str, smoothing: float, mode: str = "train") -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.smoothing = smoothing

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        return smooth_one_hot(data.argmax(dim=1), data.shape[1], self.smoothing, torch.float32)


class DistillTargets(TensorOp):
    """(soft targets [B, C], teacher logits [B, C]) -> `(1 - weight) * targets + weight * smooth(onehot(argmax))`:
    DeiT's hard-label distillation on one head, the teacher's label smoothed as the true one (`smoothing`)."""
    def __init__(self, inputs, outputs: str, weight: float, smoothing: float, mode: str = "train") -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.weight, self.smoothing = weight, smoothing

    def forward(self, data, state: Dict[str, Any]) -> torch.Tensor:
        targets, teacher_logits = data
        hard = smooth_one_hot(teacher_logits.argmax(dim=1), targets.shape[1], self.smoothing, targets.dtype)
        return targets * (1 - self.weight) + hard * self.weight


class LocalityGuidance(TensorOp):
    """(the ViT's guided tokens [B, N, C], the teacher's map [B, C, h, w]) -> `weight` * the mean squared error between
    the tokens and the map at the tokens' grid (sqrt(N) x sqrt(N), row-major), each position layer-normalised over its
    C channels. The map is resized to the grid where they differ (a patch-2 ViT's 16x16 tokens, say): averaged down,
    or bilinear up."""
    def __init__(self, inputs, outputs: str, weight: float, mode: str = "train") -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.weight = weight

    def forward(self, data, state: Dict[str, Any]) -> torch.Tensor:
        tokens, feature_map = data
        side = round(tokens.shape[1]**0.5)
        if side * side != tokens.shape[1] or tokens.shape[-1] != feature_map.shape[1]:
            raise ValueError(f"LocalityGuidance needs a square grid of tokens with the map's {feature_map.shape[1]} "
                             f"channels, got tokens of shape {tuple(tokens.shape)}")
        feature_map = feature_map.float()
        if feature_map.shape[-2:] != (side, side):
            feature_map = (F.adaptive_avg_pool2d(feature_map, side) if feature_map.shape[-1] > side else
                           F.interpolate(feature_map, size=(side, side), mode="bilinear", align_corners=False))
        target = feature_map.flatten(2).transpose(1, 2)  # [B, C, side, side] -> [B, N, C], row-major as the tokens
        target = F.layer_norm(target, target.shape[-1:])  # each position: mean 0, variance 1 over the channels
        return self.weight * F.mse_loss(tokens.float(), target)
