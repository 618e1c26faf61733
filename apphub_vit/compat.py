"""Compatibility of FastEstimator 1.7.0 (built against torch 2.3.1 and NumPy 1.26) with current PyTorch and NumPy, and
one fix of its experiment ids.

Five patches, each applied on import of `apphub_vit` (any of its modules: this covers `fastestimator train
apphub_vit/...` and Python calls alike) and each a no-op where it is not needed. `networks` and `pipelines` do not apply
them: code that trains through FastEstimator with those alone imports `apphub_vit` first.

1. `patch_infinite_sampler`: FastEstimator's `InfiniteSampler.__init__` calls `Sampler.__init__(data_source=None)`,
   an argument PyTorch deprecated in 2.2 and later removed; every `fit()` then died at its first epoch with `TypeError:
   object.__init__() takes exactly one argument`. A tiny base class that accepts the argument slides in between.
2. `patch_infinite_sampler_iter`: the same sampler restarts (index 0, a fresh shuffle) whenever `iter()` is called on
   it, and newer torch's `BatchSampler` calls `iter()` on it for every batch: evaluation saw its first batch over and
   over. `iter()` now restarts once.
3. `restore_numpy_aliases`: FastEstimator uses `np.Inf`, which NumPy 2 removed (the GPU image has NumPy 2).
4. `patch_to_number`: FastEstimator's `to_number` cannot convert CUDA (or bf16) tensors, which `DeviceNetwork` keeps on
   the device until a trace logs them.
5. `patch_experiment_ids`: FastEstimator's experiment id, the key of each run in its history database, is the clock
   alone, so runs started together (a sweep's) can draw the same one and the second dies at its first `fit()`.

Remove each once FastEstimator fixes it.
"""
import contextlib
import inspect
import uuid
from typing import Iterator

from torch.utils.data import Sampler


def _sampler_takes_data_source() -> bool:
    init = Sampler.__init__
    if init is object.__init__:
        return False
    return "data_source" in inspect.signature(init).parameters


class _SamplerAcceptingDataSource(Sampler):
    """`Sampler` as torch < 2.2 defined it: `__init__(data_source=None)`, the argument unused."""
    def __init__(self, data_source=None) -> None:  # noqa: ARG002 - kept for FastEstimator's call
        super().__init__()


def patch_infinite_sampler() -> bool:
    """Make FastEstimator's InfiniteSampler constructible on this torch. Returns True if a patch was applied."""
    from fastestimator.dataset.dataloader import InfiniteSampler
    if _sampler_takes_data_source() or _SamplerAcceptingDataSource in InfiniteSampler.__mro__:
        return False
    InfiniteSampler.__bases__ = (_SamplerAcceptingDataSource, )
    return True


patch_infinite_sampler()


class _InfiniteIterator:
    """One pass-through iterator over an InfiniteSampler. `iter()` of it is itself, as for any Python iterator."""
    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> "_InfiniteIterator":
        return self

    def __next__(self):
        return self.sampler.__next__()


def patch_infinite_sampler_iter() -> bool:
    """FastEstimator 1.7.0's InfiniteSampler is its own iterator, and its `__iter__` restarts it: index 0, a fresh
    shuffle. Newer torch `BatchSampler` (seen with 2.11 and 2.14.1; 2.3.1 looped instead) builds each batch with
    `itertools.islice(sampler_iter, batch_size)`, and islice calls `iter()` on what it is given, so every batch
    restarted the sampler: without shuffling (evaluation) each batch was the first `batch_size` samples again, and
    training batches were independent draws instead of epochs. `iter(sampler)` now does the restart once and returns
    an iterator whose own `__iter__` does not. Returns True if a patch was applied."""
    from fastestimator.dataset.dataloader import InfiniteSampler
    if getattr(InfiniteSampler.__iter__, "_apphub_vit_patched", False):
        return False
    restart = InfiniteSampler.__iter__  # resets index and order, returns the sampler itself

    def __iter__(self) -> _InfiniteIterator:
        return _InfiniteIterator(restart(self))

    __iter__._apphub_vit_patched = True
    __iter__.unpatched = restart  # FastEstimator's own, for benchmarks that measure the app as shipped
    InfiniteSampler.__iter__ = __iter__
    return True


