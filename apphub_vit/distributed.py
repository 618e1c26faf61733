"""Data-parallel training over several processes, one per GPU (or CPU), on PyTorch's `torch.distributed`.

FastEstimator 1.7 has no `torch.distributed` support: with several GPUs visible it wraps every torch model in
`torch.nn.DataParallel` (`fastestimator/network.py`, `_fe_compile`), one process driving all GPUs. This module follows
PyTorch's DistributedDataParallel recipe instead (as timm's and DeiT's `torchrun` launches do), at FastEstimator's own
depth:

* launch: `torchrun --nproc_per_node N -m apphub_vit.distributed pretrain|finetune [--option value ...]` starts one
  process per GPU; each reads torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, uses GPU `LOCAL_RANK` and joins the
  process group (NCCL on GPUs, gloo on CPUs). The options are those of `fastestimator train FILE`, parsed the same way
  (FastEstimator's `parse_cli_to_dictionary`); `--hyperparameters FILE.json` and `--warmup` work as there. Several
  machines: the same command on each, with torchrun's rendezvous flags (`--nnodes`, `--node_rank`, `--rdzv_endpoint`).
* data: every rank draws the same seeded permutation of the training set per epoch and takes its slice of each global
  batch (`pipelines.loader.BatchLoader` with `rank`/`world_size`; `ShardEpoch` tells it the epoch). `batch_size` is
  the global batch, so the recipe's learning-rate rule sees the same batch as in one process.
* gradients: FastEstimator's `UpdateOp` takes them with `torch.autograd.grad`, which DDP's reducer hooks never see, so
  `DistributedUpdateOp` averages them over the ranks (one all-reduce per dtype) before the optimizer step; the initial
  weights are broadcast from rank 0 (`broadcast_from_main`). In one process both are no-ops.
* eval and files: rank 0 alone evaluates and writes (best model, encoder, run record, checkpoint, grid, lock); the other
  ranks create nothing in save_dir and go on to the next training epoch, where the first all-reduce waits for rank 0.

Without torchrun on a machine with several GPUs, `single_device` undoes FastEstimator's DataParallel: the run uses one
GPU, and says once how to use all of them.
"""
import json
import os
import sys
import types
from collections import ChainMap
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as dist
from fastestimator.backend import update_model
from fastestimator.op.tensorop.model import UpdateOp
from fastestimator.trace import Trace
from fastestimator.util.cli_util import parse_cli_to_dictionary
from fastestimator.util.data import Data
from fastestimator.util.traceability_util import FEID

T = TypeVar("T")
LAUNCH = "torchrun --nproc_per_node {n} -m apphub_vit.distributed pretrain|finetune [--option value ...]"
_told_single_gpu = False  # single_device's message, once per process


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: `rank` of `size`, on the `local_rank`-th GPU of its machine."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that evaluates and writes files."""
        return self.rank == 0


def launched() -> World:
    """What torchrun's environment says (WORLD_SIZE, RANK, LOCAL_RANK), whether or not the group is joined yet."""
    try:
        return World(rank=int(os.environ.get("RANK", 0)), size=int(os.environ.get("WORLD_SIZE", 1)),
                     local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise RuntimeError(f"torchrun's RANK / WORLD_SIZE / LOCAL_RANK are not whole numbers (RANK="
                           f"{os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}); launch with "
                           f"{LAUNCH.format(n='N')}") from None


def world() -> World:
    """This process's rank and the world size: the process group's once joined (`setup`), else one process."""
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=launched().local_rank)
    return World()


def setup(timeout_minutes: float = 30.0) -> World:
    """Join torchrun's process group (idempotent; nothing to do in one process): NCCL with this rank's GPU
    (`LOCAL_RANK`) as the current device when CUDA is there, else gloo. timeout_minutes: how long a collective waits
    for the other ranks (rank 0's eval epochs run while the others wait at their next step)."""
    env = launched()
    if env.size <= 1 or dist.is_initialized():
        return world()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1, but this PyTorch build has no torch.distributed: install a build with it, "
                           "or run in one process (without torchrun).")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise RuntimeError(f"LOCAL_RANK {env.local_rank} has no GPU: this machine shows {count}. Start at most "
                               f"{count} processes per machine (torchrun --nproc_per_node {count}).")
        torch.cuda.set_device(env.local_rank)  # before anything is allocated: cuda means this rank's GPU from here
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return world()


