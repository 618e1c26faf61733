"""The apphub CIFAR ops as batched FastEstimator TensorOps, run where the model runs (the GPU when there is one), and
the strong augmentation of the apps' "vit" recipe, batched the same way.

Per-sample NumpyOps in pipeline workers hold the apphub recipe to the speed at which the CPU augments images. These ops
do the same transformations on a whole uint8 batch in a few kernels, with per-sample randomness identical in
distribution to the albumentations versions FastEstimator wraps (ranges a..b include both ends):

| per-sample op (pipelines/cifar.py)          | here                                | randomness per image      |
| ------------------------------------------- | ----------------------------------- | ------------------------- |
| Normalize(mean, std)                        | Normalize                           | none                      |
| PadIfNeeded(40, 40), cv2 BORDER_REFLECT_101 | PadIfNeeded, torch "reflect" (same) | none                      |
| RandomCrop(32, 32)                          | RandomCrop                          | offsets uniform in 0..8   |
| Sometimes(HorizontalFlip)                   | HorizontalFlip(prob=0.5)            | flip with probability 0.5 |
| CoarseDropout(max_holes=1), 8x8, fill 0     | CoarseDropout                       | top-left uniform in 0..24 |
| ChannelTranspose (HWC -> CHW)               | ChannelTranspose (NHWC -> NCHW)     | none                      |

ChannelTranspose runs first here (the ops commute with it) so the rest work on NCHW, torch's layout.

The strong augmentation (`batched_cifar_ops(strong=True)`), random per image and batched like the rest:

* `AutoAugment`: the CIFAR-10 policy of Cubuk et al. 2019, as torchvision's `AutoAugment(AutoAugmentPolicy.CIFAR10)`;
  the default (policy "autoaugment"), the strong augmentation of the apps' "vit" recipe;
* `TrivialAugment` (Müller & Hutter 2021; torchvision's `TrivialAugmentWide`, one operation per image): an alternative
  (policy "trivialaugment");
* `MixUpCutMix` (Zhang et al. 2018 mixup, Yun et al. 2019 CutMix) on top of either: an option, off by default
  (`mix_prob=0`).

For how these choices compare, see docs/results-cifar10.md. `pipelines.loader.BatchLoader` feeds these ops whole
batches kept on the device.
"""
import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from fastestimator.op.tensorop import TensorOp

Mode = Union[None, str, Iterable[str]]


class ChannelTranspose(TensorOp):
    """[B, H, W, C] -> [B, C, H, W] (a view; no copy)."""
    def __init__(self, inputs: str, outputs: str, mode: Mode = None) -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        return data.permute(0, 3, 1, 2)  # NHWC -> NCHW


