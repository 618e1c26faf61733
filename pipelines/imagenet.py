"""The pipeline of the ImageNet-pretrained torchvision baselines (ResNet-18, ViT-B/16) on CIFAR-shaped images.

As torchvision's ImageNet models expect: resize (to 224 in the recipes; smaller for quick tests), normalize with the
ImageNet mean / std, HWC -> CHW. The ViT-B/16 recipe adds train-time augmentation as torchvision's
`RandomHorizontalFlip()` (half of the time) and `RandomRotation(10)` (uniform in [-10, 10] degrees, corners filled
with black, as torchvision fills them).
"""
from typing import Any, List, Optional

import cv2
import fastestimator as fe
from fastestimator.op.numpyop import NumpyOp
from fastestimator.op.numpyop.meta import Sometimes
from fastestimator.op.numpyop.multivariate import HorizontalFlip, Resize, Rotate
from fastestimator.op.numpyop.univariate import ChannelTranspose, Normalize

# The per-channel mean / std of ImageNet's training images that torchvision's pretrained weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_ops(image_key: str = "x", image_size: int = 224, augment: bool = False) -> List[NumpyOp]:
    """Resize to `image_size`, (train only, with `augment`) flip + rotate, normalize, HWC -> CHW."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    ops: List[NumpyOp] = [Resize(height=image_size, width=image_size, image_in=image_key, image_out=image_key)]
    if augment:
        ops += [
            Sometimes(HorizontalFlip(image_in=image_key, image_out=image_key, mode="train")),
            Rotate(limit=10, border_mode=cv2.BORDER_CONSTANT, value=0, image_in=image_key, image_out=image_key,
                   mode="train"),
        ]
    ops += [
        Normalize(inputs=image_key, outputs=image_key, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ChannelTranspose(inputs=image_key, outputs=image_key),
    ]
    return ops


def imagenet_pipeline(train_data: Any, eval_data: Any, batch_size: int, image_size: int = 224, augment: bool = False,
                      num_process: Optional[int] = None, test_data: Any = None) -> fe.Pipeline:
    """A `fe.Pipeline` over CIFAR-shaped data ({"x": HxWx3 uint8, "y": label}) for ImageNet-pretrained models."""
    return fe.Pipeline(train_data=train_data, eval_data=eval_data, test_data=test_data, batch_size=batch_size,
                       ops=imagenet_ops(image_size=image_size, augment=augment), num_process=num_process)
