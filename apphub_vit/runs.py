"""A run's life in its save_dir: one run per folder, files that a kill never truncates, a checkpoint after every epoch
to resume from, and a stop with a clear message when the loss stops being a number.

* `RunLock`: `<save_dir>/run.lock` holds the process id of the run using the folder, from `get_estimator` to the end of
  `fit()` (or the process). A second run into the folder is refused while that process lives; a lock left by a killed
  run (its process gone) is taken over.
* `atomic_path`: every file the apps write goes to `<name>.partial` first and is renamed over `<name>` when complete
  (`os.replace` is atomic), so a kill mid-write leaves the previous file whole.
* `Checkpoint`: after every eval epoch, `<save_dir>/checkpoint.pt` holds the models and optimisers, epoch and step,
  the best-so-far metrics, the run record's history and every random generator's state (every torchrun rank's);
  `resume=True` continues a killed run from there (FastEstimator's `RestoreWizard` pickles every op, which fails for
  compiled ones on Python 3.11). The learning-rate schedule follows from the restored step. On CPU with a fixed `seed`
  the continued run computes what an uninterrupted one does (under torchrun too, with as many ranks).
* `DivergenceGuard`: a non-finite training loss stops training within `check_every` steps; nothing non-finite is
  saved (`SafeBestModelSaver`, `encoder_io.save_encoder` check the weights), the record says how the run ended, and
  `fit()` raises `TrainingDiverged` (the command line exits non-zero).
"""
import atexit
import contextlib
import gc
import json
import os
import random
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import fastestimator as fe
import numpy as np
import torch
from fastestimator.trace import Trace
from fastestimator.trace.io import BestModelSaver
from fastestimator.util.data import Data

from apphub_vit.distributed import all_ranks, gather_to_main, single_device, world
from apphub_vit.encoder_io import unwrap
from networks.util import non_finite