class Normalize(TensorOp):
    """uint8 (or float in 0..255) -> float32 `(x / 255 - mean) / std`, per channel, on [B, C, H, W]."""
    def __init__(self, inputs: str, outputs: str, mean: Sequence[float], std: Sequence[float],
                 mode: Mode = None) -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.mean, self.std = tuple(mean), tuple(std)
        self._cache: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The mean and 1 / std on `device` ([1, C, 1, 1], on the 0..255 scale), made once per device, not every
        step (`FusedImageOps` calls this before its compiled chain runs)."""
        if device not in self._cache:
            mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1) * 255
            std = torch.tensor(self.std, device=device).view(1, -1, 1, 1) * 255
            self._cache[device] = (mean, 1 / std)
        return self._cache[device]

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        mean, inv_std = self.prepare(data.device)
        return (data.float() - mean) * inv_std


class PadIfNeeded(TensorOp):
    """Pad [B, C, H, W] to at least min_height x min_width, centred, mirroring without the edge (cv2 REFLECT_101)."""
    def __init__(self, inputs: str, outputs: str, min_height: int, min_width: int, mode: Mode = None) -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.min_height, self.min_width = min_height, min_width

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        pad_h, pad_w = max(self.min_height - data.shape[-2], 0), max(self.min_width - data.shape[-1], 0)
        if not pad_h and not pad_w:
            return data
        # albumentations puts the odd pixel at the bottom / right.
        return F.pad(data, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode="reflect")


def _window(offsets: torch.Tensor, size: int) -> torch.Tensor:
    """[B] start offsets -> [B, size] indices."""
    return offsets[:, None] + torch.arange(size, device=offsets.device)


class RandomCrop(TensorOp):
    """A height x width crop of [B, C, H, W] at an independent uniform position per image."""
    def __init__(self, inputs: str, outputs: str, height: int, width: int, mode: Mode = None) -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.height, self.width = height, width

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        b, c, h, w = data.shape
        rows = _window(torch.randint(0, h - self.height + 1, (b, ), device=data.device), self.height)  # [B, h]
        cols = _window(torch.randint(0, w - self.width + 1, (b, ), device=data.device), self.width)  # [B, w]
        batch = torch.arange(b, device=data.device)[:, None, None, None]
        channel = torch.arange(c, device=data.device)[None, :, None, None]
        return data[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # [B, C, h, w]


class HorizontalFlip(TensorOp):
    """Mirror each image left-right with probability `prob` (the apphub's Sometimes(HorizontalFlip) at 0.5)."""
    def __init__(self, inputs: str, outputs: str, prob: float = 0.5, mode: Mode = None) -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.prob = prob

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        flip = torch.rand(data.shape[0], 1, 1, 1, device=data.device) < self.prob
        return torch.where(flip, data.flip(-1), data)


class CoarseDropout(TensorOp):
    """Fill `max_holes` max_height x max_width rectangles per image with `fill_value` (albumentations' CoarseDropout
    with its defaults min = max: exactly that many holes of exactly that size, fully inside the image)."""
    def __init__(self, inputs: str, outputs: str, max_holes: int = 8, max_height: int = 8, max_width: int = 8,
                 fill_value: float = 0.0, mode: Mode = None) -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.max_holes, self.max_height, self.max_width, self.fill_value = max_holes, max_height, max_width, fill_value

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        b, _, h, w = data.shape
        ys = torch.arange(h, device=data.device).view(1, h, 1)
        xs = torch.arange(w, device=data.device).view(1, 1, w)
        hole = torch.zeros(b, h, w, dtype=torch.bool, device=data.device)
        for _ in range(self.max_holes):
            y1 = torch.randint(0, h - self.max_height + 1, (b, 1, 1), device=data.device)
            x1 = torch.randint(0, w - self.max_width + 1, (b, 1, 1), device=data.device)
            hole |= (ys >= y1) & (ys < y1 + self.max_height) & (xs >= x1) & (xs < x1 + self.max_width)
        return data.masked_fill(hole[:, None], self.fill_value)


# Magnitude ranges of the per-image operations: the largest magnitude of each; translate as a share of the image side
# (None: 32 pixels at any size). TrivialAugment's are torchvision's `TrivialAugmentWide` (shear 0.99, translation 32
# pixels, rotation 135 degrees, enhance factors 0.01..1.99, posterize down to 2 bits); AutoAugment's are torchvision's
# `RandAugment` ranges, on which its CIFAR-10 policy is defined (shear 0.3, translation 150/331 of the image side, 14
# pixels at 32, rotation 30 degrees, enhance factors 0.1..1.9, posterize down to 4 bits).
WIDE_RANGES = dict(shear=0.99, translate=None, rotate=135.0, enhance=0.99, posterize_bits=6)
RANDAUGMENT_RANGES = dict(shear=0.3, translate=150.0 / 331.0, rotate=30.0, enhance=0.9, posterize_bits=4)


class TrivialAugment(TensorOp):
    """TrivialAugment (Müller & Hutter 2021) per image on a batch: each image gets one operation drawn uniformly from
    torchvision's `TrivialAugmentWide` list, at a magnitude drawn uniformly from its 31 bins, with a random sign.

    The magnitudes are the paper's "wide" space, torchvision's `TrivialAugmentWide` (`WIDE_RANGES`).

    Input and output: [B, C, H, W] pixel values in 0..255 (uint8 or float); the output is float and integer-valued, as
    torchvision's uint8 results. Each operation follows torchvision's tensor functional of the same name (tested
    against it), computed for the whole batch with a per-image magnitude and kept where that image drew it, so the batch
    needs no per-image loop and compiles into a few kernels. Geometric ops use nearest sampling, as torchvision, and
    fill with `fill` (128, mid-grey, as timm, rather than torchvision's black).
    """
    OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
           "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
    NUM_BINS = 31

    def __init__(self, inputs: str, outputs: str, num_ops: int = 1, fill: float = 128.0, mode: Mode = None) -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        if not isinstance(num_ops, int) or num_ops < 1:
            raise ValueError(f"TrivialAugment num_ops must be a positive integer, got {num_ops!r}")
        self.num_ops, self.fill = num_ops, fill

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        x = data.float()
        for _ in range(self.num_ops):
            b, dev = x.shape[0], x.device
            op = torch.randint(0, len(self.OPS), (b, ), device=dev)
            level = torch.randint(0, self.NUM_BINS, (b, ), device=dev).float() / (self.NUM_BINS - 1)  # 0..1
            sign = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0)
            x = self.apply(x, op, level, sign)
        return x

    def apply(self, x: torch.Tensor, op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor,
              ranges: Mapping[str, Any] = WIDE_RANGES) -> torch.Tensor:
        """Image i gets operation OPS[op[i]] at bin level[i] (0..1 of `ranges`) with sign sign[i] (+1 / -1)."""
        def chosen(*names: str) -> torch.Tensor:  # [B, 1, 1, 1] mask: the image drew one of these
            mask = torch.zeros_like(op, dtype=torch.bool)
            for name in names:
                mask |= op == self.OPS.index(name)
            return mask.view(-1, 1, 1, 1)

        def per_image(value: torch.Tensor) -> torch.Tensor:
            return value.view(-1, 1, 1, 1)

        signed, r = level * sign, ranges
        factor = per_image(1 + r["enhance"] * signed)  # Brightness, Color, Contrast, Sharpness ("wide": 0.01 .. 1.99)
        geometric = chosen("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
        h, w = x.shape[-2:]
        move = (32.0, 32.0) if r["translate"] is None else (r["translate"] * w, r["translate"] * h)
        out = torch.where(geometric, _affine(x, op, signed, self.OPS, self.fill, r["shear"], move, r["rotate"]), x)
        out = torch.where(chosen("Brightness"), _blend(x, torch.zeros_like(x), factor), out)
        grey = _greyscale(x)
        out = torch.where(chosen("Color"), _blend(x, grey, factor), out)
        out = torch.where(chosen("Contrast"), _blend(x, grey.mean((1, 2, 3), keepdim=True), factor), out)
        out = torch.where(chosen("Sharpness"), _blend(x, _smoothed(x), factor), out)
        bits = 8 - torch.round(level * r["posterize_bits"])  # "wide": 8 .. 2 bits kept
        step = per_image(torch.pow(2.0, 8 - bits))
        out = torch.where(chosen("Posterize"), torch.floor(x / step) * step, out)
        threshold = per_image(255.0 * (1 - level))
        out = torch.where(chosen("Solarize"), torch.where(x >= threshold, 255 - x, x), out)
        out = torch.where(chosen("AutoContrast"), _autocontrast(x), out)
        return torch.where(chosen("Equalize"), _equalize(x), out)


# AutoAugment's CIFAR-10 policy (Cubuk et al. 2019, its appendix), as torchvision's
# `AutoAugment(AutoAugmentPolicy.CIFAR10).policies` (tests/test_batched_ops.py checks they are equal): 25 sub-policies
# of two operations, each (name, probability, magnitude bin of 10, or None where the operation has no magnitude).
# Written here rather than read from torchvision: importing torchvision for it, as the apps build their ops before the
# teacher trains, waited for the compiler's imports that run in the background then (torchvision registers its ops
# with the compiler), about a second of the apps' start-up on a 2-core CPU.
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)