patch_infinite_sampler_iter()


@contextlib.contextmanager
def fastestimator_sampler_as_shipped() -> Iterator[None]:
    """Inside this block FastEstimator's InfiniteSampler restarts at every batch again, as FastEstimator 1.7.0 does on
    current torch without our fix: only for measuring what the fix changes (benchmarks/throughput.py)."""
    from fastestimator.dataset.dataloader import InfiniteSampler
    patched = InfiniteSampler.__iter__
    InfiniteSampler.__iter__ = getattr(patched, "unpatched", patched)
    try:
        yield
    finally:
        InfiniteSampler.__iter__ = patched


def restore_numpy_aliases() -> None:
    """FastEstimator 1.7.0 (made for NumPy 1.26) uses `np.Inf` (BestModelSaver, EarlyStopping), which NumPy 2.0
    removed. Our install pins NumPy 1.26 through FastEstimator; hosts with NumPy 2 (the GPU image) need the alias."""
    import numpy as np
    for name, value in (("Inf", np.inf), ("NaN", np.nan), ("NINF", -np.inf), ("PINF", np.inf)):
        try:
            getattr(np, name)
        except AttributeError:
            setattr(np, name, value)


restore_numpy_aliases()


def _to_number(data):
    """`fastestimator.util.util.to_number`, also for tensors on a GPU (and bf16 ones, which numpy lacks)."""
    # the names below are FastEstimator's util module's: patch_to_number runs this code object with its globals
    if tf.is_tensor(data):  # noqa: F821
        data = data.numpy()
    elif isinstance(data, torch.Tensor):  # noqa: F821
        data = data.detach()
        data = (data.float() if data.dtype == torch.bfloat16 else data).cpu().numpy()  # noqa: F821
    return np.array(data)  # noqa: F821


def patch_to_number() -> None:
    """FastEstimator's `to_number` calls `.numpy()` on torch tensors, which fails for CUDA tensors. Its own network
    copies every output to the CPU each step to avoid that, costing a device sync per step; our `DeviceNetwork` keeps
    training outputs on the GPU and converts them only when a trace logs them, so `to_number` must accept them. The
    function is imported by name all over FastEstimator, so its code object is replaced in place (same globals)."""
    from fastestimator.util import util
    if util.to_number.__code__ is not _to_number.__code__:
        util.to_number.__code__ = _to_number.__code__


patch_to_number()


def patch_experiment_ids() -> bool:
    """FastEstimator's `System` draws its `exp_id` (the primary key of the run in FastEstimator's history database,
    shared by every process of a user) as the top 64 bits of a uuid1: the timestamp alone, without the clock sequence
    and node that tell processes apart. Processes that reach `fit()` together can draw the same id; then both find no
    entry under it and both insert one, and the second `fit()` dies with "sqlite3.IntegrityError: UNIQUE constraint
    failed: history.pk" (seen once in this project's CI: two runs of a sweep, each training its teacher). The id is now
    64 random bits (uuid4), the width of the database's INTEGER key: as unique across processes as within one.
    Returns True if a patch was applied."""
    from fastestimator.summary.system import System
    if getattr(System._initialize_state, "_apphub_vit_patched", False):
        return False
    initialize = System._initialize_state  # also sets global_step and epoch_idx

    def _initialize_state(self) -> None:
        initialize(self)
        self.exp_id = int.from_bytes(uuid.uuid4().bytes[:8], byteorder="big", signed=True)

    _initialize_state._apphub_vit_patched = True
    System._initialize_state = _initialize_state
    return True


patch_experiment_ids()
