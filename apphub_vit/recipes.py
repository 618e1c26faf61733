"""Training recipes: everything a recipe decides, in one frozen dataclass, and the one place overrides are checked.

A `Recipe` holds the model choices (a whole `ViTConfig`) and the training choices: optimiser, learning rate and the
batch it is set for, weight decay and which parameters it spares, schedule, label smoothing, augmentation, mixing,
distillation from a CNN teacher (`apphub_vit/teacher.py`), an average of the weights for eval (`apphub_vit/ema.py`) and
test-time augmentation (`tta`; these three in the CIFAR apps only).
Each app has a `RecipeBook` of named recipes; `RecipeBook.resolve(name, overrides)` returns the recipe with any of its
fields replaced by name (``--lr 1e-3`` on the command line, ``lr=1e-3`` from Python, or a key of a
``--hyperparameters`` JSON file), each value checked, and refuses unknown names. The resolved recipe is what ran, and
`run_record.json` records it with the overrides applied.

The CIFAR recipes (`VIT_RECIPES`):

* ``apphub``: the seed, FastEstimator apphub `image_classification/vit/vit_torch.py`: the apphub's ViT (post-norm,
  CLS token, dropout 0.1, the plain Conv2d patch embedding whose state_dict loads the apphub's checkpoints), SGD lr
  0.01 momentum 0.9 weight decay 1e-4 on every parameter, batch 128, constant learning rate, the six pipeline ops.
* ``vit`` (default): the best configuration measured here (docs/results-cifar10.md), after DeiT (Touvron et al. 2021),
  "Vision Transformer for Small-Size Datasets" (Lee et al. 2021) and Compact Convolutional Transformers (Hassani et al.
  2021): the same size with pre-norm blocks, no dropout, a head on the mean of the tokens, CCT's convolutional tokenizer
  as the stem (two 3x3 Conv2d + max-pool stages: the same 8x8 tokens as patch 4) and Lee et al.'s Locality
  Self-Attention, with Liu et al. 2021's dense relative localization loss (weight 0.5) beside the classifier in
  training; AdamW lr 2e-3 at batch 256, weight decay 0.2 on the weight matrices only (timm's and DeiT's split), 10
  warmup epochs then a cosine decay per step, label smoothing 0.1, AutoAugment's CIFAR-10 policy before the six ops, and
  DeiT's hard-label distillation from a ResNet-9 teacher trained first for 12 epochs on the same images, with DeiT's
  distillation head (a second linear head, on the CLS token's output, learns the teacher's labels at weight 0.5 while
  the class head learns the true ones; eval predicts with the mean of the two) and Li et al. 2022's locality guidance
  from the same teacher (the third block's tokens imitate its 8x8 feature map, weight 1); the last epoch's eval and
  test predict with airbench's test-time augmentation (the mean logits of each image and its mirror image, averaged
  with those of the two shifted by one pixel; `accuracy_no_tta` and `accuracy_flip`, the same model on single images
  and on flips alone, are recorded beside), the evals before it on single images. The teacher is for a ViT that learns
  from random weights: a pretrained encoder finetunes without one (nor the head, nor the guidance) unless `distill` is
  given; `distill=0` also leaves both out, and `pool="cls"` the head. Lee et al.'s Shifted Patch Tokenization (`spt`,
  with `stem="patch"`) was the stem before the conv stem won; encoders trained with it still load.

The MNIST recipes (`MNIST_RECIPES`, `apphub_vit/mnist.py`) use the same class.
"""
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Dict, Mapping, Tuple

from apphub_vit import options
from networks.vit import STEMS, ViTConfig

OPTIMIZERS = ("sgd", "adam", "adamw")
DECAY = ("all", "matrices")  # weight decay on every parameter, or not on `ViTModel.no_weight_decay()` (timm's split)
# eval and test views (apphub_vit.training.TTAViews): the images alone, with their mirror images, or also shifted
TTA = ("none", "flip", "flip_translate")
SCHEDULES = ("constant", "warmup_cosine")  # after the linear warmup: hold the lr, or a cosine decay per step to min_lr
# the ViTConfig fields a recipe or a user may set (image size and channels belong to the data set)
MODEL_FIELDS = ("num_layers", "em_dim", "num_heads", "ff_dim", "patch_size", "norm_first", "pool", "drop",
                "drop_path", "spt", "lsa", "stem", "drloc", "distill_head", "guide")
# the model fields that learn from the CNN teacher, each with the value that turns it off: no teacher, none of them
TEACHER_FIELDS: Dict[str, Any] = {"distill_head": False, "guide": 0.0}


