"""What every app shares: where a run writes (never over a user's files), the checks of the run options, loading a
saved model, and the estimator's tail (best-model saving, prediction grid, run record)."""
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import fastestimator as fe
import torch
from fastestimator.schedule.schedule import Scheduler
from fastestimator.trace import Trace

from apphub_vit import options
from apphub_vit.distributed import LAUNCH, launched, run_on_main, world
from apphub_vit.encoder_io import read_weights, unwrap
from apphub_vit.records import RECORD_FILE, RunRecorder
from apphub_vit.runs import (CHECKPOINT_FILE, AppEstimator, Checkpoint, DivergenceGuard, RunLock, SafeBestModelSaver,
                             load_checkpoint)
from networks.util import state_dict_mismatches

# Said when fit() begins: FastEstimator's warm-up, where torch.compile compiles, prints nothing, and on a fresh machine
# it lasts a minute and more (docs/performance.md, "Each graph compiled once")
COMPILE_NOTE = ("apphub_vit: torch.compile compiles the model now, before training starts: a minute or more into an "
                "empty compile cache (a machine's first run), seconds once the cache holds its graphs")


def resolve_save_dir(save_dir: Optional[str], app: str) -> str:
    """The run's output folder: `save_dir`, or a fresh `runs/<app>-<timestamp>` under the working directory.

    Chosen at call time (not as a default argument, which would run once at import) and printed, so the user knows
    where the weights went.
    """
    if save_dir is None:
        save_dir = os.path.join("runs", f"{app}-{time.strftime('%Y%m%d-%H%M%S')}")
        print(f"{app}: writing outputs to {os.path.abspath(save_dir)}")
    save_dir = os.path.abspath(os.path.expanduser(save_dir))
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise NotADirectoryError(f"save_dir '{save_dir}' is a file, not a folder: pass a folder for the run's outputs.")
    os.makedirs(save_dir, exist_ok=True)
    return save_dir


def ensure_outputs_free(save_dir: str, names: Iterable[str], overwrite: bool) -> None:
    """Fail before training, not after, if the run would replace files a user already has in `save_dir`."""
    taken = [name for name in names if os.path.exists(os.path.join(save_dir, name))]
    if taken and not overwrite:
        raise FileExistsError(f"save_dir '{save_dir}' already holds {', '.join(taken)} from an earlier run; not "
                              f"overwriting saved weights. Choose another save_dir, or pass overwrite=True "
                              f"(--overwrite True) to replace them.")


def best_model_file(model_name: str, metric: str) -> str:
    """The file name FastEstimator's BestModelSaver writes."""
    return f"{model_name}_best_{metric}.pt"


@dataclass(frozen=True)
class RunFolder:
    """A run's save_dir, held by its lock; `overwrite`: the run may replace the files there (its own, on a resume).
    Under torchrun only rank 0 holds the lock (the other ranks' `lock` is None: they write nothing)."""
    save_dir: str
    overwrite: bool
    resume: bool
    lock: Optional[RunLock]


def start_run(app: str, save_dir: Optional[str], outputs: Sequence[str], overwrite: Any, resume: Any = False,
              seed: Any = None, distributed: bool = False) -> RunFolder:
    """The run's folder, made and locked (`apphub_vit.runs.RunLock`), checked to hold none of `outputs` unless
    overwrite, or to hold a checkpoint to resume from; `seed` seeds every generator (`fe.enable_deterministic`).

    distributed: the app trains under torchrun (`apphub_vit.distributed`); rank 0 alone makes, checks and locks the
    folder, the others take its path (and its error, if any); rank r seeds its generators with seed + r, so that the
    ranks' augmentations differ. An app without it refuses to start under torchrun."""
    overwrite, resume = options.boolean("overwrite", overwrite), options.boolean("resume", resume)
    seed = None if seed is None else options.whole_number("seed", seed)
    if launched().size > 1 and not distributed:
        raise options.OptionError(f"{app} trains in one process, but torchrun started {launched().size} (every one "
                                  f"would train alone and write the same files). Run it without torchrun; torchrun "
                                  f"runs the ViT apps: {LAUNCH.format(n=launched().size)}")
    held: List[RunLock] = []

    def claim() -> str:
        folder = resolve_save_dir(save_dir, app)
        if resume:
            load_checkpoint(os.path.join(folder, CHECKPOINT_FILE))  # fails fast, saying why, when there is none
        else:
            ensure_outputs_free(folder, [*outputs, RECORD_FILE, CHECKPOINT_FILE], overwrite)
        held.append(RunLock.acquire(folder))
        return folder

    folder = run_on_main(claim)
    if seed is not None:
        fe.enable_deterministic(seed + world().rank)
    return RunFolder(folder, overwrite or resume, resume, held[0] if held else None)


def run_options(epochs: Any, batch_size: Any, train_steps_per_epoch: Any, eval_steps_per_epoch: Any, log_steps: Any,
                synthetic_size: Any) -> Dict[str, Any]:
    """The run options every app takes, checked; `epochs` and `batch_size` left at None are the recipe's."""
    return dict(epochs=options.optional_positive_int("epochs", epochs),
                batch_size=options.optional_positive_int("batch_size", batch_size),
                train_steps_per_epoch=options.optional_positive_int("train_steps_per_epoch", train_steps_per_epoch),
                eval_steps_per_epoch=options.optional_positive_int("eval_steps_per_epoch", eval_steps_per_epoch),
                log_steps=None if log_steps is None else options.whole_number("log_steps", log_steps),
                synthetic_size=options.int_list("synthetic_size", synthetic_size, 2))


