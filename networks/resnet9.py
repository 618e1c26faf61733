"""ResNet-9, the CNN that recipe distillation trains in seconds as the ViT's teacher.

Follows David Page's "How to train your ResNet" (Myrtle.ai 2018; github.com/davidcpage/cifar10-fast, `dawn.py`):
a 3x3 conv-BN-ReLU prep layer of 64 channels, then 128 (max-pool, residual of two conv-BN-ReLUs), 256 (max-pool) and
512 channels (max-pool, residual), a global max-pool and a bias-free linear layer whose logits are scaled by 0.125.
The layers are an `nn.Sequential` in the same order as `benchmarks/resnet9_reference.py`'s, so that the two share
their state_dict keys (the tests check one against the other).
"""
import torch
from torch import nn


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution (no bias: BatchNorm's shift takes its place), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """x + two conv_bn(c, c) of x."""
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Scale(nn.Module):
    """Multiplies by a constant: Page's 0.125 on the logits, in place of a tuned temperature."""
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


WIDTH = 64  # Page's
MAP_LAYERS = 6  # the layers up to the third conv_bn's max-pool: a [B, 4 * width, H/4, W/4] map (8x8 on CIFAR)
MAP_CHANNELS = 4 * WIDTH  # that map's channels at Page's width


class ResNet9(nn.Sequential):
    """[B, 3, H, W] -> [B, num_classes] logits; `width` 64 is Page's (channels 64, 128, 256, 512)."""
    def __init__(self, num_classes: int = 10, width: int = WIDTH) -> None:
        c = [width, 2 * width, 4 * width, 8 * width]
        super().__init__(
            conv_bn(3, c[0]),
            conv_bn(c[0], c[1]), nn.MaxPool2d(2), Residual(c[1]),  # [B, c1, H/2, W/2]
            conv_bn(c[1], c[2]), nn.MaxPool2d(2),  # [B, c2, H/4, W/4]
            conv_bn(c[2], c[3]), nn.MaxPool2d(2), Residual(c[3]),  # [B, c3, H/8, W/8]
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),  # [B, c3]: Page's MaxPool2d(4) on a 32x32 image's 4x4 map
            nn.Linear(c[3], num_classes, bias=False), Scale(0.125))


class WithFeatureMap(nn.Module):
    """A `ResNet9` that also returns its map after `MAP_LAYERS` layers: [B, 3, H, W] -> (logits [B, num_classes],
    map [B, 4 * width, H/4, W/4]). On a 32x32 image the map is 8x8, the grid of a patch-4 ViT's tokens: the target of
    the ViT's locality guidance (apphub_vit/teacher.py, `LocalityGuidance`). Holds the same parameters (as `net`)."""
    def __init__(self, net: ResNet9) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple:
        feature_map = x
        for i, layer in enumerate(self.net):  # (a slice of this Sequential subclass would build a new ResNet9)
            x = layer(x)
            if i + 1 == MAP_LAYERS:
                feature_map = x  # [B, 4 * width, H/4, W/4]
        return x, feature_map
