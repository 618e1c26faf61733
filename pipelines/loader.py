"""`BatchLoader`: whole batches of raw arrays kept where the model runs, for the batched ops of pipelines/batched.py."""
from typing import Dict, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

Array = Union[np.ndarray, torch.Tensor]


def default_device() -> torch.device:
    """Where `BatchLoader`s keep their arrays unless told: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_arrays(arrays: Mapping[str, Array], device: torch.device) -> Dict[str, torch.Tensor]:
    """`arrays` as contiguous torch tensors on `device`; a tensor already so stays itself (loaders given it share it).
    A numpy array goes over in its own memory order and is made contiguous there: CIFAR's images, an NHWC view of the
    files' NCHW planes, cost about a second of strided copying on a 2-core CPU, a single copy and a fast kernel on a
    GPU."""
    out = {}
    for key, value in arrays.items():
        if isinstance(value, np.ndarray):
            # from_numpy takes any layout but reversed axes (negative strides) and read-only memory
            usable = value.flags.writeable and all(stride >= 0 for stride in value.strides)
            value = torch.from_numpy(value if usable else np.ascontiguousarray(value))
        out[key] = value.to(device).contiguous()
    return out


class _Arrays(Dataset):
    """The arrays as torch tensors (on `device`); indexed by a tensor of sample indices, one gather per batch."""
    def __init__(self, arrays: Mapping[str, Array], device: torch.device) -> None:
        self.arrays = device_arrays(arrays, device)
        self.length = len(next(iter(self.arrays.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.arrays.items()}


class BatchLoader(DataLoader):
    """Whole batches of raw arrays (uint8 images, labels) kept where the model runs, for `fe.Pipeline(train_data=...)`.

    FastEstimator's own loader builds each batch from per-sample dicts in worker processes, which can hold a GPU back
    even with no ops to run. When the ops run batched on the device there is nothing left to do per sample, so this
    loader keeps the whole data set on the device (CIFAR's 50,000 uint8 images are 150 MB) and makes each batch with
    one gather there: no workers, no per-step copy from the host. On a CPU the same happens in host memory.

    shuffle: a new random order every epoch (else the arrays' order). drop_last: only full batches (training).
    device: where the arrays and batches live; None: the GPU when there is one, else the CPU.

    Sharding over data-parallel processes (PyTorch's `DistributedSampler`, per batch): with `world_size` > 1,
    `batch_size` is the global batch and this process (`rank`) yields its contiguous slice of each global batch,
    `batch_size // world_size` images; every rank draws the same order, from `seed` and the epoch (`set_epoch`), so
    the ranks' batches of one step are disjoint and together are the batch one process would take. Every image is
    seen once per epoch across the ranks (but the last partial global batch, as with drop_last in one process).
    seed: draw the order from it instead of torch's global generator (needed when sharded).
    """
    def __init__(self, arrays: Mapping[str, Array], batch_size: int, shuffle: bool, drop_last: bool = False,
                 device: Optional[torch.device] = None, rank: int = 0, world_size: int = 1,
                 seed: Optional[int] = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"BatchLoader rank must be in [0, world_size) = [0, {world_size}), got {rank}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} (the global batch) does not split evenly over {world_size} "
                             f"processes: every rank takes an equal share of each batch. Pass a multiple of "
                             f"{world_size}, e.g. {max(world_size, batch_size // world_size * world_size)}.")
        if world_size > 1 and not drop_last:
            raise ValueError("A sharded BatchLoader (world_size > 1) needs drop_last=True: a last partial batch would "
                             "leave some ranks without images. Evaluate unsharded (on one rank).")
        if world_size > 1 and shuffle and seed is None:
            raise ValueError("A sharded, shuffled BatchLoader needs a seed: every rank must draw the same order.")
        device = device or default_device()
        super().__init__(_Arrays(arrays, device), batch_size=None)
        self.global_batch, self.images_per_batch = batch_size, batch_size // world_size
        self.shuffle, self.full_batches_only = shuffle, drop_last
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.device = device

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration draws (with a seed; as `DistributedSampler.set_epoch`)."""
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = len(self.dataset), self.global_batch
        return n // b if self.full_batches_only else -(-n // b)

    def _order(self, n: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        if self.seed is None:
            return torch.randperm(n, device=self.device)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)  # on the CPU: the same on every device
        return torch.randperm(n, generator=generator).to(self.device)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        n, b = len(self.dataset), self.global_batch
        order = self._order(n)
        share = self.images_per_batch
        for start in range(self.rank * share, len(self) * b, b):
            yield self.dataset[order[start:start + share]]

    def first_batch(self) -> Dict[str, torch.Tensor]:
        """The first batch in the arrays' order, as an unshuffled iteration gives it, without drawing an order (a
        shuffled loader's draw would move the random stream that the epochs draw their orders from)."""
        return self.dataset[torch.arange(min(self.images_per_batch, len(self.dataset)), device=self.device)]

    def get_batch_size(self) -> int:
        """FastEstimator's Estimator counts eval steps as len(loader) / get_batch_size(); len() here already counts
        batches, so this answers 1 (`images_per_batch` is the real size)."""
        return 1