@dataclass(frozen=True)
class Recipe:
    """How to train, and what: `lr` is the peak learning rate at `batch_size` (another batch scales it linearly)."""
    name: str
    model: ViTConfig
    epochs: int  # the training length the recipe was measured at (the app's `epochs=None` takes it)
    batch_size: int
    optimizer: str  # OPTIMIZERS
    lr: float
    weight_decay: float
    decay: str  # DECAY
    schedule: str  # SCHEDULES
    warmup_epochs: float  # linear warmup from 0 (at most a fifth of the run)
    min_lr: float  # where the cosine decay ends
    label_smoothing: float
    augment: str  # the app's `RecipeBook.augments`
    mix_prob: float = 0.0  # share of training batches mixed by MixUp or CutMix (pipelines.batched.MixUpCutMix)
    # weight of a CNN teacher's hard label in the target (DeiT: 0.5; 0: no teacher); with the model's `distill_head`,
    # the weight of that head's loss against the teacher's label (the class head's, against the true label: the rest)
    distill: float = 0.0
    # the teacher's training (apphub_vit/teacher.py), when distill > 0: 12 epochs taught as well as 24 or 48 did, and
    # 6 (a teacher 3.5 points weaker) taught a student 1.75 points weaker (docs/results-cifar10.md)
    teacher_epochs: int = 12
    ema: float = 0.0  # decay per step of an average of the weights that eval uses (apphub_vit/ema.py; 0: none)
    # test-time augmentation (as airbench): the last epoch's eval and test predict on the mean logits of each image's
    # views (`TTA`; "none": the image alone), the evals before it on single images (a sixth of the forward work); with
    # the views `accuracy_no_tta` is recorded beside `accuracy`, from the same model, and with "flip_translate" also
    # `accuracy_flip`
    tta: str = "none"

    def field_values(self) -> Dict[str, Any]:
        """Every overridable field by name, the model's included: what `RecipeBook.resolve` accepts."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("name", "model")}
        values.update({name: getattr(self.model, name) for name in MODEL_FIELDS})
        return values


def _tta_name(value: Any) -> Any:
    """The `tta` of before the shifted views was a boolean: True / False (also as text) still mean "flip" / "none"."""
    if isinstance(value, bool) or str(value).lower() in ("true", "false"):
        return "flip" if str(value).lower() == "true" else "none"
    return value


def _rate(name: str, value: Any) -> float:
    return options.number(name, value, 0.0, 1.0, high_open=True)


CHECKS: Dict[str, Callable[[str, Any], Any]] = {
    "epochs": options.positive_int,
    "batch_size": options.positive_int,
    "optimizer": lambda n, v: options.choice(n, v, OPTIMIZERS),
    "lr": lambda n, v: options.number(n, v, low_open=True),
    "weight_decay": options.number,
    "decay": lambda n, v: options.choice(n, v, DECAY),
    "schedule": lambda n, v: options.choice(n, v, SCHEDULES),
    "warmup_epochs": options.number,
    "min_lr": options.number,
    "label_smoothing": _rate,
    "mix_prob": lambda n, v: options.number(n, v, 0.0, 1.0),
    "distill": lambda n, v: options.number(n, v, 0.0, 1.0),
    "teacher_epochs": options.positive_int,
    "ema": lambda n, v: options.number(n, v, 0.0, 1.0, high_open=True),
    "tta": lambda n, v: options.choice(n, _tta_name(v), TTA),
    **{name: options.positive_int for name in ("num_layers", "em_dim", "num_heads", "ff_dim", "patch_size")},
    **{name: options.boolean for name in ("norm_first", "spt", "lsa", "distill_head")},
    "pool": lambda n, v: options.choice(n, v, ("cls", "mean")),
    "stem": lambda n, v: options.choice(n, v, STEMS),
    "drop": _rate,
    "drop_path": _rate,
    "drloc": options.number,
    "guide": options.number,
}


@dataclass(frozen=True)
class RecipeBook:
    """An app's named recipes, the augmentations it implements, and the recipe fields it cannot change."""
    app: str
    recipes: Mapping[str, Recipe]
    augments: Tuple[str, ...]
    fixed: Tuple[str, ...] = field(default=())

    def resolve(self, name: str, overrides: Mapping[str, Any]) -> Tuple[Recipe, Dict[str, Any]]:
        """The recipe `name` with `overrides` ({field: value}) applied, and the overrides as checked.

        A new `batch_size` without a new `lr` scales the learning rate linearly (Goyal et al. 2017), the rule the
        recipes' learning rates were tuned with."""
        recipe = self.recipes[options.choice("recipe", name, tuple(self.recipes))]
        allowed = set(recipe.field_values()) - set(self.fixed)
        options.unknown(overrides, allowed, f"{self.app} (recipe {name!r})")
        checked = {key: options.choice(key, value, self.augments) if key == "augment" else CHECKS[key](key, value)
                   for key, value in overrides.items()}
        model_fields = {k: v for k, v in checked.items() if k in MODEL_FIELDS}
        # A user who turns off the teacher gets the recipe without what learns from it (its distillation head, its
        # locality guidance), and one who gives the CLS token's output to the class head gets it without the head,
        # which reads that token: not an error about a field they never set (given explicitly, the pair is refused
        # below).
        if not checked.get("distill", recipe.distill) > 0:
            model_fields.update({k: off for k, off in TEACHER_FIELDS.items()
                                 if getattr(recipe.model, k) and k not in checked})
        if recipe.model.distill_head and "distill_head" not in checked and \
                checked.get("pool", recipe.model.pool) != "mean":
            model_fields["distill_head"] = False
        model = replace(recipe.model, **model_fields)  # checks shapes
        training = {k: v for k, v in checked.items() if k not in MODEL_FIELDS}
        if "batch_size" in training and "lr" not in training:
            training["lr"] = recipe.lr * training["batch_size"] / recipe.batch_size
        recipe = replace(recipe, model=model, **training)
        if recipe.model.distill_head and not recipe.distill:
            raise options.OptionError("distill_head=True trains its head on a CNN teacher's labels, but distill is 0 "
                                      "(no teacher): set distill > 0 (DeiT's 0.5) with it, or distill_head=False")
        if recipe.model.guide and not recipe.distill:
            raise options.OptionError(f"guide={recipe.model.guide} has the ViT imitate a CNN teacher's feature map, "
                                      f"but distill is 0 (no teacher): set distill > 0 (DeiT's 0.5) with it, or "
                                      f"guide=0")
        if recipe.mix_prob and recipe.augment in ("apphub", "none"):
            raise options.OptionError(f"mix_prob={recipe.mix_prob} mixes strongly augmented batches, but augment is "
                                      f"{recipe.augment!r}: use augment='autoaugment' or 'trivialaugment', or "
                                      f"mix_prob=0")
        return recipe, checked


