"""The estimator both ViT apps build: pipeline, network, estimator, in FastEstimator's apphub order.

`pretrain.py` (CIFAR-100, 100 classes, saves the encoder) and `finetune.py` (CIFAR-10, 10 classes, loads an encoder)
differ only in what they pass here. What to train comes from a recipe (`apphub_vit/recipes.py`), where to run it from
`apphub_vit/hardware.py`. Under torchrun (`apphub_vit/distributed.py`) every rank builds it: each trains on its
shard of every global batch, rank 0 alone evaluates and writes the files.
"""
import json
import os
from dataclasses import asdict, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import fastestimator as fe
import torch
from fastestimator.trace.adapt import LRScheduler
from fastestimator.trace.metric import Accuracy

from apphub_vit import distributed, options
from apphub_vit.common import best_model_file, finish_estimator, load_weights, start_run, synthetic_sizes
from apphub_vit.data import class_names, dataset_arrays, hold_out, load_cifar
from apphub_vit.ema import EvalWithAverage, WeightAverage
from apphub_vit.encoder_io import ENCODER_FILE, EncoderMismatchError, EncoderSaver
from apphub_vit.hardware import compile_model, resolve_hardware
from apphub_vit.prediction_grid import GRID_FILE, PredictionGrid
from apphub_vit.recipes import CIFAR_AUGMENTS, MODEL_FIELDS, TEACHER_FIELDS, VIT_RECIPES, Recipe, RecipeBook
from apphub_vit.records import RECORD_FILE
from apphub_vit.teacher import TEACHER_FILE, BesideTeacher, frozen_teacher, train_teacher
from apphub_vit.training import build_vit, classifier_network, last_epoch_only, lr_schedule
from networks.vit import ViTConfig
from pipelines.batched import batched_cifar_ops
from pipelines.cifar import CIFAR_MEAN, CIFAR_STD, cifar_pipeline
from pipelines.loader import BatchLoader, default_device, device_arrays


# Whether a compiling app builds and warms up the student's network beside the teacher's training (`BesideTeacher`).
# Off until a GPU has timed it against the path it would replace: on a GPU the thread's tracing competes with the
# teacher's training loop for the interpreter, which could cost the teacher what the overlap saves
# (docs/performance.md, "Next to run").
BESIDE_TEACHER = False


def vit_book(app: str) -> RecipeBook:
    return RecipeBook(app, VIT_RECIPES, CIFAR_AUGMENTS)


def resolve_vit_recipe(app: str, name: str, run: Mapping[str, Any], overrides: Mapping[str, Any],
                       pretrained: Optional[Mapping[str, Any]] = None) -> Tuple[Recipe, Dict[str, Any]]:
    """The recipe `name` with the run's epochs / batch_size and the user's overrides; `pretrained`: model fields an
    encoder fixes ({field: value}), which an override may not contradict. Returns it and the user's overrides."""
    user = {**overrides, **{k: run[k] for k in ("epochs", "batch_size") if run.get(k) is not None}}
    recipe, applied = vit_book(app).resolve(name, user)
    fixed = dict(pretrained or {})
    clash = [f"{k}: pretrained {v} vs model {applied[k]}" for k, v in fixed.items() if k in applied and applied[k] != v]
    if clash:
        raise EncoderMismatchError(f"The encoder weights were trained with a different architecture than given "
                                   f"({'; '.join(clash)}): leave these out, the encoder file supplies them.")
    if fixed:
        recipe, _ = vit_book(app).resolve(name, {**user, **fixed})
    return recipe, applied


