"""`BatchLoader`: whole batches of raw arrays kept where the model runs, for the batched ops of pipelines/batched.py."""
from typing import Dict, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class _Arrays(Dataset):
    """The arrays as torch tensors (on `device`); indexed by a tensor of sample indices, one gather per batch."""
    def __init__(self, arrays: Dict[str, np.ndarray], device: torch.device) -> None:
        self.arrays = {key: torch.from_numpy(np.ascontiguousarray(value)).to(device) for key, value in arrays.items()}
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
    """
    def __init__(self, arrays: Dict[str, np.ndarray], batch_size: int, shuffle: bool, drop_last: bool = False,
                 device: Optional[torch.device] = None) -> None:
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(_Arrays(arrays, device), batch_size=None)
        self.images_per_batch, self.shuffle, self.full_batches_only = batch_size, shuffle, drop_last
        self.device = device

    def __len__(self) -> int:
        n, b = len(self.dataset), self.images_per_batch
        return n // b if self.full_batches_only else -(-n // b)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        n, b = len(self.dataset), self.images_per_batch
        order = torch.randperm(n, device=self.device) if self.shuffle else torch.arange(n, device=self.device)
        for start in range(0, len(self) * b, b):
            yield self.dataset[order[start:start + b]]

    def get_batch_size(self) -> int:
        """FastEstimator's Estimator counts eval steps as len(loader) / get_batch_size(); len() here already counts
        batches, so this answers 1 (`images_per_batch` is the real size)."""
        return 1