class AutoAugment(TensorOp):
    """AutoAugment's CIFAR-10 policy (Cubuk et al. 2019) per image on a batch, as torchvision's
    `AutoAugment(AutoAugmentPolicy.CIFAR10)`, whose 25 sub-policies it holds (`CIFAR10_POLICY`): each image draws one
    sub-policy, and each of its two operations applies with the sub-policy's probability, at its fixed magnitude (10
    bins over RandAugment's ranges, `RANDAUGMENT_RANGES`), with a random sign where the operation has one.

    Input and output as `TrivialAugment`: [B, C, H, W] pixel values in 0..255, float output. The operations are
    `TrivialAugment.apply`'s on those ranges (tested against torchvision), plus Invert.
    """
    NAMES = TrivialAugment.OPS + ("Invert", )
    MAGNITUDE_BINS = 10

    def __init__(self, inputs: str, outputs: str, fill: float = 128.0, mode: Mode = None) -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.policies = CIFAR10_POLICY  # 25 x ((name, prob, bin or None) x 2)
        self._ops = TrivialAugment(inputs, outputs, fill=fill)
        self._tables: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[25, 2] operation indices, probabilities and levels (0..1 of the range), made once per device: a copy to
        the GPU inside a captured CUDA graph step would not be allowed."""
        if device not in self._tables:
            ops = [[self.NAMES.index(name) for name, _, _ in policy] for policy in self.policies]
            probs = [[prob for _, prob, _ in policy] for policy in self.policies]
            levels = [[(b or 0) / (self.MAGNITUDE_BINS - 1) for _, _, b in policy] for policy in self.policies]
            self._tables[device] = (torch.tensor(ops, device=device), torch.tensor(probs, device=device),
                                    torch.tensor(levels, device=device))
        return self._tables[device]

    def prepare(self, device: torch.device) -> None:
        """Make the tables for `device` now (`FusedImageOps` calls this before its compiled chain runs)."""
        self.tables(device)

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        x = data.float()
        b, dev = x.shape[0], x.device
        pick = torch.randint(0, len(self.policies), (b, ), device=dev)
        _, probs, _ = self.tables(dev)
        applied = torch.rand(b, 2, device=dev) <= probs[pick]  # torchvision: probs[i] <= p
        sign = torch.where(torch.rand(b, 2, device=dev) < 0.5, -1.0, 1.0)
        return self.apply(x, pick, applied, sign)

    def apply(self, x: torch.Tensor, pick: torch.Tensor, applied: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """Image i gets sub-policy pick[i]; its operation j runs where applied[i, j], with sign sign[i, j]."""
        ops, _, levels = self.tables(x.device)
        invert = self.NAMES.index("Invert")
        for j in range(2):
            op, level = ops[pick, j], levels[pick, j]
            out = self._ops.apply(x, torch.where(op == invert, 0, op), level, sign[:, j],  # 0: Identity
                                  RANDAUGMENT_RANGES)
            out = torch.where((op == invert).view(-1, 1, 1, 1), 255 - x, out)
            x = torch.where(applied[:, j].view(-1, 1, 1, 1), out, x)
        return x


def _blend(image: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend` for uint8 images: factor * image + (1 - factor) * other, clamped, truncated."""
    return torch.floor((factor * image + (1 - factor) * other).clamp(0, 255))