LOCK_FILE = "run.lock"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "apphub_vit.checkpoint/1"
# hparams entries that a run measures rather than chooses (the distillation teacher's accuracy and time, which a
# resumed run measures again on the teacher it reloads): left out of the comparison a resume makes
MEASURED_HPARAMS = ("teacher", )


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary name beside `path` to write to; on success it replaces `path` in one rename."""
    tmp = f"{path}.partial"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


class RunLock:
    """The lock of one save_dir, held by this process until `release()` (or the process's exit)."""
    _held: Dict[str, "RunLock"] = {}  # by folder: this process's locks

    def __init__(self, save_dir: str) -> None:
        self.path = os.path.join(save_dir, LOCK_FILE)

    @classmethod
    def acquire(cls, save_dir: str) -> "RunLock":
        """Take the folder's lock; refuse, naming the process, if another live process holds it."""
        lock = cls._held.get(save_dir) or cls(save_dir)
        while True:
            try:
                fd = os.open(lock.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = lock.owner()
                if owner == os.getpid():  # this process built an estimator here before: still ours
                    break
                if owner is not None and _alive(owner):
                    raise RuntimeError(f"save_dir '{save_dir}' is in use by another run (process {owner}, lock file "
                                       f"{lock.path}). Wait for it to finish, or choose another save_dir.") from None
                os.remove(lock.path)  # stale: its process is gone (killed); take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            break
        cls._held[save_dir] = lock
        return lock

    def owner(self) -> Optional[int]:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or -1)
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.owner() == os.getpid():
            os.remove(self.path)
        self._held.pop(os.path.dirname(self.path), None)


@atexit.register
def _release_all() -> None:
    for lock in list(RunLock._held.values()):
        lock.release()


class TrainingDiverged(RuntimeError):
    """The training loss stopped being a finite number; the message says where and what to try."""


class DivergenceGuard(Trace):
    """Stops training at a non-finite training loss, read every `check_every` steps (on a GPU a read waits for the
    step, so not at every one) and at the end of every training epoch, before its eval."""
    def __init__(self, loss_key: str, on_diverge: Callable[[str], None], check_every: int = 10) -> None:
        super().__init__(inputs=loss_key, mode="train")
        self.loss_key, self.on_diverge, self.check_every = loss_key, on_diverge, check_every
        self.diverged: Optional[str] = None
        self._finite: Optional[torch.Tensor] = None

    def on_batch_end(self, data: Data) -> None:
        loss = torch.as_tensor(data[self.loss_key])
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite
        if self.system.global_step % self.check_every == 0 or loss.device.type == "cpu":
            self._check(loss)

    def on_epoch_end(self, data: Data) -> None:
        self._check(None)

    def _check(self, loss: Optional[torch.Tensor]) -> None:
        # under torchrun every rank checks at the same steps and all stop together when one saw a non-finite loss:
        # a rank that stopped alone would leave the others waiting at their next gradient all-reduce
        if all_ranks(self._finite is None or bool(self._finite)):
            return
        value = "" if loss is None else f" ({float(loss.float().mean())})"
        self.diverged = (f"training diverged: the loss {self.loss_key!r} is not finite by step "
                         f"{self.system.global_step}{value}, so the run stopped; nothing non-finite was saved. Lower "
                         f"the learning rate (--lr), or raise warmup_epochs.")
        print(f"FastEstimator-DivergenceGuard: {self.diverged}", flush=True)
        self.on_diverge(self.diverged)
        self.system.stop_training = True


class SafeBestModelSaver(BestModelSaver):
    """FastEstimator's BestModelSaver, writing each file whole (`atomic_path`) and never weights that are not finite;
    its best-so-far survives a resume (`state` / `load_state`). The file is written in a thread from a copy that
    reaches the host while the GPU goes on (`HostCopy`), started when the next training epoch begins or the run ends:
    the eval epoch does not wait for the copy or the disk."""
    def __init__(self, model: torch.nn.Module, save_dir: str, metric: str, save_best_mode: str) -> None:
        super().__init__(model=model, save_dir=save_dir, metric=metric, save_best_mode=save_best_mode)
        self.rerun_epoch: Optional[int] = None  # the eval FastEstimator repeats after a resume: already counted
        self.writes = BackgroundWrite()

    def flush(self) -> None:
        """Start writing the best model of the last eval, if that has not begun: `Checkpoint` calls it when the next
        training epoch begins (this trace runs in eval only), and before it writes a checkpoint that names it."""
        self.writes.start()

    def on_end(self, data: Data) -> None:
        self.flush()
        self.writes.join()
        super().on_end(data)

    def on_epoch_end(self, data: Data) -> None:
        if self.system.epoch_idx == self.rerun_epoch:
            self.rerun_epoch = None
            data.write_with_log(self.outputs[0], self.since_best)
            data.write_with_log(self.outputs[1], self.best)
            return
        value = data[self.metric]
        if self.monitor_op(value, self.best) and non_finite(self.model.state_dict()):
            print(f"FastEstimator-BestModelSaver: not saving {self.model.model_name}: its weights are not finite")
            value = self.best  # counts as no improvement
        if self.monitor_op(value, self.best):
            self.best, self.since_best = float(value), 0
            path = os.path.join(self.save_dir, f"{self.model_name}.pt")  # FastEstimator's name
            # from the CPU (the model may live on the GPU between epochs); written once the copy has arrived, at the
            # next training epoch's start or the run's end (`flush`), in a thread
            self.writes.submit(HostCopy(unwrap(self.model).state_dict()), lambda state: _save(state, path))
            self.model_path = path
            print(f"FastEstimator-BestModelSaver: Saving model to {path}")
        else:
            self.since_best += 1
        data.write_with_log(self.outputs[0], self.since_best)
        data.write_with_log(self.outputs[1], self.best)

    def state(self) -> Dict[str, Any]:
        return {"best": float(self.best), "since_best": self.since_best, "model_path": self.model_path}

    def load_state(self, state: Dict[str, Any]) -> None:
        self.best, self.since_best, self.model_path = state["best"], state["since_best"], state["model_path"]


def _rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()]}


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class Checkpoint(Trace):
    """Writes `<save_dir>/checkpoint.pt` after every eval epoch and, with `resume`, restores it when training begins;
    releases the run's lock at the end. The copy of the state leaves the GPU without the host waiting
    (`HostCopy`), and a thread writes the file from it once the next training epoch begins (or the run ends), after
    the best-model files it names.

    stateful: traces with `state()` / `load_state(state)` (the best-model savers, the run recorder), restored in order.
    config: what the run was built with (JSON-able); a resume with another configuration is refused, naming the
    fields that differ. write: write checkpoints (False: only restore one, as torchrun's ranks but rank 0 do)."""
    def __init__(self, save_dir: str, models: Sequence[torch.nn.Module], stateful: Sequence[Any],
                 config: Dict[str, Any], lock: Optional[RunLock], resume: bool = False, write: bool = True) -> None:
        super().__init__(inputs="*", mode=["train", "eval"])  # "*": after every trace that writes metrics
        self.path = os.path.join(save_dir, CHECKPOINT_FILE)
        self.models, self.stateful, self.lock, self.resume = list(models), list(stateful), lock, resume
        self.write = write
        self._ranks_rng: Optional[list] = None
        self.config = json.loads(json.dumps(config, default=repr))  # as the file stores it
        self.resumed_from: Optional[int] = None
        self.writes = BackgroundWrite()
        if resume:
            self._saved = load_checkpoint(self.path)
            differ = sorted(k for k in set(self.config) | set(self._saved["config"])
                            if k not in MEASURED_HPARAMS and self.config.get(k) != self._saved["config"].get(k))
            if differ:
                raise ValueError(f"resume=True, but this run's options differ from the checkpointed run's in "
                                 f"{', '.join(differ)}: run the same command as the first time, with --resume True")

    def on_begin(self, data: Data) -> None:
        if not self.resume:
            return
        saved = self._saved
        for model in self.models:
            model.load_state_dict(saved["models"][model.model_name])
            if model.optimizer is not None and model.model_name in saved["optimizers"]:
                model.optimizer.load_state_dict(saved["optimizers"][model.model_name])
        for trace, state in zip(self.stateful, saved["traces"]):
            trace.load_state(state)
            if isinstance(trace, SafeBestModelSaver):
                trace.rerun_epoch = saved["epoch"]  # FastEstimator repeats the last eval epoch after a restore
        self.system.epoch_idx, self.system.global_step = saved["epoch"], saved["step"]
        _set_rng_state(saved["rng"])
        ranks, rank = saved.get("ranks_rng"), world().rank
        if rank and ranks and len(ranks) == world().size:  # torchrun's other ranks (with as many as before)
            _set_rng_state(ranks[rank])
        self.resumed_from = saved["epoch"]
        print(f"FastEstimator-Checkpoint: resumed after epoch {saved['epoch']} (step {saved['step']}) from "
              f"{self.path}")

    def on_epoch_end(self, data: Data) -> None:
        if self.system.mode == "train":
            # under torchrun: every rank's generators, for rank 0 to save (the others do nothing until the next
            # training epoch, while rank 0 evaluates); so that a resume continues each rank's augmentation draws
            self._ranks_rng = gather_to_main(_rng_state()) if world().size > 1 else None
            return
        if not self.write or self.system.mode != "eval" or self.system.epoch_idx == self.resumed_from:
            return
        # the generators' states are new CPU tensors already, and stay whole: as views into one shared buffer (what
        # HostCopy gives) they were restored from the wrong bytes, which crashed a resumed torchrun rank
        fixed = {"format": CHECKPOINT_FORMAT, "epoch": self.system.epoch_idx, "step": self.system.global_step,
                 "config": self.config, "rng": _rng_state(), "ranks_rng": self._ranks_rng}
        state = HostCopy({"models": {m.model_name: m.state_dict() for m in self.models},
                          "optimizers": {m.model_name: m.optimizer.state_dict() for m in self.models
                                         if m.optimizer is not None},
                          "traces": [trace.state() for trace in self.stateful]})
        self.writes.submit(state, lambda copy: _save({**fixed, **copy}, self.path))

    def on_epoch_begin(self, data: Data) -> None:
        if self.system.mode == "train":
            self._flush()

    def _flush(self) -> None:
        """Start writing the last eval's files: the best models first (the checkpoint names them), then, in its thread
        once theirs are written, the checkpoint."""
        savers = [trace for trace in self.stateful if isinstance(trace, SafeBestModelSaver)]
        for saver in savers:
            saver.flush()
        self.writes.start(before=lambda: [saver.writes.join() for saver in savers])

    def on_end(self, data: Data) -> None:
        self._flush()
        self.writes.join()
        if self.lock is not None:
            self.lock.release()


