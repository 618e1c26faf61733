"""A CIFAR-shaped synthetic image source that needs no download.

The images are 32x32x3 uint8 pictures of one foreground shape (10 kinds: disk, ring, square, ...) drawn over one
background texture (10 kinds: flat, gratings, checkerboard, ...), each with random position, size, rotation, colours,
texture phase and pixel noise. The labels are real functions of the picture, so a model must learn the primitives:

* ``num_classes=100`` (the pretraining stand-in for CIFAR-100): label = shape * 10 + texture;
* ``num_classes=10`` (the finetuning stand-in for CIFAR-10): label = shape; the texture is a nuisance drawn at random,
  with a different seed and a wider size range.

No two classes are the same picture up to a rotation (shapes are drawn at any angle: no square-and-diamond or
plus-and-x pairs) or a horizontal flip (the training recipes flip: no diagonal-and-anti-diagonal pair), so every class
can be told apart in principle, with the augmentation on.

Both variants share the same visual primitives, so an encoder pretrained on the 100-class task has learned features
(shape outlines, textures) that the 10-class task needs: transfer can help, as from CIFAR-100 to CIFAR-10.
Generation is seeded and deterministic (the same arguments give the same bytes) and vectorised in numpy.
"""
from typing import Callable, Dict, Tuple

import numpy as np

SHAPES = ("disk", "ring", "square", "triangle", "bar", "plus", "frame", "half-disk", "crescent", "two-dots")
TEXTURES = ("flat", "h-grating", "v-grating", "diagonal", "grid", "checker", "fine-grating", "circles", "gradient",
            "dots")
SYNTHETIC_100_CLASSES = tuple(f"{s}/{t}" for s in SHAPES for t in TEXTURES)
SYNTHETIC_10_CLASSES = SHAPES

_SIZE = 32
_YY, _XX = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float32)  # pixel coordinates, [32, 32]

# Shape masks over rotated, size-normalised coordinates (u, v): the shape spans about [-1, 1].
_SHAPE_FNS: Tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    lambda u, v: u**2 + v**2 < 1.0,
    lambda u, v: (u**2 + v**2 < 1.0) & (u**2 + v**2 > 0.35),
    lambda u, v: np.maximum(abs(u), abs(v)) < 0.8,
    lambda u, v: (v > -0.6) & (v < 1.0 - 1.9 * abs(u)),
    lambda u, v: (abs(u) < 1.0) & (abs(v) < 0.3),
    lambda u, v: (np.minimum(abs(u), abs(v)) < 0.25) & (np.maximum(abs(u), abs(v)) < 0.95),
    lambda u, v: (np.maximum(abs(u), abs(v)) < 0.9) & (np.maximum(abs(u), abs(v)) > 0.5),
    lambda u, v: (u**2 + v**2 < 1.0) & (v > -0.1),
    lambda u, v: (u**2 + v**2 < 1.0) & ((u - 0.55)**2 + v**2 > 0.55),
    lambda u, v: ((u - 0.55)**2 + v**2 < 0.2) | ((u + 0.55)**2 + v**2 < 0.2),
)