def _greyscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W], torchvision's `rgb_to_grayscale` weights, truncated as for uint8."""
    return torch.floor(0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _smoothed(x: torch.Tensor) -> torch.Tensor:
    """torchvision's sharpness 'degenerate' image: a 3x3 smoothing (centre weight 5) inside, the border kept."""
    # 1 around, 5 at the centre; made on the device: `kernel[1, 1] = 5.0` would copy a host scalar into a CUDA tensor,
    # which a CUDA graph capture of an uncompiled chain does not allow
    kernel = 1 + 4 * (torch.arange(9, device=x.device) == 4).to(x.dtype).view(3, 3)
    kernel = (kernel / kernel.sum()).expand(x.shape[1], 1, 3, 3)
    inner = torch.round(F.conv2d(x, kernel, groups=x.shape[1]))  # [B, C, H - 2, W - 2]
    return torch.cat([x[..., :1, :], torch.cat([x[..., 1:-1, :1], inner, x[..., 1:-1, -1:]], -1), x[..., -1:, :]], -2)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to 0..255 (unchanged where the channel is flat)."""
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    flat = high == low
    scale = torch.where(flat, torch.ones_like(high), 255 / (high - low).clamp(min=1))
    return torch.floor(((x - torch.where(flat, torch.zeros_like(low), low)) * scale).clamp(0, 255))


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel of each image, torchvision's `equalize` for uint8, batched."""
    b, c, h, w = x.shape
    values = x.reshape(b * c, h * w).long().clamp(0, 255)  # [N, HW] with N = B * C
    hist = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, values, torch.ones_like(values, dtype=torch.float))
    top = hist.gather(1, values.amax(1, keepdim=True))  # [N, 1]: count of the highest value present
    step = torch.floor((h * w - top) / 255)  # torchvision: sum of the histogram without its last non-zero bin
    lut = torch.floor((hist.cumsum(1) + torch.floor(step / 2)) / step.clamp(min=1))
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp(0, 255)  # [N, 256]
    equalised = torch.where(step == 0, values.float(), lut.gather(1, values))
    return equalised.view(b, c, h, w)