def teardown() -> None:
    """Wait for every rank (rank 0 finishes its last eval and files), then leave the process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collectives take their tensors: NCCL the current GPU's, gloo the CPU's."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def run_on_main(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 only, its (picklable) result handed to every rank. If it raises, rank 0 raises that error and
    the other ranks a RuntimeError quoting it, instead of waiting at their next collective for a rank that is gone."""
    if world().size == 1:
        return fn()
    box: List[Any] = [None]
    error: Optional[BaseException] = None
    if world().main:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # handed on, then raised below
            error, box[0] = err, ("error", f"{type(err).__name__}: {err}")
    dist.broadcast_object_list(box, src=0)  # NCCL: through the current GPU, set by setup()
    status, value = box[0]
    if error is not None:
        raise error
    if status == "error":
        raise RuntimeError(f"rank 0 failed, so rank {world().rank} stops too: {value}")
    return value


def all_ranks(flag: bool) -> bool:
    """True when `flag` is True on every rank (a collective: every rank must call it at the same point)."""
    if world().size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_to_main(value: T) -> Optional[List[T]]:
    """Every rank's (picklable) `value`, in rank order, on rank 0; None on the others (a collective)."""
    if world().size == 1:
        return [value]
    gathered: Optional[List[Any]] = [None] * world().size if world().main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def shared_seed(seed: Optional[int]) -> int:
    """A seed every rank agrees on: `seed` when given, else one rank 0 draws (for the shard order)."""
    return run_on_main(lambda: int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item()))