def _cpu(value: Any) -> Any:
    """`value` with its tensors copied to the CPU (detached, as new tensors) and numpy scalars as Python numbers
    (FastEstimator's `set_lr` leaves a numpy float in the optimizer), which `torch.load(weights_only=True)` reads back.
    `HostCopy(value).result()`: the host waits for the copy."""
    return HostCopy(value).result()


class HostCopy:
    """A copy of `value` on the CPU (as `_cpu` returns it), in two halves, so that the host need not wait for the GPU:
    making one queues the copies, `result()` waits for them and returns the copy.

    The tensors of one device and dtype travel together: one `torch.cat` where they live and one copy to the host,
    then views of it. One at a time, the checkpoint of a GPU run (the ViT's parameters, AdamW's two moments and step
    per parameter) is some 450 synchronous copies to pageable memory, about 0.2 s after every epoch on an H200
    (docs/performance.md). From a GPU the copy goes into pinned memory without blocking, so the GPU's queue goes on
    (the training steps queued after it see the weights change only after the copy has read them: one stream)."""
    def __init__(self, value: Any) -> None:
        self._tensors: List[torch.Tensor] = []  # in the order `result` rebuilds them
        self._event: Optional[torch.cuda.Event] = None

        def collect(v: Any) -> Any:  # v with its dicts, lists and tuples copied, its tensors collected
            if isinstance(v, torch.Tensor):
                self._tensors.append(v.detach())
            elif isinstance(v, dict):
                return {k: collect(x) for k, x in v.items()}
            elif isinstance(v, (list, tuple)):
                return type(v)(collect(x) for x in v)
            return v

        # the containers as they are now: the caller may go on changing its own lists and dicts
        self._value = collect(value)
        groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
        for i, tensor in enumerate(self._tensors):
            groups.setdefault((tensor.device, tensor.dtype), []).append(i)
        self._flat: List[Tuple[List[int], torch.Tensor]] = []
        for (device, dtype), members in groups.items():
            flat = torch.cat([self._tensors[i].reshape(-1) for i in members])  # a new tensor where they live
            if device.type == "cuda":
                host = torch.empty(flat.shape, dtype=dtype, pin_memory=True)
                host.copy_(flat, non_blocking=True)
                self._event = self._event or torch.cuda.Event()
                flat = host
            elif device.type != "cpu":
                flat = flat.cpu()
            self._flat.append((members, flat))
        if self._event is not None:
            self._event.record()  # the copies are on the current stream, queued after each other: the last marks all

    def result(self) -> Any:
        """The copy, once every transfer has arrived (a wait for the GPU only until then)."""
        if self._event is not None:
            self._event.synchronize()
        copies: List[torch.Tensor] = list(self._tensors)  # each replaced by its copy below
        for members, flat in self._flat:
            for i, part in zip(members, flat.split([self._tensors[i].numel() for i in members])):
                copies[i] = part.view(self._tensors[i].shape)
                if not self._tensors[i].is_contiguous():
                    # laid out as the original (a channels_last conv weight and its AdamW moments): a resume must give
                    # the fused AdamW each moment in its parameter's layout, and `.to(device)` keeps the file's
                    copies[i] = torch.empty_like(self._tensors[i], device="cpu").copy_(copies[i])
        fresh = iter(copies)

        def rebuild(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return next(fresh)
            if isinstance(v, np.generic):
                return v.item()
            if isinstance(v, dict):
                return {k: rebuild(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return type(v)(rebuild(x) for x in v)
            return v

        return rebuild(self._value)


class BackgroundWrite:
    """One file written from a `HostCopy` by a thread, after the host has made sure (`start`, on the main thread) that
    the copy arrived. The wait is kept off the writer thread: a CUDA call from another thread while `DeviceNetwork`
    captures a CUDA graph would break the capture. A file waits in `pending` until `start()`; `join()` waits for
    the thread."""
    def __init__(self) -> None:
        self.pending: Optional[Tuple[HostCopy, Callable[[Any], None]]] = None
        self._thread: Optional[threading.Thread] = None

    def submit(self, copy: HostCopy, write: Callable[[Any], None]) -> None:
        self.start()  # one file at a time, in order: the previous one first
        self.pending = (copy, write)

    def start(self, before: Callable[[], None] = lambda: None) -> None:
        """Start writing the pending file, if there is one; `before`, run first in the thread (another's join)."""
        if self.pending is None:
            return
        copy, write = self.pending
        self.pending = None
        state = copy.result()
        self.join()
        self._thread = threading.Thread(target=lambda: (before(), write(state)), daemon=False)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _save(state: Any, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint written by `Checkpoint`, read with `weights_only=True`; a clear error if there is none."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume=True, but there is no checkpoint to resume from ('{path}' does not exist): "
                                f"a run writes it after its first epoch. Run without --resume to start over.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"Cannot read the checkpoint '{path}' ({type(err).__name__}); it was not written by this "
                         f"project's apps, or is damaged. Run without --resume to start over.") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"'{path}' is not a checkpoint of this project's apps (format {CHECKPOINT_FORMAT}).")
    return state


def build_model(**kwargs: Any) -> torch.nn.Module:
    """`fe.build(**kwargs)` for the apps: on one device (`distributed.single_device`), and with the full
    `gc.collect()` that FastEstimator runs in every build kept off the objects that exist already (frozen for the call,
    `gc.freeze`). Over the whole heap, which the compiler's imports grow, a collection takes about a quarter of a second
    on a 2-core CPU, and a distilling app builds three models on its way to the student's first step. Called while
    the heap is frozen (`AppEstimator.fit`), it leaves the freezing as it is."""
    if gc.get_freeze_count():
        return single_device(fe.build(**kwargs))
    gc.freeze()
    try:
        return single_device(fe.build(**kwargs))
    finally:
        gc.unfreeze()


class AppEstimator(fe.Estimator):
    """`fe.Estimator` whose `fit()` raises `TrainingDiverged` when its `DivergenceGuard` stopped the run (after every
    trace's on_end: the record is written), so the command line exits non-zero.

    It also keeps Python's garbage collector off the objects that outlive every epoch. FastEstimator's Pipeline calls
    `gc.collect()` at the end of every epoch (train and eval), and `DeviceNetwork` once per CUDA-graph capture; each is
    a full collection over every object in the process, and torch.compile's caches make that about 0.4 s on a GPU
    host, three times per epoch: most of a CIFAR eval epoch, and a whole second per epoch when epochs are short. After
    each epoch the heap is collected once and what survives is frozen (`gc.freeze()`: objects that have lived through
    a whole epoch, such as the compiled graphs, are no longer scanned; they are still freed by their reference counts),
    so later collections scan only the objects of one epoch; what exists when `fit()` begins is frozen at once, so
    that neither the warm-up's collections nor the first epoch's scan it. `fit()` unfreezes at the end, so the run's
    own cycles (models, graphs) can be collected once it is over.

    `DeviceNetwork` keeps the models on the GPU between epochs; `fit()` and `test()` end with its `unload()`, so the
    caller gets them on the CPU, as from FastEstimator's own network."""
    guard: Optional[DivergenceGuard] = None
    recorder: Any = None  # the run's RunRecorder, told when fit() is called: the warm-up is timed apart in the record
    warmup_note: Optional[str] = None  # printed when fit() begins, before FastEstimator's silent warm-up

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        if self.recorder is not None:
            self.recorder.fit_called = time.time()
        if self.warmup_note:
            print(self.warmup_note, flush=True)
        gc.collect()  # what exists before fit() (the models, the data) lives through it: frozen from the start
        gc.freeze()
        try:
            summary = super().fit(*args, **kwargs)
        finally:
            gc.unfreeze()
            self._unload()
        if self.guard is not None and self.guard.diverged:
            raise TrainingDiverged(self.guard.diverged)
        return summary

    def test(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().test(*args, **kwargs)
        finally:
            self._unload()

    def _unload(self) -> None:
        # a DeviceNetwork keeps the models on the GPU between epochs: the caller gets them on the CPU, as from
        # FastEstimator's own Network
        unload = getattr(self.network, "unload", None)
        if unload is not None:
            unload()

    def _run_epoch(self, eager: bool) -> None:
        super()._run_epoch(eager)
        gc.collect()  # the epoch's garbage (the last CUDA graph's reference cycles among it) goes before the freeze
        gc.freeze()
