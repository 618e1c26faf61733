"""A machine-readable record of every app run: `<save_dir>/run_record.json`, written by the `RunRecorder` trace.

The record is what `apphub_vit.compare` reads to put runs side by side. It holds (format ``apphub_vit.run_record/1``):

* ``app``, ``run`` (the save_dir's folder name), ``save_dir``, ``dataset``, ``hparams`` (as the app passed them),
  ``notes`` (free text, e.g. "no ImageNet weights: trained from scratch");
* ``schedule``: epochs asked and run, steps per epoch, the measured train batch size, the final global step, and
  whether a trace stopped training early;
* ``parameters``: total and trainable counts over all models given (shared parameters counted once), and per model;
* ``metrics``: which eval key is the accuracy (None when the app has none, as the MNIST autoencoder) and which the loss;
* ``eval``: one entry per eval epoch, ``{"epoch", "step", "metrics": {key: value}, "images", "seconds", "elapsed",
  "time"}`` with every numeric scalar the eval epoch logged (the same values FastEstimator's Logger prints and writes
  into `System.summary`), the images it evaluated, the epoch's own seconds (where a slow first eval shows), the seconds
  since `fit()` began and the Unix time at the epoch's end (for time to accuracy);
* ``train_log``: the training values FastEstimator logged every `log_steps` steps (loss, steps/sec), with their step;
* ``best_accuracy`` / ``best_accuracy_step`` / ``final_accuracy`` and ``best_loss`` / ``final_loss`` (None if absent);
* ``timing``: train seconds (the train epochs only: eval epochs and the time between are excluded), eval seconds,
  total seconds, the Unix time `fit()` began (``fit_started``: what came before it in the process is start-up), the
  seconds of FastEstimator's work in `fit()` before the first epoch (``warmup_seconds``: its warm-up step in each mode,
  where torch.compile traces the model and compiles it or loads it from its cache; part of the start-up; None where the
  estimator did not say when `fit()` was called, as `apphub_vit.runs.AppEstimator` does), train images seen and train
  images per second (both summed over torchrun's ranks);
* ``distributed``: ``world_size`` (1 in one process), ``backend`` (None, "gloo", "nccl"), ``global_batch_size`` and
  ``per_rank_batch_size`` (``schedule.batch_size`` is the global one), ``train_images_per_second_per_rank``;
* ``device`` (cpu, or the CUDA device's name; GPU count, CPU count, torch threads) and ``versions`` (python, torch,
  torchvision, fastestimator, numpy).

The values come from FastEstimator itself: the eval metrics are read from the eval epoch's `Data` logs after every
other trace has written into it (the recorder, like FastEstimator's Logger, asks for all keys, which sorts it last), the
step is `System.global_step`. Timing is the recorder's own `time.perf_counter` around the train epochs (FastEstimator's
TrainEssential only prints its epoch times as strings, and only when log_steps is set); on CUDA it synchronizes first,
so queued GPU work is counted.
"""
import datetime
import json
import os
import platform
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import fastestimator as fe
import numpy as np
import torch
import torch.distributed as dist
from fastestimator.summary.summary import ValWithError
from fastestimator.trace import Trace
from fastestimator.util.data import Data

from networks.util import count_parameters

RECORD_FORMAT = "apphub_vit.run_record/1"
RECORD_FILE = "run_record.json"

ModelArg = Union[None, torch.nn.Module, Iterable[torch.nn.Module]]