def _affine(x: torch.Tensor, op: torch.Tensor, signed: torch.Tensor, names: Sequence[str], fill: float,
            shear: float = 0.99, move: Tuple[float, float] = (32.0, 32.0), rotate: float = 135.0) -> torch.Tensor:
    """The geometric TrivialAugment ops (the "wide" defaults: shear up to 0.99, translation up to 32 pixels in x and y,
    rotation up to 135 degrees), as one nearest-neighbour `grid_sample` with a per-image output -> input map (identity
    for the other images, whose result the caller discards)."""
    b, _, h, w = x.shape

    def mask(name: str) -> torch.Tensor:
        return (op == names.index(name)).to(x.dtype)

    shear_x, shear_y = shear * signed * mask("ShearX"), shear * signed * mask("ShearY")  # about the top-left corner
    move_x = torch.trunc(move[0] * signed) * mask("TranslateX")  # whole pixels, as torchvision's int(magnitude)
    move_y = torch.trunc(move[1] * signed) * mask("TranslateY")
    angle = rotate * signed * mask("Rotate") * (math.pi / 180)  # about the image centre
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    xs, ys = xs[None], ys[None]  # [1, H, W] output pixel centres
    # output pixel -> input pixel, as torchvision: rotation about the centre, shears about the top-left corner of the
    # top-left pixel (its `center=[0, 0]`), translation by whole pixels; only one of them is non-zero per image
    rx = cos[:, None, None] * (xs - cx) - sin[:, None, None] * (ys - cy) + cx
    ry = sin[:, None, None] * (xs - cx) + cos[:, None, None] * (ys - cy) + cy
    src_x = rx + shear_x[:, None, None] * (ys + 0.5) - move_x[:, None, None]
    src_y = ry + shear_y[:, None, None] * (xs + 0.5) - move_y[:, None, None]
    grid = torch.stack([src_x * 2 / (w - 1) - 1, src_y * 2 / (h - 1) - 1], -1)  # [B, H, W, 2] in [-1, 1]
    return F.grid_sample(x - fill, grid, mode="nearest", padding_mode="zeros", align_corners=True) + fill


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float, dtype: torch.dtype) -> torch.Tensor:
    """[B] integer labels -> [B, num_classes] one-hot with label smoothing. Built with scatter_, because
    F.one_hot on a GPU checks its indices on the host: a device sync every training step."""
    off = smoothing / num_classes
    soft = torch.full((labels.shape[0], num_classes), off, dtype=dtype, device=labels.device)
    return soft.scatter_(1, labels.long().view(-1, 1), 1 - smoothing + off)


class MixUpCutMix(TensorOp):
    """Mix each batch with its reversal, by MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019), half of the batches
    each, and turn integer labels into the matching soft labels (with label smoothing). Inputs (x, y) -> (x, y_soft).
    """
    def __init__(self, inputs: Sequence[str], outputs: Sequence[str], num_classes: int, alpha: float = 1.0,
                 label_smoothing: float = 0.1, prob: float = 0.8, mode: Mode = "train") -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.num_classes, self.label_smoothing, self.prob = num_classes, label_smoothing, prob
        self.beta = torch.distributions.Beta(alpha, alpha)
        self.in_list, self.out_list = True, True

    def forward(self, data: List[torch.Tensor], state: Dict[str, Any]) -> List[torch.Tensor]:
        x, y = data
        soft = smooth_one_hot(y, self.num_classes, self.label_smoothing, x.dtype)
        # The choices below are host-side random numbers: no device sync, and one decision per batch as in timm.
        draw = torch.rand(4).tolist()
        if draw[0] >= self.prob:
            return [x, soft]
        lam = float(self.beta.sample())
        if draw[1] < 0.5:  # MixUp
            return [lam * x + (1 - lam) * x.flip(0), lam * soft + (1 - lam) * soft.flip(0)]
        h, w = x.shape[-2:]  # CutMix: a box of area (1 - lam), clipped at the border
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(draw[2] * h), int(draw[3] * w)
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[..., y1:y2, x1:x2] = x.flip(0)[..., y1:y2, x1:x2]
        lam = 1 - (y2 - y1) * (x2 - x1) / (h * w)  # the area actually kept
        return [x, lam * soft + (1 - lam) * soft.flip(0)]