def _texture(kind: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """A [n, 32, 32] texture in [0, 1] with a random phase / frequency jitter per image."""
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    freq = rng.uniform(0.8, 1.2, (n, 1, 1)).astype(np.float32)
    x, y = _XX[None], _YY[None]
    if kind == 0:
        return np.full((n, _SIZE, _SIZE), 0.5, np.float32)
    if kind == 1:
        return 0.5 + 0.5 * np.sin(0.8 * freq * y + phase)
    if kind == 2:
        return 0.5 + 0.5 * np.sin(0.8 * freq * x + phase)
    if kind == 3:  # either diagonal: a horizontal flip (an augmentation of the recipes) must not change the class
        sign = rng.choice(np.float32([-1, 1]), (n, 1, 1))
        return 0.5 + 0.5 * np.sin(0.55 * freq * (x + sign * y) + phase)
    if kind == 4:
        return ((np.sin(0.8 * freq * x + phase) > 0.7) | (np.sin(0.8 * freq * y + phase) > 0.7)).astype(np.float32)
    if kind == 5:
        return ((np.sin(0.7 * freq * x + phase) * np.sin(0.7 * freq * y + phase)) > 0).astype(np.float32)
    if kind == 6:
        return 0.5 + 0.5 * np.sign(np.sin(2.2 * freq * y + phase))
    cx, cy = rng.uniform(0, _SIZE, (2, n, 1, 1)).astype(np.float32)
    r = np.sqrt((x - cx)**2 + (y - cy)**2)
    if kind == 7:
        return 0.5 + 0.5 * np.sin(0.9 * freq * r + phase)
    if kind == 8:
        return np.clip(r / (_SIZE * 1.2), 0, 1)
    return ((np.sin(1.3 * freq * x + phase) * np.sin(1.3 * freq * y)) > 0.55).astype(np.float32)


def _render(shapes: np.ndarray, textures: np.ndarray, rng: np.random.Generator, size_range: Tuple[float,
                                                                                                  float]) -> np.ndarray:
    """Render images for the given shape and texture ids: [n] ints each -> [n, 32, 32, 3] uint8."""
    n = len(shapes)
    images = np.empty((n, _SIZE, _SIZE, 3), np.float32)
    cx, cy = rng.uniform(11, 21, (2, n, 1, 1)).astype(np.float32)
    radius = rng.uniform(*size_range, (n, 1, 1)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    dx, dy = (_XX[None] - cx) / radius, (_YY[None] - cy) / radius
    u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
    # A background of two colours 40-100 levels apart per channel (the texture is always visible, never dominant) and
    # a foreground colour that stands out from it, so the shape is always there to see whatever the colours drawn.
    bg_a = rng.uniform(0, 255, (n, 1, 1, 3)).astype(np.float32)
    toward_middle = np.where(bg_a < 128, 1.0, -1.0).astype(np.float32)
    bg_b = bg_a + toward_middle * rng.uniform(40, 100, (n, 1, 1, 3)).astype(np.float32)
    fg = rng.uniform(0, 255, (n, 1, 1, 3)).astype(np.float32)
    too_close = np.abs(fg - (bg_a + bg_b) / 2).mean(axis=-1, keepdims=True) < 70
    fg = np.where(too_close, np.where((bg_a + bg_b) / 2 > 127, fg * 0.3, 255 - (255 - fg) * 0.3), fg)
    for kind in range(len(TEXTURES)):
        idx = np.flatnonzero(textures == kind)
        if idx.size:
            t = _texture(kind, idx.size, rng)[..., None]  # [k, 32, 32, 1]
            images[idx] = bg_a[idx] * (1 - t) + bg_b[idx] * t
    for kind, fn in enumerate(_SHAPE_FNS):
        idx = np.flatnonzero(shapes == kind)
        if idx.size:
            mask = fn(u[idx], v[idx])[..., None]  # [k, 32, 32, 1]
            images[idx] = np.where(mask, fg[idx], images[idx])
    images += 8 * rng.standard_normal(images.shape, dtype=np.float32)  # sensor-like pixel noise
    return np.clip(images, 0, 255).round().astype(np.uint8)


def make_synthetic(num_classes: int, num_samples: int, seed: int = 0,
                   chunk: int = 5000) -> Dict[str, np.ndarray]:
    """Generate ``num_samples`` labelled images: {"x": [N, 32, 32, 3] uint8, "y": [N] uint8}, classes balanced.

    Args:
        num_classes: 100 (shape x texture, the CIFAR-100 stand-in) or 10 (shape only, the CIFAR-10 stand-in).
        num_samples: How many images.
        seed: Seed of the generator; the same arguments always give the same arrays.
        chunk: Images rendered at a time (bounds memory).
    """
    if num_classes not in (10, 100):
        raise ValueError(f"synthetic data has 10 or 100 classes, got num_classes={num_classes!r}")
    if num_samples < 1:
        raise ValueError(f"synthetic num_samples must be positive, got {num_samples!r}")
    # Separate streams for the two variants, so the 10-class images are not the 100-class images relabelled.
    rng = np.random.default_rng([seed, num_classes])
    labels = np.arange(num_samples) % num_classes
    rng.shuffle(labels)
    x = np.empty((num_samples, _SIZE, _SIZE, 3), np.uint8)
    for start in range(0, num_samples, chunk):
        y = labels[start:start + chunk]
        if num_classes == 100:
            shapes, textures, sizes = y // 10, y % 10, (7.0, 11.0)
        else:
            shapes, textures, sizes = y, rng.integers(0, len(TEXTURES), y.shape), (6.0, 12.0)
        x[start:start + chunk] = _render(shapes, textures, rng, sizes)
    return {"x": x, "y": labels.astype(np.uint8)}
