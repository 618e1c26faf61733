"""The training pieces a recipe decides, shared by the ViT apps: the model with its optimiser, the learning-rate
schedule, label smoothing and the classifier's network.
"""
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import fastestimator as fe
import torch
import torch.nn.functional as F
from fastestimator.op.tensorop import TensorOp
from fastestimator.op.tensorop.loss import CrossEntropy
from fastestimator.op.tensorop.model import ModelOp
from fastestimator.schedule import EpochScheduler, cosine_decay

from apphub_vit.device_network import DeviceNetwork
from apphub_vit.distributed import DistributedUpdateOp, broadcast_from_main
from apphub_vit.ema import EMAUpdate, WeightAverage
from apphub_vit.hardware import Hardware, channels_last, compile_model, import_compiler_in_background
from apphub_vit.recipes import Recipe
from apphub_vit.runs import build_model
from apphub_vit.teacher import DistillTargets, LocalityGuidance, TeacherLabels
from networks.vit import ViTModel
from pipelines.batched import smooth_one_hot


OptimizerFn = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def make_optimizer(recipe: Recipe, capturable: bool = False, no_decay: Optional[Set[int]] = None) -> OptimizerFn:
    """The recipe's optimiser at its peak lr. capturable: one a CUDA graph may capture (its step count stays on the
    device, it takes a tensor lr). no_decay: ids of parameters without weight decay, read when the optimiser is built
    (so the model's builder may fill it)."""
    def groups(params: Iterable[torch.nn.Parameter]) -> List[Dict[str, Any]]:
        params = list(params)
        skip = [p for p in params if id(p) in (no_decay or ())]
        keep = [p for p in params if id(p) not in (no_decay or ())]
        return [group for group in ({"params": keep}, {"params": skip, "weight_decay": 0.0}) if group["params"]]

    if recipe.optimizer == "sgd":  # fused on a GPU: one kernel, and the SGD a CUDA graph can replay
        return lambda params: torch.optim.SGD(groups(params), lr=recipe.lr, momentum=0.9,
                                              weight_decay=recipe.weight_decay, fused=torch.cuda.is_available())
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam  # Adam: L2 in the gradient
    # fused: one kernel for all parameters on a GPU instead of a loop of small ones
    return lambda params: cls(groups(params), lr=recipe.lr, weight_decay=recipe.weight_decay,
                              fused=torch.cuda.is_available(), capturable=capturable)


def build_vit(model_name: str, num_classes: int, recipe: Recipe, hw: Hardware,
              init: Optional[Callable[[ViTModel], None]] = None) -> torch.nn.Module:
    """`fe.build` of the recipe's `ViTModel` with its optimiser, on one device (`runs.build_model`). init:
    fills the fresh model's weights (a pretrained encoder, a saved model). With `hw.compile` the model is compiled
    later, by `classifier_network` (`hardware.compile_model`), after the teacher has trained; the compiler's imports
    start now, in the background."""
    no_decay: Set[int] = set()
    if hw.compile:
        import_compiler_in_background()

    def model_fn() -> ViTModel:
        model = ViTModel.from_config(num_classes, recipe.model)
        if recipe.decay == "matrices":
            names = model.no_weight_decay()
            no_decay.update(id(p) for n, p in model.named_parameters() if n in names)
        if init is not None:
            init(model)
        if model.config.stem == "conv":
            # channels_last, as the teacher's (apphub_vit/teacher.py): the compiled backward lays the conv stem's
            # weight gradients out so on a GPU, and the fused AdamW needs each gradient laid out as its parameter
            model = channels_last(model, hw.gpu)
        return model

    model = build_model(model_fn=model_fn, optimizer_fn=make_optimizer(recipe, hw.cuda_graph, no_decay),
                        model_name=model_name, mixed_precision=hw.precision == "fp16")
    broadcast_from_main(model)  # under torchrun: every rank starts from rank 0's weights
    return model