class FusedImageOps(TensorOp):
    """Single-image-key TensorOps run as one function, optionally under `torch.compile`.

    Each batched op is a handful of small kernels on a 512 x 3 x 32 x 32 batch, so together they cost more in kernel
    launches and Python than in arithmetic. Compiled as one graph they become a few fused kernels. The ops' own
    `forward`s run unchanged, in order; their modes are replaced by this op's.
    """
    def __init__(self, ops: Sequence[TensorOp], inputs: str, outputs: str, compile: bool = False,
                 mode: Mode = None) -> None:
        super().__init__(inputs=inputs, outputs=outputs, mode=mode)
        self.ops = list(ops)
        self.compile = compile
        self._run: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # made by the first call (below)

    def _chain(self, data: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            data = op.forward(data, {})
        return data

    def prepare(self, device: torch.device) -> None:
        """Each op's per-device state (AutoAugment's tables, Normalize's constants), made once (later, a lookup)."""
        for op in self.ops:
            if hasattr(op, "prepare"):
                op.prepare(device)

    def forward(self, data: torch.Tensor, state: Dict[str, Any]) -> torch.Tensor:
        # The ops' per-device state is made here, outside the compiled function: made inside it, on the first call,
        # the state changed what torch.compile guarded on, and the whole chain compiled again on the second call.
        self.prepare(data.device)
        if self._run is None:
            # Made here rather than when the op is built: torch.compile's first use imports the compiler (seconds),
            # which an app may be importing in the background while it does other work until its first step.
            # dynamic=False: the batch shape is fixed (full batches only in training), one graph is enough.
            self._run = torch.compile(self._chain, dynamic=False) if self.compile else self._chain
        return self._run(data)


POLICIES = ("autoaugment", "trivialaugment")


def batched_cifar_ops(mean: Sequence[float], std: Sequence[float], image_key: str = "x", augment: bool = True,
                      strong: bool = False, label_key: str = "y", num_classes: Optional[int] = None,
                      label_smoothing: float = 0.0, fuse: bool = False, compile: bool = False,
                      policy: str = "autoaugment", mix_prob: float = 0.0) -> List[TensorOp]:
    """The six apphub ops as batched TensorOps (augmenting ops in train mode only), optionally with the strong
    augmentation of the "vit" recipe.

    strong: a per-image policy on the raw pixels (before Normalize) on top of the six ops: "autoaugment" (default):
    `AutoAugment`'s CIFAR-10 policy; "trivialaugment": `TrivialAugment`. mix_prob: the share of batches
    `MixUpCutMix` mixes (the others get the smoothed labels only), writing soft labels to `<label_key>_soft` in train
    mode; 0 (default) leaves it out (no `_soft` labels). num_classes is needed with strong=True.

    fuse: run the train-mode image ops as one `FusedImageOps` (and `compile` it), evaluation keeping the two plain
    ops (ChannelTranspose, Normalize). Same results, same randomness per image."""
    k = image_key
    ops: List[TensorOp] = [ChannelTranspose(k, k), Normalize(k, k, mean=mean, std=std)]
    if augment:
        ops += [
            PadIfNeeded(k, k, min_height=40, min_width=40, mode="train"),
            RandomCrop(k, k, height=32, width=32, mode="train"),
            HorizontalFlip(k, k, prob=0.5, mode="train"),
            CoarseDropout(k, k, max_holes=1, mode="train"),
        ]
    if policy not in POLICIES:
        raise ValueError(f"augmentation policy must be one of {POLICIES}, got {policy!r}")
    if strong:
        if num_classes is None:
            raise ValueError("strong augmentation mixes labels: pass num_classes")
        # on pixel values 0..255, so before Normalize
        ops[1:1] = [AutoAugment(k, k, mode="train") if policy == "autoaugment" else TrivialAugment(k, k, mode="train")]
    mix = [MixUpCutMix((k, label_key), (k, f"{label_key}_soft"), num_classes=num_classes,
                       label_smoothing=label_smoothing, prob=mix_prob, mode="train")] if strong and mix_prob else []
    if fuse and augment:
        # MixUpCutMix stays outside: its host-side choices (mix or cut, box size) would recompile the graph
        plain = [ChannelTranspose(k, k, mode="!train"), Normalize(k, k, mean=mean, std=std, mode="!train")]
        return [FusedImageOps(ops, k, k, compile=compile, mode="train")] + plain + mix
    return ops + mix