def library_versions() -> Dict[str, Optional[str]]:
    """Versions of what a result depends on; None for a library that is not installed."""
    versions: Dict[str, Optional[str]] = {"python": platform.python_version(), "torch": torch.__version__,
                                          "fastestimator": getattr(fe, "__version__", None),
                                          "numpy": np.__version__}
    try:
        import torchvision
        versions["torchvision"] = torchvision.__version__
    except ImportError:
        versions["torchvision"] = None
    return versions


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(models: Sequence[torch.nn.Module], num_devices: int,
                device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Where training ran (`device`, else where the models' parameters live now): "cpu", or "cuda" with its name."""
    device = device or next((p.device for m in models for p in m.parameters()), torch.device("cpu"))
    info: Dict[str, Any] = {"type": device.type, "name": cpu_name(),
                            "num_gpus": num_devices, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info


def to_json_value(value: Any) -> Any:
    """`value` as plain JSON: numbers, strings, lists, dicts; anything else as its repr (hparams may hold objects)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value if not isinstance(value, float) or np.isfinite(value) else str(value)
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)) and np.asarray(_cpu(value)).size == 1:
        return to_json_value(np.asarray(_cpu(value)).item())
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_json_value(v) for v in value]
    return repr(value)


def _cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def scalar(value: Any) -> Optional[float]:
    """A logged value as a float, or None when it is not one number (arrays such as confusion matrices, text)."""
    if isinstance(value, ValWithError):
        value = value.y
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.generic, np.ndarray, torch.Tensor)):
        array = np.asarray(_cpu(value))
        if array.size == 1 and np.issubdtype(array.dtype, np.number):
            number = float(array.item())
            return number if np.isfinite(number) else None
    return None


def _batch_size(data: Data) -> Optional[int]:
    """The batch dimension of the first array-like in a train batch."""
    for value in data.maps[1].values() if len(data.maps) > 1 else data.values():
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) >= 1:
            return int(shape[0])
    return None


class RunRecorder(Trace):
    """Writes `<save_dir>/run_record.json` at the end of `fit()`: what ran, how well, how fast, on what.

    Add it to an Estimator's traces (or use `attach_recorder`). It refuses, in its constructor and again when training
    begins, to replace a record an earlier run left in save_dir, unless `overwrite=True`; a second `fit()` of the same
    estimator replaces its own first record.

    Args:
        app: The app's name, e.g. "vit_pretrain", "resnet18".
        save_dir: The run's output folder (the record goes here; created if missing).
        dataset: What the app trained on, e.g. "cifair100", "synthetic", "mnist".
        hparams: The hyperparameters the run was built with (JSON-able values; others are stored as their repr).
        models: The models whose parameters to count; None counts every model of the estimator's network.
        overwrite: Replace an existing record in save_dir.
        accuracy_key: The eval key holding accuracy. A run without it (the autoencoder) records None for accuracies.
        loss_key: The eval key holding the loss; None takes the network's loss key (the first, sorted, if several).
        notes: Free-text remarks stored in the record and shown under the comparison table.
        world_size: The data-parallel processes training together (torchrun's; the recorder runs on rank 0, whose
            batches are `1 / world_size` of every step's, all ranks stepping together).
    """
    def __init__(self, app: str, save_dir: str, dataset: str, hparams: Optional[Dict[str, Any]] = None,
                 models: ModelArg = None, overwrite: bool = False, accuracy_key: str = "accuracy",
                 loss_key: Optional[str] = None, notes: Sequence[str] = (), world_size: int = 1) -> None:
        # "*" as FastEstimator's Logger: the trace sorts after every trace that writes eval metrics, so on_epoch_end
        # sees them all. Train and eval only: an estimator.test() afterwards must not rewrite the record.
        super().__init__(inputs="*", mode=["train", "eval"])
        self.app = app
        self.save_dir = os.path.abspath(os.path.expanduser(save_dir))
        self.path = os.path.join(self.save_dir, RECORD_FILE)
        self.dataset = dataset
        self.hparams = dict(hparams or {})
        self.models = [models] if isinstance(models, torch.nn.Module) else None if models is None else list(models)
        self.overwrite = overwrite
        self.accuracy_key = accuracy_key
        self.loss_key = loss_key
        self.notes: List[str] = list(notes)
        self.world_size = world_size
        self.written: Optional[str] = None
        self.record: Optional[Dict[str, Any]] = None
        self.ended = "finished"  # or how the run stopped (e.g. a DivergenceGuard's message)
        self.resumed: List[int] = []  # epochs after which a killed run was resumed
        # the Unix time the estimator's fit() was called, set by AppEstimator: from it to on_begin is the warm-up
        self.fit_called: Optional[float] = None
        self._check_free()

    def add_note(self, note: str) -> None:
        """Add a remark to the record (e.g. from an app that falls back to no pretrained weights)."""
        self.notes.append(note)

    def _check_free(self) -> None:
        if os.path.exists(self.path) and not self.overwrite and self.written != self.path:
            raise FileExistsError(f"'{self.path}' already holds the record of an earlier run; not overwriting it. "
                                  f"Choose another save_dir, or pass overwrite=True (--overwrite True) to replace it.")

    def on_begin(self, data: Data) -> None:
        self._check_free()
        self._models = self.models if self.models is not None else list(self.system.network.models)
        self._start = time.perf_counter()
        self._started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self._fit_started = time.time()
        self._warmup_seconds = None if self.fit_called is None else self._fit_started - self.fit_called
        self._epoch_start = 0.0
        self._eval_images = 0
        self._train_seconds = self._eval_seconds = 0.0
        self._train_images = 0
        self._batch_size: Optional[int] = None
        self._train_epochs = 0
        self._eval: List[Dict[str, Any]] = []
        self._train_log: List[Dict[str, Any]] = []
        self._device: Optional[torch.device] = None  # seen at the first training step (see on_batch_end)
        self._cuda = any(p.is_cuda for m in self._models for p in m.parameters())

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()  # CUDA runs asynchronously: count the queued work in the epoch that issued it

    def on_epoch_begin(self, data: Data) -> None:
        self._sync()
        self._epoch_start = time.perf_counter()
        self._eval_images = 0

    def on_batch_end(self, data: Data) -> None:
        if self.system.mode != "train":
            self._eval_images += _batch_size(data) or 0  # eval batches need not be the train batch (on a GPU)
            return
        if self._device is None:
            # Where training runs. FastEstimator moves the models to the GPU for each epoch and back to the CPU at the
            # end of fit(), so neither on_begin nor on_end sees the device that trained.
            self._device = next((p.device for m in self._models for p in m.parameters()), torch.device("cpu"))
            self._cuda = self._cuda or self._device.type == "cuda"
        size = _batch_size(data)
        if size is not None:
            self._train_images += size
            self._batch_size = self._batch_size or size
        logs = {k: scalar(v) for k, v in data.read_logs().items()}  # non-empty every log_steps (TrainEssential)
        logs = {k: v for k, v in logs.items() if v is not None}
        if logs:
            self._train_log.append({"step": self.system.global_step, "metrics": logs})

    def on_epoch_end(self, data: Data) -> None:
        self._sync()
        elapsed = time.perf_counter() - self._epoch_start
        if self.system.mode == "train":
            self._train_seconds += elapsed
            self._train_epochs += 1
            return
        self._eval_seconds += elapsed
        metrics = {k: scalar(v) for k, v in data.read_logs().items()}
        entry = {"epoch": self.system.epoch_idx, "step": self.system.global_step or 0,
                 "metrics": {k: v for k, v in metrics.items() if v is not None}, "images": self._eval_images,
                 "seconds": round(elapsed, 4), "elapsed": round(time.perf_counter() - self._start, 3),
                 "time": round(time.time(), 3)}
        if self._eval and self._eval[-1]["epoch"] == entry["epoch"]:  # the eval FastEstimator repeats on a resume
            self._eval[-1] = entry
        else:
            self._eval.append(entry)

    def state(self) -> Dict[str, Any]:
        """What a resumed run needs to continue this record (`apphub_vit.runs.Checkpoint`)."""
        return {"elapsed": time.perf_counter() - self._start, "started_at": self._started_at,
                "fit_started": self._fit_started, "warmup_seconds": self._warmup_seconds,
                "train_seconds": self._train_seconds, "eval_seconds": self._eval_seconds,
                "train_images": self._train_images, "batch_size": self._batch_size,
                "train_epochs": self._train_epochs, "eval": self._eval, "train_log": self._train_log,
                "epoch": self.system.epoch_idx}

    def load_state(self, state: Dict[str, Any]) -> None:
        self._start = time.perf_counter() - state["elapsed"]
        self._started_at = state["started_at"]
        self._fit_started = state.get("fit_started", self._fit_started)
        self._warmup_seconds = state.get("warmup_seconds")  # the first process's, as fit_started (None: unknown)
        self._train_seconds, self._eval_seconds = state["train_seconds"], state["eval_seconds"]
        self._train_images, self._batch_size = state["train_images"], state["batch_size"]
        self._train_epochs, self._eval, self._train_log = state["train_epochs"], state["eval"], state["train_log"]
        self.resumed.append(state["epoch"])

    def on_end(self, data: Data) -> None:
        self.record = self.build_record()
        os.makedirs(self.save_dir, exist_ok=True)
        tmp = f"{self.path}.partial"
        with open(tmp, "w") as f:
            json.dump(self.record, f, indent=2)
            f.write("\n")
        os.replace(tmp, self.path)  # a kill mid-write never leaves a truncated record under the real name
        self.written = self.path
        print(f"FastEstimator-RunRecorder: Saved run record to {self.path}")

    def build_record(self) -> Dict[str, Any]:
        """The record as a dict (what `on_end` writes)."""
        loss_key = self.loss_key
        if loss_key is None:
            loss_keys = sorted(self.system.network.get_loss_keys())
            loss_key = loss_keys[0] if loss_keys else None

        def series(key: Optional[str]) -> List[Dict[str, Any]]:
            return [e for e in self._eval if key is not None and key in e["metrics"]]

        accuracy = series(self.accuracy_key)
        loss = series(loss_key)
        best_acc = max(accuracy, key=lambda e: e["metrics"][self.accuracy_key]) if accuracy else None
        train_seconds = round(self._train_seconds, 3)
        # every rank steps with the same batch size in lockstep (the gradient all-reduce): ranks x this rank's count
        images = self._train_images * self.world_size
        per_rank = self._train_images / train_seconds if train_seconds else None
        return {
            "format": RECORD_FORMAT,
            "app": self.app,
            "run": os.path.basename(self.save_dir),
            "save_dir": self.save_dir,
            "dataset": self.dataset,
            "hparams": to_json_value(self.hparams),
            "notes": list(self.notes),
            "started": self._started_at,
            "ended": self.ended,
            "resumed_after_epochs": list(self.resumed),
            "schedule": {
                "epochs": self.system.total_epochs,
                "train_epochs_run": self._train_epochs,
                "train_steps_per_epoch": self.system.train_steps_per_epoch,
                "eval_steps_per_epoch": self.system.eval_steps_per_epoch,
                "log_steps": self.system.log_steps,
                "batch_size": self._batch_size and self._batch_size * self.world_size,
                "global_steps": self.system.global_step or 0,
                "stopped_early": self._train_epochs < self.system.total_epochs,
            },
            "parameters": count_parameters(self._models),
            "metrics": {"accuracy_key": self.accuracy_key if accuracy else None,
                        "loss_key": loss_key if loss else None},
            "eval": self._eval,
            "train_log": self._train_log,
            "best_accuracy": best_acc["metrics"][self.accuracy_key] if best_acc else None,
            "best_accuracy_step": best_acc["step"] if best_acc else None,
            "final_accuracy": accuracy[-1]["metrics"][self.accuracy_key] if accuracy else None,
            "best_loss": min(e["metrics"][loss_key] for e in loss) if loss else None,
            "final_loss": loss[-1]["metrics"][loss_key] if loss else None,
            "timing": {
                "train_seconds": train_seconds,
                "eval_seconds": round(self._eval_seconds, 3),
                "total_seconds": round(time.perf_counter() - self._start, 3),
                "fit_started": round(self._fit_started, 3),
                "warmup_seconds": None if self._warmup_seconds is None else round(self._warmup_seconds, 3),
                "train_images": images,
                "train_images_per_second": round(images / train_seconds, 2) if train_seconds else None,
            },
            "distributed": {
                "world_size": self.world_size,
                "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
                "global_batch_size": self._batch_size and self._batch_size * self.world_size,
                "per_rank_batch_size": self._batch_size,
                "train_images_per_second_per_rank": None if per_rank is None else round(per_rank, 2),
            },
            "device": device_info(self._models, self.system.num_devices, self._device),
            "versions": library_versions(),
        }


def find_recorder(estimator: fe.Estimator) -> Optional[RunRecorder]:
    """The estimator's RunRecorder, if it has one."""
    return next((t for t in estimator.traces if isinstance(t, RunRecorder)), None)


def attach_recorder(estimator: fe.Estimator, app: str, save_dir: str, dataset: str,
                    hparams: Optional[Dict[str, Any]] = None, **kwargs: Any) -> RunRecorder:
    """Give an estimator built without a RunRecorder one; for one that has its own, add to it `kwargs["notes"]` and
    the `hparams` keys it lacks (the app's own values win), and return it.

    For apps that do not wire the recorder in themselves: the Estimator's trace list is read when `fit()` starts, so a
    trace appended before then takes part.
    """
    recorder = find_recorder(estimator)
    if recorder is not None:
        for note in kwargs.get("notes", ()):
            recorder.add_note(note)
        recorder.hparams = {**(hparams or {}), **recorder.hparams}
        return recorder
    recorder = RunRecorder(app=app, save_dir=save_dir, dataset=dataset, hparams=hparams, **kwargs)
    estimator.traces.append(recorder)
    return recorder


# What compare needs; everything else in a record may be missing (and shows as a blank).
_REQUIRED = {"app": str, "eval": list}


class RecordError(ValueError):
    """A file that is not a readable run record: missing, empty, truncated, not JSON, or another tool's JSON."""


def read_record(path: str) -> Dict[str, Any]:
    """Read and check one `run_record.json`. Every problem raises `RecordError` naming the file and what is wrong."""
    if not os.path.exists(path):
        raise RecordError(f"'{path}': no such file (expected a {RECORD_FILE} written by an app's RunRecorder).")
    if not os.path.isfile(path):
        raise RecordError(f"'{path}' is not a file.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"'{path}' cannot be read ({type(err).__name__}: {err}).") from err
    if not text.strip():
        raise RecordError(f"'{path}' is empty: the run that should have written it did not finish, or the file was "
                          f"cut. Re-run the app, or leave this run out (--skip-bad).")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); is it "
                          f"truncated? Re-run the app, or leave this run out (--skip-bad).") from err
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise RecordError(f"'{path}' is JSON but not an apphub_vit run record (its 'format' is {found!r}, expected "
                          f"{RECORD_FORMAT!r}).")
    problems = [f"'{key}' should be {kind.__name__}" for key, kind in _REQUIRED.items()
                if not isinstance(record.get(key), kind)]
    if not problems:
        problems = [f"eval entry {i} lacks a numeric 'step' or a 'metrics' object" for i, e in enumerate(record["eval"])
                    if not isinstance(e, dict) or not isinstance(e.get("step"), int)
                    or not isinstance(e.get("metrics"), dict)][:3]
    if problems:
        raise RecordError(f"'{path}' is a damaged run record: {'; '.join(problems)}.")
    return record
