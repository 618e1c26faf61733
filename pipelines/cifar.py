"""The CIFAR training pipeline of FastEstimator's ViT apphub (`image_classification/vit/vit_torch.py`), defined once.

Normalize with the CIFAR mean/std, then in train mode only: pad to 40x40, random 32x32 crop, horizontal flip half of
the time, one coarse-dropout hole (Cutout, DeVries & Taylor 2017); finally HWC -> CHW for PyTorch.
"""
from typing import Any, List, Optional

import fastestimator as fe
from fastestimator.op.numpyop import NumpyOp

# The mean / std of the CIFAR-10 training images (as the apphub uses them, for both CIFAR-10 and CIFAR-100).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


def cifar_ops(image_key: str = "x", augment: bool = True) -> List[NumpyOp]:
    """The six ops of the apphub recipe. With `augment=False` only Normalize and ChannelTranspose remain."""
    # Imported here, not with the module: FastEstimator's numpy ops import albumentations's augmentations and with
    # them scipy, scikit-image and scikit-learn (0.7 s on a 2-core CPU), which the apps' default path, the batched
    # device-side ops (pipelines/batched.py), never uses; only this per-sample pipeline does.
    from fastestimator.op.numpyop.meta import Sometimes
    from fastestimator.op.numpyop.multivariate import HorizontalFlip, PadIfNeeded, RandomCrop
    from fastestimator.op.numpyop.univariate import ChannelTranspose, CoarseDropout, Normalize
    ops: List[NumpyOp] = [Normalize(inputs=image_key, outputs=image_key, mean=CIFAR_MEAN, std=CIFAR_STD)]
    if augment:
        ops += [
            PadIfNeeded(min_height=40, min_width=40, image_in=image_key, image_out=image_key, mode="train"),
            RandomCrop(32, 32, image_in=image_key, image_out=image_key, mode="train"),
            Sometimes(HorizontalFlip(image_in=image_key, image_out=image_key, mode="train")),
            CoarseDropout(inputs=image_key, outputs=image_key, mode="train", max_holes=1),
        ]
    ops.append(ChannelTranspose(inputs=image_key, outputs=image_key))
    return ops


def cifar_pipeline(train_data: Any, eval_data: Any, batch_size: int, test_data: Any = None,
                   num_process: Optional[int] = None, augment: bool = True) -> fe.Pipeline:
    """A `fe.Pipeline` over CIFAR-shaped data ({"x": 32x32x3 uint8, "y": label}) with the apphub ops."""
    return fe.Pipeline(train_data=train_data, eval_data=eval_data, test_data=test_data, batch_size=batch_size,
                       ops=cifar_ops(augment=augment), num_process=num_process)