VIT_RECIPES = {
    "apphub": Recipe("apphub", model=ViTConfig(), epochs=100, batch_size=128, optimizer="sgd", lr=0.01,
                     weight_decay=1e-4, decay="all", schedule="constant", warmup_epochs=0.0, min_lr=0.0,
                     label_smoothing=0.0, augment="apphub"),
    "vit": Recipe("vit", model=ViTConfig(norm_first=True, drop=0.0, pool="mean", stem="conv", lsa=True, drloc=0.5,
                                         distill_head=True, guide=1.0),
                  epochs=100, batch_size=256, optimizer="adamw", lr=2e-3, weight_decay=0.2, decay="matrices",
                  schedule="warmup_cosine", warmup_epochs=10.0, min_lr=0.0, label_smoothing=0.1,
                  augment="autoaugment", distill=0.5, tta="flip_translate"),
}
# "apphub": the six pipeline ops only; the others add a per-image policy before them (pipelines.batched.POLICIES)
CIFAR_AUGMENTS = ("apphub", "autoaugment", "trivialaugment")

_MNIST_VIT = ViTConfig(num_layers=3, image_size=28, patch_size=7, num_channels=1, em_dim=64, num_heads=8,
                       ff_dim=2048, drop=0.1)
MNIST_RECIPES = {
    # The "ViT from scratch on MNIST" tutorials' recipe, as published (98.5% when trained on all 60,000 images).
    "reference": Recipe("reference", model=_MNIST_VIT, epochs=15, batch_size=128, optimizer="adam", lr=3e-4,
                        weight_decay=1e-4, decay="all", schedule="constant", warmup_epochs=0.0, min_lr=0.0,
                        label_smoothing=0.0, augment="none"),
    # For 8,000 training images on a 2-core CPU: a 256-wide MLP, pre-norm, AdamW 2e-3 with 2 warmup epochs and a cosine
    # decay to 1e-6, label smoothing 0.1, random shift / scale / rotation of the training digits, 30 epochs.
    "small_data": Recipe("small_data", model=replace(_MNIST_VIT, ff_dim=256, norm_first=True), epochs=30,
                         batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=0.05, decay="all",
                         schedule="warmup_cosine", warmup_epochs=2.0, min_lr=1e-6, label_smoothing=0.1,
                         augment="shift_scale_rotate"),
}
MNIST_AUGMENTS = ("none", "shift_scale_rotate")