def saved_architecture(weights_path: Optional[str]) -> Dict[str, Any]:
    """The model fields a saved model was trained with, from the run_record.json beside it ({} if there is none).
    Fields an older record lacks take `ViTConfig`'s defaults, which is what such models had (`stem`: the patch Conv2d),
    not the recipe's of today (a record of an SPT model without a `stem` field is a patch-stem model)."""
    if weights_path is None:
        return {}
    record = os.path.join(os.path.dirname(os.path.abspath(weights_path)), RECORD_FILE)
    try:
        with open(record) as f:
            model = json.load(f)["hparams"]["recipe"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(model, dict):
        return {}
    defaults = asdict(ViTConfig())
    return {k: model.get(k, defaults[k]) for k in MODEL_FIELDS}


def build_vit_estimator(*, app: str, num_classes: int, dataset: str, data_dir: Optional[str], recipe: Recipe,
                        overrides: Dict[str, Any], run: Dict[str, Any], save_dir: Optional[str], overwrite: Any,
                        device_augment: Optional[bool], precision: Optional[str], compile: Optional[bool],
                        cuda_graph: Optional[bool], num_process: Optional[int], resume: Any = False,
                        seed: Optional[int] = None, weights_path: Optional[str] = None,
                        init_model: Optional[Callable[[torch.nn.Module], None]] = None, save_encoder: bool = False,
                        hparams: Optional[Dict[str, Any]] = None, validation: Any = 0) -> fe.Estimator:
    """A FastEstimator Estimator training the `ViTModel` of `recipe` on a CIFAR-shaped task.

    run: the checked run options (`common.run_options`); overrides: the user's, as applied (for the record);
    weights_path: start from this saved model (for `fastestimator test`); init_model: fills the fresh model (a
    pretrained encoder); save_encoder: write `vit_encoder.pt` at the end; hparams: more for the record; validation:
    evaluate (and pick the best model) on the last this many training images instead of the test set, which then
    stays for `fastestimator test` alone."""
    model_name = f"vit_{app}"
    validation = options.whole_number("validation", validation)
    ranks = distributed.setup()  # under torchrun: join the process group on this rank's GPU; else one process
    hw = resolve_hardware(recipe, device_augment, precision, compile, num_process, cuda_graph)
    strong = recipe.augment != "apphub"
    if strong and not hw.device_augment:
        raise options.OptionError(f"augment={recipe.augment!r} runs as batched ops: use device_augment=True with it, "
                                  f"or augment='apphub' for the per-sample pipeline")
    if ranks.size > 1 and not hw.device_augment:
        raise options.OptionError(f"device_augment=False (the per-sample pipeline) is not sharded over torchrun's "
                                  f"{ranks.size} processes: use device_augment=True (the default; augment='apphub' "
                                  f"runs batched too) with torchrun, or run in one process")
    if recipe.batch_size % ranks.size:
        raise options.OptionError(f"batch_size={recipe.batch_size} is the global batch, split evenly over torchrun's "
                                  f"{ranks.size} processes: pass a multiple of {ranks.size}")
    asked = "distill" in overrides or any(k in overrides and getattr(recipe.model, k)
                                          for k in TEACHER_FIELDS)  # for a teacher
    if init_model is not None and recipe.distill and not asked:
        # The recipe's teacher is for a ViT that learns from random weights, where it measured best; a pretrained
        # encoder finetunes without one (its 12 epochs would outlast a short finetuning), unless `distill` (or the
        # distillation head or locality guidance, which need the teacher) is given.
        recipe = replace(recipe, distill=0.0, model=replace(recipe.model, **TEACHER_FIELDS))
    distill = recipe.distill > 0 and weights_path is None  # a saved model only evaluated needs no teacher
    if recipe.ema and ranks.size > 1:
        raise options.OptionError(f"ema={recipe.ema} keeps its average in one process's checkpoint: run it in one "
                                  f"process, or pass ema=0 under torchrun")
    if distill and not hw.device_augment:
        raise options.OptionError(f"distill={recipe.distill} runs the teacher on the batched augmentation's images: "
                                  f"use device_augment=True with it, or distill=0")
    outputs = [best_model_file(model_name, "accuracy"), GRID_FILE] + ([ENCODER_FILE] if save_encoder else []) + \
        ([TEACHER_FILE] if distill else [])
    folder = start_run(app, save_dir, outputs, overwrite, resume, seed, distributed=True)
    save_dir = folder.save_dir
    init = init_model if weights_path is None else (lambda model: load_weights(model, weights_path))
    # the model (and any pretrained or saved weights) before the data: a bad weights file fails in seconds
    if hw.gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 leftovers (optimizer, norms) on tensor cores
    model = build_vit(model_name, num_classes, recipe, hw, init)

    # 1. pipeline: per-sample NumpyOps in the workers, or (device_augment) uint8 batches gathered on the device for
    #    the batched ops; full batches only in training (one compiled shape, every step the same size). The test split
    #    is both the eval and the test data, unless `validation` holds out the last training images to evaluate on.
    #    Under torchrun each rank takes its slice of every global batch, in an order all ranks draw from one seed;
    #    rank 0 alone evaluates (the others have no eval data).
    train_data, test_data = load_cifar(num_classes, dataset, data_dir, **synthetic_sizes(run["synthetic_size"]))
    train_data, eval_data = hold_out(train_data, validation) if validation else (train_data, test_data)
    train_loader = train_arrays = eval_arrays = None
    if hw.device_augment:
        # on the device once, for the student's loaders and the teacher's alike
        train_arrays, eval_arrays = (device_arrays(dataset_arrays(data), default_device())
                                     for data in (train_data, eval_data))
        held_out = BatchLoader(eval_arrays, hw.eval_batch_size, shuffle=False)
        test = (held_out if eval_data is test_data
                else BatchLoader(dataset_arrays(test_data), hw.eval_batch_size, shuffle=False))
        sharding = dict(rank=ranks.rank, world_size=ranks.size, seed=distributed.shared_seed(seed)) \
            if ranks.size > 1 else {}
        train_loader = BatchLoader(train_arrays, recipe.batch_size, shuffle=True, drop_last=True,
                                   **sharding)
        pipeline = fe.Pipeline(train_data=train_loader, eval_data=held_out if ranks.main else None, test_data=test)
        augment_ops = batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, strong=strong, num_classes=num_classes,
                                        label_smoothing=recipe.label_smoothing, fuse=True, compile=hw.compile,
                                        policy=recipe.augment if strong else "autoaugment", mix_prob=recipe.mix_prob)
    else:
        pipeline = cifar_pipeline(train_data, eval_data, batch_size=recipe.batch_size, test_data=test_data,
                                  num_process=hw.num_process)
        augment_ops = []

    # 2. network (first the teacher's own, trained here on the same training images, when the recipe distils)
    average = WeightAverage(model, recipe.ema) if recipe.ema and weights_path is None else None

    def student_network(teacher_model: Optional[torch.nn.Module]) -> fe.Network:
        return classifier_network(model, augment_ops, num_classes, recipe, hw,
                                  train_label="y_soft" if recipe.mix_prob else "y",  # MixUpCutMix writes y_soft
                                  teacher=teacher_model, average=average)

    teacher = beside = None
    if distill:
        alongside: Dict[str, Any] = {}  # train_teacher's frozen teacher and work beside it, where there is work
        if BESIDE_TEACHER and hw.compile and ranks.size == 1 and len(train_loader):
            # The student's network is built, and its compiled graphs traced and compiled (or loaded from the cache),
            # on a thread of its own while the teacher trains: on the frozen teacher it will call, whose weights
            # come after the training. Else that work comes after the teacher, in FastEstimator's warm-up and the
            # first training step.
            frozen = frozen_teacher(num_classes, hw, feature_map=recipe.model.guide > 0)

            def student_prewarmed() -> fe.Network:
                compile_model(frozen)
                network = student_network(frozen)
                network.prewarm({"train": train_loader.first_batch(), "eval": held_out.first_batch()})
                return network
            beside = BesideTeacher(student_prewarmed)
            alongside = dict(frozen=frozen, beside=beside)

        def teach(reuse: bool, **kwargs: Any) -> Dict[str, Any]:
            return train_teacher(train_arrays, eval_arrays, num_classes, recipe.teacher_epochs, hw, CIFAR_MEAN,
                                 CIFAR_STD, path=os.path.join(save_dir, TEACHER_FILE), reuse=reuse,
                                 train_steps_per_epoch=run["train_steps_per_epoch"],
                                 feature_map=recipe.model.guide > 0, **kwargs)

        if ranks.size == 1:
            teacher = teach(folder.resume, **alongside)
        else:  # under torchrun rank 0 trains (or on a resume reloads) and saves it, then the other ranks load that one
            trained: Dict[str, Any] = {}
            distributed.run_on_main(lambda: trained.update(teach(folder.resume)))
            teacher = trained if ranks.main else teach(True)
    network = beside.result(fallback=lambda: student_network(teacher["model"])) if beside is not None else \
        student_network(None if teacher is None else teacher["model"])

    # 3. estimator
    metrics: List[Any] = [Accuracy(true_key="y", pred_key="y_pred")]
    # with TTA, in the last epoch's eval (and in test): the same model on single images (and on flips alone), for the
    # record: what TTA adds (the evals before predict on single images, classifier_network)
    views = [Accuracy(true_key="y", pred_key="y_pred_no_tta", output_name="accuracy_no_tta")] \
        if recipe.tta != "none" else []
    if recipe.tta == "flip_translate":
        views.append(Accuracy(true_key="y", pred_key="y_pred_flip", output_name="accuracy_flip"))
    metrics += last_epoch_only(views, recipe.epochs)
    traces = []
    schedule = lr_schedule(recipe, run["train_steps_per_epoch"] or len(train_data) // recipe.batch_size)
    if schedule is not None:
        traces.append(LRScheduler(model=model, lr_fn=schedule))
    if ranks.size > 1:
        traces.append(distributed.ShardEpoch(train_loader))
    if save_encoder and ranks.main:
        traces.append(EncoderSaver(model, save_dir, overwrite=folder.overwrite))
    if ranks.main:  # eval images as the model sees them: normalised, channels first, in both pipeline paths
        traces.append(PredictionGrid("x", "y", "y_pred", class_names(num_classes, dataset), save_dir,
                                     mean=CIFAR_MEAN, std=CIFAR_STD, channels_first=True))
    config = {"recipe": asdict(recipe), "overrides": overrides, "hardware": asdict(hw), "num_classes": num_classes,
              "dataset": dataset, "data_dir": data_dir, "weights_path": weights_path, "validation": validation,
              "teacher": None if teacher is None else {k: v for k, v in teacher.items() if k != "model"},
              **(hparams or {}),
              **{k: v for k, v in run.items() if k not in ("epochs", "batch_size")}}
    return finish_estimator(pipeline=pipeline, network=network, models=[model], app=model_name, folder=folder,
                            dataset=f"synthetic CIFAR-{num_classes}" if dataset == "synthetic" else dataset,
                            hparams=config, epochs=recipe.epochs,
                            train_steps_per_epoch=run["train_steps_per_epoch"],
                            eval_steps_per_epoch=run["eval_steps_per_epoch"], log_steps=run["log_steps"],
                            metrics=metrics, traces=traces,
                            stateful=[EvalWithAverage(average)] if average is not None else [], compiling=hw.compile)