def synthetic_sizes(synthetic_size: Optional[List[int]]) -> Dict[str, int]:
    """The keyword arguments of the data loaders for `synthetic_size` ([train, eval] image counts)."""
    return {} if synthetic_size is None else {"num_train": synthetic_size[0], "num_eval": synthetic_size[1]}


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load a whole saved model (FastEstimator's BestModelSaver `.pt`, a state_dict) into `model`, for
    `fastestimator test`; a file that does not fit says what differs."""
    state = read_weights(path, "Saved model weights (weights_path)",
                         "Pass a model saved by a run, e.g. <save_dir>/<model>_best_accuracy.pt.",
                         inside="<model>_best_accuracy.pt")
    target = unwrap(model)
    optional = tuple(getattr(target, "training_only", ()))
    if isinstance(state, dict) and optional:
        # parts only training uses may be in the file or not: the file's are dropped where this model has none, and
        # this model keeps its own (fresh) ones where the file has none
        own = target.state_dict()
        is_optional = (lambda key: isinstance(key, str) and key.startswith(optional))
        state = {**{k: v for k, v in own.items() if is_optional(k)},
                 **{k: v for k, v in state.items() if not is_optional(k) or k in own}}
    problems = state_dict_mismatches(target.state_dict(), state) if isinstance(state, dict) else ["not a state_dict"]
    if problems:
        heads = [] if not isinstance(state, dict) else [  # the file has a head this model lacks, or the other way
            f"{field}={has}" for prefix, field in getattr(target, "optional_heads", {}).items()
            for has in [any(isinstance(k, str) and k.startswith(prefix) for k in state)]
            if has != any(k.startswith(prefix) for k in target.state_dict())]
        raise ValueError(f"weights_path '{path}' does not fit this model: {'; '.join(problems)}. Pass the architecture "
                         f"it was trained with (its run_record.json's hparams.recipe.model" +
                         (f"; this file was saved with {', '.join(heads)})." if heads else ")."))
    target.load_state_dict(state)


def finish_estimator(*, pipeline: fe.Pipeline, network: fe.Network, models: Sequence[torch.nn.Module], app: str,
                     folder: RunFolder, dataset: str, hparams: Dict[str, Any], epochs: int,
                     train_steps_per_epoch: Optional[int], eval_steps_per_epoch: Optional[int], log_steps: int,
                     metrics: Sequence[Union[Trace, Scheduler[Trace]]] = (),
                     best: Tuple[str, str] = ("accuracy", "max"),
                     loss_key: str = "ce", traces: Sequence[Trace] = (), stateful: Sequence[Trace] = (),
                     compiling: bool = False, **recorder: Any) -> fe.Estimator:
    """The estimator of an app: `metrics` first (a metric of some epochs only: an `EpochScheduler` of it), then a
    best-model saver per model on `best` (metric, "max" / "min"), the app's other `traces` (those in `stateful` too,
    which have `state()` / `load_state()` for the checkpoint, in one process only), the RunRecorder (after every
    metric), the divergence guard on the training `loss_key` and the per-epoch checkpoint (`apphub_vit.runs`).
    `estimator.model` is the first model (what `pretrain()` / `finetune()` return), `estimator.config` the hparams.
    compiling: the models are under torch.compile, and `fit()` says so before FastEstimator's warm-up."""
    ranks = world()
    # under torchrun the other ranks save nothing and record nothing; every rank restores a checkpoint on a resume
    savers = [SafeBestModelSaver(m, folder.save_dir, metric=best[0], save_best_mode=best[1])
              for m in models] if ranks.main else []
    record = RunRecorder(app, folder.save_dir, dataset, hparams=hparams, models=list(models),
                         overwrite=folder.overwrite, world_size=ranks.size, **recorder) if ranks.main else None
    guard = DivergenceGuard(loss_key,
                            on_diverge=lambda message: record is not None and setattr(record, "ended", message))
    if stateful and ranks.size > 1:
        raise ValueError("traces with a checkpointed state are restored in one process only (torchrun's ranks but "
                         "rank 0 keep no saver or recorder states to line them up with)")
    recorded = [record] if record is not None else []
    checkpoint = Checkpoint(folder.save_dir, models, [*savers, *stateful, *recorded] if recorded else [], hparams,
                            folder.lock, resume=folder.resume, write=ranks.main)
    estimator = AppEstimator(pipeline=pipeline, network=network, epochs=epochs,
                             traces=[*metrics, *savers, *stateful, *traces, guard, *recorded, checkpoint],
                             train_steps_per_epoch=train_steps_per_epoch, eval_steps_per_epoch=eval_steps_per_epoch,
                             log_steps=log_steps if ranks.main else None)  # one log: rank 0's
    estimator.guard = guard
    estimator.recorder = record
    estimator.warmup_note = COMPILE_NOTE if compiling and ranks.main else None
    estimator.model = models[0]
    estimator.config = hparams
    return estimator
