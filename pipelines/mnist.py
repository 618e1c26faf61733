"""MNIST pipelines: the ViT classifier's (normalize, add the channel axis) and the autoencoder's (scale, flatten).

The ViT recipes feed [1, 28, 28] tensors normalized with the MNIST training mean / std, as torchvision's MNIST examples
do. With ``augment=True`` (the ViT's "small_data" recipe) each training image is first shifted by up to 10% of its size,
scaled by 0.9-1.1 and rotated by up to 10 degrees (albumentations' ShiftScaleRotate, black border); eval images are
never augmented. The autoencoder reconstructs pixels in [0, 1], so its inputs are only scaled to [0, 1]
and flattened to 784 values (the target of its MSE loss is the same tensor).
"""
from typing import Any, List, Optional

import cv2
import fastestimator as fe
from fastestimator.op.numpyop import NumpyOp
from fastestimator.op.numpyop.multivariate import ShiftScaleRotate
from fastestimator.op.numpyop.univariate import ExpandDims, Normalize, Reshape

# Mean / std of the 60,000 MNIST training images in [0, 1] (the values torchvision's MNIST examples use).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# The training augmentation of augment=True: small affine jitter, as handwriting varies (no flips: digits have a side).
SHIFT_LIMIT, SCALE_LIMIT, ROTATE_LIMIT = 0.1, 0.1, 10


def mnist_augment_ops(image_key: str = "x") -> List[NumpyOp]:
    """Training-only random shift / scale / rotation of [28, 28] uint8 digits, the border filled with black."""
    return [
        ShiftScaleRotate(image_in=image_key, mode="train", shift_limit=SHIFT_LIMIT, scale_limit=SCALE_LIMIT,
                         rotate_limit=ROTATE_LIMIT, interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT,
                         value=0)
    ]


def mnist_ops(image_key: str = "x", augment: bool = False) -> List[NumpyOp]:
    """[28, 28] uint8 -> [1, 28, 28] float32, normalized with the MNIST mean / std (undo: x * STD + MEAN); with
    `augment`, training images are randomly shifted, scaled and rotated first (`mnist_augment_ops`)."""
    return (mnist_augment_ops(image_key) if augment else []) + [
        Normalize(inputs=image_key, outputs=image_key, mean=MNIST_MEAN, std=MNIST_STD),
        ExpandDims(inputs=image_key, outputs=image_key, axis=0),  # channels first, as PyTorch's Conv2d wants
    ]


def mnist_flat_ops(image_key: str = "x") -> List[NumpyOp]:
    """[28, 28] uint8 -> [784] float32 in [0, 1], for fully connected models."""
    return [
        Normalize(inputs=image_key, outputs=image_key, mean=0.0, std=1.0),  # only the division by 255
        Reshape(shape=(784, ), inputs=image_key, outputs=image_key),
    ]


def mnist_pipeline(train_data: Any, eval_data: Any, batch_size: int, flat: bool = False,
                   num_process: Optional[int] = None, augment: bool = False, test_data: Any = None) -> fe.Pipeline:
    """A `fe.Pipeline` over MNIST-shaped data ({"x": 28x28 uint8, "y": label}); `augment` only for the ViT's ops."""
    if flat and augment:
        raise ValueError("augment=True is for the ViT pipeline (flat=False); the autoencoder's inputs are its targets")
    return fe.Pipeline(train_data=train_data, eval_data=eval_data, test_data=test_data, batch_size=batch_size,
                       ops=mnist_flat_ops() if flat else mnist_ops(augment=augment), num_process=num_process)