def broadcast_from_main(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's `module` (different random inits become one)."""
    if world().size == 1:
        return
    device = _comm_device()
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            buffer = tensor.data.to(device)  # the tensor itself where it already lives on `device`
            dist.broadcast(buffer, src=0)
            if buffer is not tensor.data:
                tensor.data.copy_(buffer)


def average_gradients(gradients: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    """The gradients averaged over the ranks: one flat all-reduce per dtype (sum, then / world size: gloo has no
    average). None entries (parameters the loss does not reach) stay None; the model is the same on every rank, so
    they are the same entries everywhere."""
    gradients = list(gradients)
    size = world().size
    if size == 1:
        return gradients
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, g in enumerate(gradients):
        if g is not None:
            by_dtype.setdefault(g.dtype, []).append(i)
    device = _comm_device()
    for indices in by_dtype.values():
        parts = [gradients[i] for i in indices]
        flat = torch.cat([p.reshape(-1) for p in parts]).to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.div_(size).to(parts[0].device)
        offset = 0
        for i, p in zip(indices, parts):
            gradients[i] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
    return gradients


def _dense(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))


class DistributedUpdateOp(UpdateOp):
    """FastEstimator's UpdateOp whose gradients are averaged over the ranks before the optimizer step (in one process,
    UpdateOp's own), and handed to the parameters without a copy. The all-reduce is a GPU kernel, so a CUDA-graph train
    step captures it with the rest.

    FastEstimator's `update_model` clones every gradient into its parameter's `.grad` (the optimizer step then sets
    `.grad` back to None): one copy kernel per parameter and step, 98 for the default ViT, each a few microseconds of
    a captured step that is GPU-bound. Here a gradient becomes `.grad` itself, as PyTorch's own `backward()` hands it
    over: `torch.autograd.grad` made it for this step and nothing else writes it. A gradient that is not dense, or
    shares its memory with one already handed over (autograd may give two parameters one tensor; the ranks' average
    is views of one buffer), is cloned as before, so that accumulating into one `.grad` never writes another. The
    values, and so the training, are FastEstimator's; with loss scaling (fp16), accumulated steps (`merge_grad`) or
    given gradients, FastEstimator's path runs unchanged."""
    def _gradient_postprocess(self, gradients: Any) -> Any:
        return average_gradients(super()._gradient_postprocess(gradients))

    def forward(self, data: Any, state: Dict[str, Any]) -> None:
        optimizer = self.model.current_optimizer
        if state["warmup"] and state.get("prewarm") and self.gradients is None:
            # `DeviceNetwork.prewarm`: the backward pass runs once, for what it compiles; no update
            self._get_gradient(self._loss_preprocess(data), state["tape"])
            return
        if state["warmup"] or self.gradients is not None or self.merge_grad > 1 or optimizer.scaler is not None:
            return super().forward(data, state)
        gradients = self._gradient_postprocess(self._get_gradient(self._loss_preprocess(data), state["tape"]))
        params = [p for p in self.model.parameters() if p.requires_grad]
        if any(g is None for g in gradients):  # FastEstimator's warning about the parameters the loss misses
            return update_model(self.model, gradients, defer=self.defer, deferred=state["deferred"])
        handed = set()
        for param, gradient in zip(params, gradients):
            if param.grad is not None:
                param.grad += gradient
                continue
            memory = gradient.untyped_storage().data_ptr()
            param.grad = gradient if _dense(gradient) and memory not in handed else gradient.clone()
            handed.add(memory)
        # as update_model: the step deferred to the end of the ops when FastEstimator asks (it does for the last op)
        if self.defer:
            state["deferred"][self.model.model_name] = [lambda: _optimizer_step(optimizer)]
        else:
            _optimizer_step(optimizer)
            state["deferred"].pop(self.model.model_name, None)


def _optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """FastEstimator's step without loss scaling: the update, then `.grad` set to None (`zero_grad`'s default)."""
    optimizer.step()
    optimizer.zero_grad()


class ShardEpoch(Trace):
    """Tells a sharded `BatchLoader` the training epoch before it is iterated, so every rank draws the same order,
    and a resumed run the order of the epoch it resumes at (as `DistributedSampler.set_epoch`)."""
    def __init__(self, loader: Any) -> None:
        super().__init__(mode="train")
        self.loader = loader

    def on_epoch_begin(self, data: Data) -> None:
        self.loader.set_epoch(self.system.epoch_idx)


# what DataParallel adds to the module it wraps (FastEstimator's attributes are everything else)
_DATA_PARALLEL_OWN = {"module", "dim", "device_ids", "output_device", "src_device_obj"}


def single_device(model: torch.nn.Module) -> torch.nn.Module:
    """The model `fe.build` returned, without the `torch.nn.DataParallel` FastEstimator 1.7 wraps it in when several
    GPUs are visible: FastEstimator's attributes (name, optimizer, ...) move to the plain module, whose parameters the
    optimizer already holds. Outside torchrun, says once how to train on all the GPUs."""
    global _told_single_gpu
    if not isinstance(model, torch.nn.DataParallel):
        return model
    inner = model.module
    plain_module = set(vars(torch.nn.Module()))
    for name, value in vars(model).items():
        if name in plain_module or name in _DATA_PARALLEL_OWN:
            continue
        if isinstance(value, types.MethodType) and value.__self__ is model:
            value = types.MethodType(value.__func__, inner)  # fe_summary, bound to the wrapper
        if isinstance(value, ChainMap):  # FastEstimator's traceability tables, keyed by the wrapper's id
            tables = dict(value)
            table = tables.pop(FEID(id(model)), None)
            if table is not None:
                table.fe_id, table.type = FEID(id(inner)), type(inner)
                tables[table.fe_id] = table
            value = ChainMap(tables)
        setattr(inner, name, value)
    if launched().size <= 1 and not _told_single_gpu:
        _told_single_gpu = True
        n = torch.cuda.device_count()
        print(f"apphub_vit: {n} GPUs are visible; this run trains on one of them (FastEstimator's DataParallel is "
              f"not used: untested here and slower than one process per GPU). To train on all {n}: "
              f"{LAUNCH.format(n=n)} (README, 'Several GPUs').", flush=True)
    return inner


APPS = ("pretrain", "finetune")


def parse_command(argv: Sequence[str]) -> Dict[str, Any]:
    """`pretrain|finetune [--option value ...]` as {"app", "warmup", "options"}: values parsed as `fastestimator train`
    parses them, `--hyperparameters FILE.json` read first and overridden by the options given."""
    if not argv or argv[0] not in APPS:
        raise SystemExit(f"usage: {LAUNCH.format(n='N')}\n  the first argument is the app: {' or '.join(APPS)} (got "
                         f"{argv[0] if argv else 'nothing'!r}); the options are those of `fastestimator train "
                         f"apphub_vit/<app>.py`")
    options = parse_cli_to_dictionary(list(argv[1:]))
    settings = options.pop("hyperparameters", None)
    if settings is not None:
        with open(os.path.expanduser(str(settings))) as f:
            options = {**json.load(f), **options}
    warmup = options.pop("warmup", True)
    if not isinstance(warmup, bool):
        raise SystemExit(f"--warmup must be True or False, got {warmup!r}")
    return {"app": argv[0], "warmup": warmup, "options": options}


def main(argv: Optional[Sequence[str]] = None) -> Union[int, None]:
    """Build the app's estimator in this rank and train it (`fit()`), then leave the process group."""
    command = parse_command(sys.argv[1:] if argv is None else argv)
    setup()
    try:
        if command["app"] == "pretrain":
            from apphub_vit.pretrain import get_estimator
        else:
            from apphub_vit.finetune import get_estimator
        get_estimator(**command["options"]).fit(warmup=command["warmup"])
        teardown()
    finally:
        if dist.is_available() and dist.is_initialized():  # an error: leave without waiting for the others
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
