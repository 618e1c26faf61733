"""MNIST pipelines: the ViT classifier's (normalize, add the channel axis) and the autoencoder's (scale, flatten).

The ViT recipe feeds [1, 28, 28] tensors normalized with the MNIST training mean / std, as torchvision's MNIST examples
do; it uses no augmentation. The autoencoder reconstructs pixels in [0, 1], so its inputs are only scaled to [0, 1]
and flattened to 784 values (the target of its MSE loss is the same tensor).
"""
from typing import Any, List, Optional

import fastestimator as fe
from fastestimator.op.numpyop import NumpyOp
from fastestimator.op.numpyop.univariate import ExpandDims, Normalize, Reshape

from apphub_vit.mnist_data import MNIST_MEAN, MNIST_STD


def mnist_ops(image_key: str = "x") -> List[NumpyOp]:
    """[28, 28] uint8 -> [1, 28, 28] float32, normalized with the MNIST mean / std (undo: x * STD + MEAN)."""
    return [
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
                   num_process: Optional[int] = None) -> fe.Pipeline:
    """A `fe.Pipeline` over MNIST-shaped data ({"x": 28x28 uint8, "y": label})."""
    return fe.Pipeline(train_data=train_data, eval_data=eval_data, batch_size=batch_size,
                       ops=mnist_flat_ops() if flat else mnist_ops(), num_process=num_process)