def lr_schedule(recipe: Recipe, steps_per_epoch: int) -> Optional[Callable[[int], float]]:
    """The learning rate at FastEstimator's global step (from 1): linear warmup from 0 to `recipe.lr` over
    `warmup_epochs` (at most a fifth of the run), then held ("constant") or decayed along a half cosine to `min_lr` at
    the last step ("warmup_cosine", `fe.schedule.cosine_decay`). None when the rate never changes."""
    total = steps_per_epoch * recipe.epochs
    warmup = min(int(recipe.warmup_epochs * steps_per_epoch), total // 5)
    if not warmup and recipe.schedule == "constant":
        return None

    def lr_at(step: int) -> float:
        if step <= warmup:
            return recipe.lr * step / max(warmup, 1)
        if recipe.schedule == "constant":
            return recipe.lr
        return float(cosine_decay(step - warmup, cycle_length=max(total - warmup, 1), init_lr=recipe.lr,
                                  min_lr=recipe.min_lr))

    return lr_at


class SmoothLabels(TensorOp):
    """Integer labels -> smoothed one-hot targets for the training loss (the metrics keep the integer labels)."""
    def __init__(self, inputs: str, outputs: str, num_classes: int, smoothing: float, mode: str = "train") -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.num_classes, self.smoothing = num_classes, smoothing

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        return smooth_one_hot(data, self.num_classes, self.smoothing, torch.float32)


def last_epoch_only(items: Sequence[Any], epochs: int) -> List[Any]:
    """`items` (ops, traces) as FastEstimator runs them in the last of `epochs` epochs only (and in test, which runs
    at the last epoch): each an `EpochScheduler` that holds nothing before it."""
    return list(items) if epochs == 1 else [EpochScheduler({1: None, epochs: item}) for item in items]


VIEWS = {"flip": 2, "flip_translate": 6}  # how many views of each image a `tta` predicts on (TTAViews)


class TTAViews(TensorOp):
    """Images [B, C, H, W] -> the views that test-time augmentation predicts on, stacked [V * B, C, H, W]: "flip",
    each image and its left-right mirror image (V = 2); "flip_translate" (airbench's, Keller Jordan 2024), those two
    and both again for the image shifted one pixel down-right and one pixel up-left, the edges mirrored as the
    training crops' padding is (V = 6)."""
    def __init__(self, inputs: str, outputs: str, views: str, mode: str = "!train") -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.views = views

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        views = [data, data.flip(-1)]
        if self.views == "flip_translate":
            height, width = data.shape[-2:]
            padded = F.pad(data, (1, 1, 1, 1), mode="reflect")  # [B, C, H + 2, W + 2]
            for shifted in (padded[..., :height, :width], padded[..., 2:, 2:]):  # content 1 px down-right / up-left
                views += [shifted, shifted.flip(-1)]
        # In the images' own memory layout (channels_last where ChannelTranspose's permute made it so): each view of B
        # images then has the strides of the single-image eval's input, and the graph torch.compile made for that
        # serves the views. A contiguous stack made the compiled model compile its eval graph a second time.
        layout = torch.channels_last if data.dim() == 4 and data.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        return torch.cat(views).contiguous(memory_format=layout)


class ModelOnViews(ModelOp):
    """`ModelOp` on `TTAViews`' stack [V * B, C, H, W] -> logits [V * B, K], one view of B images at a time: the model
    sees the eval batch's own shape, so the graph compiled for the single-image evals serves the views too (one
    compile, and no second batch size that would make torch.compile recompile with a dynamic batch)."""
    def __init__(self, views: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.views = views

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        return torch.cat([super(ModelOnViews, self).forward(view, state) for view in data.chunk(self.views)])


class MeanOfViews(TensorOp):
    """Logits of `TTAViews`' batch [V * B, K] -> (the test-time augmented logits [B, K], each image's own logits
    [B, K]) and, for "flip_translate", also the flip-only logits [B, K], so that one forward pass records what each
    step adds. The augmented logits are the mean over the image and its mirror image; with the shifts, as airbench,
    half that mean and half the mean of the four shifted views."""
    def __init__(self, inputs: str, outputs: Union[str, Sequence[str]], views: str, mode: str = "!train") -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.views = views

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> Tuple[torch.Tensor, ...]:
        logits = data.float().chunk(VIEWS[self.views])  # V x [B, K]
        own, flipped = logits[0], (logits[0] + logits[1]) / 2
        if self.views == "flip":
            return flipped, own
        shifted = torch.stack(logits[2:]).mean(0)  # [B, K]
        return (flipped + shifted) / 2, own, flipped


class AddLoss(TensorOp):
    """The sum of two losses (the cross-entropy and a model's auxiliary loss) as the one the update minimises."""
    def forward(self, data: List[torch.Tensor], state: Dict[str, Any]) -> torch.Tensor:
        main, auxiliary = data
        return main + auxiliary


class MixLosses(TensorOp):
    """(loss a, loss b) -> (1 - weight) * a + weight * b: DeiT's objective with a distillation head, the class head's
    cross-entropy against the true labels and the distillation head's against the teacher's (weight 1/2 in DeiT)."""
    def __init__(self, inputs, outputs: str, weight: float, mode: str = "train") -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.weight = weight

    def forward(self, data: List[torch.Tensor], state: Dict[str, Any]) -> torch.Tensor:
        a, b = data
        return a * (1 - self.weight) + b * self.weight


def classifier_network(model: torch.nn.Module, augment_ops: List[TensorOp], num_classes: int, recipe: Recipe,
                       hw: Hardware, train_label: str = "y", teacher: Optional[torch.nn.Module] = None,
                       average: Optional[WeightAverage] = None) -> fe.Network:
    """The classifier's network: `augment_ops`, the model, cross-entropy against `train_label` in training (smoothed
    targets when the recipe smooths labels and nothing wrote soft labels yet; with a `teacher`, mixed with its hard
    labels on the same images by `recipe.distill`, `apphub_vit.teacher.DistillTargets`; with the model's `distill_head`,
    the class head against the true labels and the distillation head against the teacher's
    (`apphub_vit.teacher.TeacherLabels`), the two cross-entropies weighted by `1 - recipe.distill` and `recipe.distill`,
    as DeiT; with the model's `guide`, plus its middle block's imitation of the teacher's map,
    `apphub_vit.teacher.LocalityGuidance`) and against the true labels otherwise (with `recipe.tta`, in the last
    epoch's eval and in test: on the mean logits of its views, `TTAViews`: `y_pred`, beside the image's own logits,
    `y_pred_no_tta`, and with the shifted views the flip-only logits, `y_pred_flip`; the evals before it predict on
    single images), the update and, with an `average`, the update of the weights' moving average.
    `DeviceNetwork`: FastEstimator's TorchNetwork on a CPU in fp32; on a GPU it drops the per-step syncs, runs bf16
    autocast and replays the train step (the teacher's forward pass and the average's update included) as a CUDA
    graph. With `hw.compile` the model is compiled here (`compile_model`): the apps build the network after the
    teacher's training, which the compiler's imports overlap (or beside it, with `vit_app.BESIDE_TEACHER`)."""
    if hw.compile:
        compile_model(model)
    ops = list(augment_ops)
    if train_label == "y" and (recipe.label_smoothing or teacher is not None):
        ops.append(SmoothLabels("y", "y_soft", num_classes, recipe.label_smoothing))
        train_label = "y_soft"
    head = recipe.model.distill_head  # the teacher's labels go to a head of their own (DeiT), not into the target
    guide = recipe.model.guide > 0  # the teacher's map too, for locality guidance (its model returns both)
    if teacher is not None:
        ops.append(ModelOp(model=teacher, inputs="x", outputs=("y_teacher", "teacher_map") if guide else "y_teacher",
                           trainable=False, mode="train"))
        if head:  # the teacher's labels (smoothed as the true ones) for the distillation head
            ops.append(TeacherLabels(inputs="y_teacher", outputs="y_distill", smoothing=recipe.label_smoothing))
        else:  # mixed into the one head's target
            ops.append(DistillTargets(inputs=(train_label, "y_teacher"), outputs="y_distill", weight=recipe.distill,
                                      smoothing=recipe.label_smoothing))
            train_label = "y_distill"
    # in training the model returns a tuple where it has more heads than the classifier (networks/vit.py)
    outputs = ("y_pred", ) + (("y_pred_distill", ) if head else ()) + (("drloc", ) if recipe.model.drloc else ()) + \
        (("y_guide", ) if guide else ())
    forward = [ModelOp(model=model, inputs="x", outputs=outputs if len(outputs) > 1 else "y_pred", mode="train")]
    objective = []
    if head and teacher is not None:  # (a saved model only evaluated has no teacher; its train ops never run)
        objective += [CrossEntropy(inputs=("y_pred_distill", "y_distill"), outputs="ce_distill", from_logits=True,
                                   mode="train"),
                      MixLosses(inputs=("ce", "ce_distill"), outputs="ce", weight=recipe.distill, mode="train")]
    if recipe.model.drloc:  # the model's weighted auxiliary loss (networks/drloc.py) on top
        objective.append(AddLoss(inputs=("ce", "drloc"), outputs="ce", mode="train"))
    if guide and teacher is not None:  # the middle block's tokens against the teacher's map
        objective += [LocalityGuidance(inputs=("y_guide", "teacher_map"), outputs="guide", weight=recipe.model.guide,
                                       mode="train"),
                      AddLoss(inputs=("ce", "guide"), outputs="ce", mode="train")]
    single = ModelOp(model=model, inputs="x", outputs="y_pred", mode="!train")
    if recipe.tta != "none":
        # The last epoch's eval (the run's final accuracy) and `fastestimator test` predict on the mean logits of the
        # views; the evals before it on single images, a sixth of the forward work of "flip_translate" (the progress
        # curve and the best-model choice; the views' gain there is a few tenths of a point, docs/performance.md).
        outputs = ("y_pred", "y_pred_no_tta") + (("y_pred_flip",) if recipe.tta == "flip_translate" else ())
        views = [TTAViews(inputs="x", outputs="x_tta", views=recipe.tta),
                 ModelOnViews(views=VIEWS[recipe.tta], model=model, inputs="x_tta", outputs="y_pred_tta",
                              mode="!train"),
                 MeanOfViews(inputs="y_pred_tta", outputs=outputs, views=recipe.tta)]
        before = [] if recipe.epochs == 1 else [EpochScheduler({1: single, recipe.epochs: None})]
        forward += before + last_epoch_only(views, recipe.epochs)
    else:
        forward.append(single)
    return DeviceNetwork(ops=ops + forward + [
        CrossEntropy(inputs=("y_pred", train_label), outputs="ce", from_logits=True, mode="train"),
        CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True, mode="!train"),
        *objective,  # in training "ce" is then the objective: the cross-entropies mixed, plus the auxiliary loss
        DistributedUpdateOp(model=model, loss_name="ce"),  # UpdateOp, its gradients averaged over torchrun's ranks
    ] + ([EMAUpdate(average)] if average is not None else []),
        autocast_dtype=torch.bfloat16 if hw.precision == "bf16" else None, cuda_graph=hw.cuda_graph)
