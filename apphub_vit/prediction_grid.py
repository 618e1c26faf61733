"""A picture of what a classifier gets right and wrong: N eval images with their true and predicted labels.

`PredictionGrid` is a FastEstimator Trace: during every eval epoch it keeps the first `n` images of the eval set (in
the pipeline's order) with their labels and predictions, and at the end of the run it writes the last epoch's (the
final model's) as `<save_dir>/prediction_grid.png`: each tile titled "true / predicted", green when right, red when
wrong. Images are shown as the model saw them, with the pipeline's normalization undone (pass its mean / std).
`draw_prediction_grid` does the drawing for arrays already in hand. Matplotlib's Agg backend is used, so no display is
needed.
"""
import math
import os
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
from fastestimator.trace import Trace
from fastestimator.util.data import Data
from fastestimator.util.util import to_number

from apphub_vit.runs import atomic_path

GRID_FILE = "prediction_grid.png"
RIGHT, WRONG = "#1a9641", "#d7191c"  # green, red
Stats = Union[None, float, Sequence[float]]


def to_hwc(image: np.ndarray, channels_first: Optional[bool] = None) -> np.ndarray:
    """One image as [H, W, C] with C in (1, 3). `channels_first` None: guess from the shape (a leading axis of 1 or 3
    that is smaller than the last axis is the channel axis)."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image[..., None]
    if image.ndim != 3:
        raise ValueError(f"PredictionGrid expects [H, W], [H, W, C] or [C, H, W] images, got shape {image.shape}")
    if channels_first is None:
        channels_first = image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3)
    if channels_first:
        image = image.transpose(1, 2, 0)
    if image.shape[-1] not in (1, 3):
        raise ValueError(f"PredictionGrid shows 1- or 3-channel images, got shape {image.shape} "
                         f"(channels_first={channels_first}); pass channels_first to say which axis holds channels")
    return image


def denormalize(image: np.ndarray, mean: Stats = None, std: Stats = None, max_pixel_value: float = 255.0) -> np.ndarray:
    """Undo FastEstimator's Normalize ((x / max_pixel_value - mean) / std) on an [H, W, C] image -> floats in [0, 1].

    Without mean / std, for display only: uint8 images are divided by 255, float images in [0, 1] kept, those in
    [0, max_pixel_value] divided by it, and anything else min-max scaled.
    """
    if mean is None and std is None:
        if image.dtype == np.uint8:
            return image.astype(np.float32) / 255.0
        image = image.astype(np.float32)
        if image.min() >= 0 and image.max() <= 1:
            return image
        if image.min() >= 0 and image.max() <= max_pixel_value:
            return image / max_pixel_value
        return (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
    image = image.astype(np.float32)
    mean_ = np.reshape(np.asarray(0.0 if mean is None else mean, np.float32), (1, 1, -1))
    std_ = np.reshape(np.asarray(1.0 if std is None else std, np.float32), (1, 1, -1))
    return np.clip(image * std_ + mean_, 0, 1)


def draw_prediction_grid(images: Sequence[np.ndarray], true: Sequence[int], pred: Sequence[int],
                         class_names: Optional[Sequence[str]], path: str, title: Optional[str] = None) -> Any:
    """Write a PNG grid of [H, W, C] images in [0, 1] titled "true / predicted" (green right, red wrong).

    Returns the matplotlib Figure (closed), whose image axes are one per image.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)  # no display on training machines; a no-op if a backend is already in use
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0:
        raise ValueError("draw_prediction_grid needs at least one image")
    cols = min(n, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    name = (lambda i: str(class_names[i]) if class_names is not None and 0 <= i < len(class_names) else str(i))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows + (0.4 if title else 0)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, t, p in zip(axes.ravel(), images, true, pred):
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name(int(t))} / {name(int(p))}", color=RIGHT if int(t) == int(p) else WRONG, fontsize=9)
    correct = sum(int(t) == int(p) for t, p in zip(true, pred))
    fig.suptitle(f"{title + ': ' if title else ''}true / predicted, {correct} of {n} right", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return fig


class PredictionGrid(Trace):
    """Writes `<save_dir>/<filename>` at the end of a run: the first `n` eval images, true / predicted labels.

    Args:
        image_key: Key of the images the model saw (after the pipeline): [B, C, H, W] or [B, H, W, C] or [B, H, W].
        true_key: Key of the integer labels ([B] or one-hot [B, K]).
        pred_key: Key of the predictions: scores / logits [B, K] (argmax is taken) or class indices [B].
        class_names: Names of the classes in label order (None: the label numbers).
        save_dir: Folder of the PNG.
        n: Images in the grid (fewer if the eval set is smaller).
        mean, std: Those given to the pipeline's Normalize, to show the images un-normalized (per channel or scalar).
        max_pixel_value: Normalize's max_pixel_value (255 for uint8 sources).
        channels_first: Layout of the images; None guesses from the shape.
        filename: Name of the PNG.
        mode: Run modes to collect images in ("eval"; "test" also works with `estimator.test()`).
    """
    def __init__(self, image_key: str, true_key: str, pred_key: str, class_names: Optional[Sequence[str]],
                 save_dir: str, n: int = 16, mean: Stats = None, std: Stats = None, max_pixel_value: float = 255.0,
                 channels_first: Optional[bool] = None, filename: str = GRID_FILE,
                 mode: Union[str, Sequence[str]] = ("eval", "test")) -> None:
        super().__init__(inputs=[image_key, true_key, pred_key], mode=mode)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"PredictionGrid n must be a positive integer, got {n!r}")
        self.class_names = None if class_names is None else list(class_names)
        self.path = os.path.join(save_dir, filename)
        self.n = n
        self.mean, self.std, self.max_pixel_value = mean, std, max_pixel_value
        self.channels_first = channels_first
        self._batches: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._count = 0
        self.written: Optional[str] = None  # path of the PNG once written
        self.shown = 0  # images in the written PNG
        self.correct = 0  # of those, how many were predicted right

    def on_epoch_begin(self, data: Data) -> None:
        self._batches, self._count = [], 0  # keep only the latest epoch's predictions

    def on_batch_end(self, data: Data) -> None:
        if self._count >= self.n:
            return
        take = self.n - self._count
        # slice before converting: on a GPU the batch stays there (DeviceNetwork), and only `take` images cross
        images, true, pred = (to_number(data[key][:take]) for key in self.inputs)
        if true.ndim > 1 and true.shape[-1] > 1:
            true = true.argmax(-1)
        pred = pred.argmax(-1) if pred.ndim > 1 and pred.shape[-1] > 1 else pred.reshape(len(pred), -1)[:, 0]
        self._batches.append((images, true.reshape(-1), np.rint(pred).astype(np.int64)))
        self._count += len(images)

    def on_end(self, data: Data) -> None:
        if not self._batches:
            print("FastEstimator-PredictionGrid: no eval batches were seen; no grid written")
            return
        images = [denormalize(to_hwc(img, self.channels_first), self.mean, self.std, self.max_pixel_value)
                  for img in np.concatenate([b[0] for b in self._batches])]
        true = np.concatenate([b[1] for b in self._batches])
        pred = np.concatenate([b[2] for b in self._batches])
        draw_prediction_grid(images, true, pred, self.class_names, self.path)
        self.written, self.shown, self.correct = self.path, len(images), int((true == pred).sum())
        print(f"FastEstimator-PredictionGrid: {self.correct} of {self.shown} shown right; saved {self.path}")
