"""Run by tests/test_distributed.py, under torchrun or alone: a tiny pretraining with the augmentation turned off (the
batched ops reduced to ChannelTranspose and Normalize), so that its steps depend on the data and the weights only.

    python tests/distributed_step.py SAVE_DIR [--option value ...]        # one process
    torchrun --nproc_per_node 2 tests/distributed_step.py SAVE_DIR ...     # two ranks

Rank 0 writes SAVE_DIR/initial.pt (the weights every rank starts from) beside the run's own files. With the
environment's NAN_LOSS_ON_RANK=r, rank r alone reports a loss of NaN from step 2 on (its gradients stay finite), as a
rank whose shard overflowed would.
"""
import os
import sys

import torch
from fastestimator.trace import Trace
from fastestimator.util.data import Data

from apphub_vit import distributed, vit_app
from apphub_vit.encoder_io import unwrap
from apphub_vit.pretrain import get_estimator


class NanLoss(Trace):
    """Replaces the training loss this rank reports by NaN from step 2 on."""
    def __init__(self) -> None:
        super().__init__(inputs="ce", outputs="ce", mode="train")

    def on_batch_end(self, data: Data) -> None:
        if self.system.global_step >= 2:
            data["ce"] = torch.tensor(float("nan"))


def main(save_dir: str, argv: list) -> None:
    original = vit_app.batched_cifar_ops
    vit_app.batched_cifar_ops = lambda *args, **kwargs: original(*args, **dict(kwargs, augment=False, strong=False))
    command = distributed.parse_command(["pretrain", *argv])
    distributed.setup()
    estimator = get_estimator(save_dir=save_dir, **command["options"])
    if distributed.world().main:
        torch.save(unwrap(estimator.model).state_dict(), os.path.join(save_dir, "initial.pt"))
    if os.environ.get("NAN_LOSS_ON_RANK") == str(distributed.world().rank):
        estimator.traces.insert(0, NanLoss())
    estimator.fit(warmup=False)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
