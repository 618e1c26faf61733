"""The baselines' networks: torchvision's ResNet-18 and ViT-B/16 with ImageNet weights, and an MNIST autoencoder.

ImageNet weights are torchvision's IMAGENET1K_V1 files, read from the local torch hub cache
(``torch.hub.get_dir()/checkpoints/``, where `torchvision.models.resnet18(weights=...)` puts them) or from a path the
user gives. When the file is absent it is downloaded only if download.pytorch.org answers within seconds; otherwise
`WeightsNotFoundError` says which file to put where (these machines are often offline, and torchvision's own download
would fail with a long traceback, or hang).

Freezing is done with `requires_grad=False`; `trainable_parameters` is what the apps hand their optimizers. A frozen
ResNet also keeps its BatchNorm layers in eval mode (`ResNet18.train`), so that its running statistics, part of the
pretrained feature extractor, are not re-estimated on the new data: the frozen backbone then computes a fixed function.
"""
import os
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from torchvision.models import ResNet, ResNet18_Weights, ViT_B_16_Weights, VisionTransformer
from torchvision.models.resnet import BasicBlock
from torchvision.models.vision_transformer import interpolate_embeddings

from networks.online import online
from networks.util import state_dict_mismatches

IMAGENET_WEIGHTS = {"resnet18": ResNet18_Weights.IMAGENET1K_V1, "vit_b_16": ViT_B_16_Weights.IMAGENET1K_V1}


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights that are neither on disk nor downloadable; the message says which file to put where."""


def imagenet_weights_path(arch: str) -> str:
    """Where torchvision keeps (and where these apps look for) the IMAGENET1K_V1 file of `arch`."""
    url = IMAGENET_WEIGHTS[arch].url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def load_pretrained_state(arch: str, weights: str) -> Dict[str, torch.Tensor]:
    """The ImageNet state_dict of `arch` from `weights`: "imagenet" (torch hub cache) or a path to a `.pth` file."""
    if weights == "imagenet":
        path, url = imagenet_weights_path(arch), IMAGENET_WEIGHTS[arch].url
        if not os.path.isfile(path):
            if not online(url.split("/")[2]):
                raise WeightsNotFoundError(
                    f"The ImageNet weights of {arch} (torchvision IMAGENET1K_V1) are not in the torch hub cache and "
                    f"cannot be downloaded (no connection to {url.split('/')[2]}). Download {url} on a machine with "
                    f"internet and put it at {path} (the torch hub cache; set TORCH_HOME to move it), or pass "
                    f"weights=<path to that file>, or weights=None to train from scratch.")
            torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)  # lands at `path`
    else:
        path = os.path.expanduser(weights)
        if not os.path.isfile(path):
            raise WeightsNotFoundError(
                f"Weights file '{weights}' does not exist. Pass the path of torchvision's {arch} IMAGENET1K_V1 file "
                f"({os.path.basename(IMAGENET_WEIGHTS[arch].url)}), weights='imagenet' to use the torch hub cache "
                f"({imagenet_weights_path(arch)}), or weights=None to train from scratch.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated download, not a torch file, pickled code we refuse to run
        raise WeightsNotFoundError(f"Cannot read {arch} weights '{path}' ({type(err).__name__}: {err}); download "
                                   f"{IMAGENET_WEIGHTS[arch].url} again.") from err
    if not isinstance(state, dict):
        raise WeightsNotFoundError(f"'{path}' holds a {type(state).__name__}, not a {arch} state_dict.")
    return state


def _load_into(model: nn.Module, state: Dict[str, torch.Tensor], arch: str, source: str) -> None:
    parts = state_dict_mismatches(model.state_dict(), state, loaded_name="file")
    if parts:
        raise ValueError(f"Weights '{source}' are not torchvision {arch} ImageNet weights for this model: "
                         f"{'; '.join(parts)}")
    model.load_state_dict(state)


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def trainable_parameters(params: Iterable[nn.Parameter]) -> List[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def adam_on_trainable(lr: float, weight_decay: float = 0.0) -> Callable[[Iterable[nn.Parameter]], torch.optim.Adam]:
    """An optimizer_fn for `fe.build`: Adam over the parameters that require gradients only."""
    return lambda params: torch.optim.Adam(trainable_parameters(params), lr=lr, weight_decay=weight_decay)


class ResNet18(ResNet):
    """torchvision's `resnet18` (same layers and state_dict keys), whose frozen BatchNorm layers stay in eval mode."""
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)

    def train(self, mode: bool = True) -> "ResNet18":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()  # frozen affine -> frozen statistics too
        return self


def resnet18_classifier(num_classes: int = 10, weights: Optional[str] = "imagenet",
                        freeze_backbone: Optional[bool] = None) -> ResNet18:
    """ResNet-18 with a new `num_classes` fc layer.

    Args:
        num_classes: Classes of the new head.
        weights: "imagenet" (torchvision IMAGENET1K_V1 from the hub cache), a path to that file, or None (random).
        freeze_backbone: Freeze every parameter but the new fc. None: freeze iff pretrained weights are loaded.
    """
    model = ResNet18()
    if weights is not None:
        _load_into(model, load_pretrained_state("resnet18", weights), "resnet18", weights)
    if freeze_backbone if freeze_backbone is not None else weights is not None:
        freeze(model)
    model.fc = nn.Linear(model.fc.in_features, num_classes)  # new, so trainable
    return model


def vit_b16_classifier(num_classes: int = 100, weights: Optional[str] = "imagenet", trainable_blocks: int = 3,
                       image_size: int = 224, patch_size: int = 16, num_layers: int = 12, num_heads: int = 12,
                       hidden_dim: int = 768, mlp_dim: int = 3072) -> VisionTransformer:
    """torchvision ViT-B/16 (or a smaller VisionTransformer of the same code, for tests) with a new head.

    Every parameter is frozen except the last `trainable_blocks` encoder blocks and the new `num_classes` head (the
    final LayerNorm stays frozen, as in the recipe's 21,340,516 trainable parameters). ImageNet weights need the
    ViT-B/16 sizes; at another image_size their position embeddings are interpolated (torchvision's helper).
    """
    if not 0 <= trainable_blocks <= num_layers:
        raise ValueError(f"trainable_blocks must be in [0, num_layers={num_layers}], got {trainable_blocks!r}")
    model = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
                              hidden_dim=hidden_dim, mlp_dim=mlp_dim)
    if weights is not None:
        state = load_pretrained_state("vit_b_16", weights)
        if image_size != 224 and patch_size == 16:
            state = interpolate_embeddings(image_size, patch_size, state)
        _load_into(model, state, "vit_b_16", weights)
    freeze(model)
    for block in list(model.encoder.layers)[num_layers - trainable_blocks:]:
        for p in block.parameters():
            p.requires_grad_(True)
    model.heads.head = nn.Linear(hidden_dim, num_classes)
    return model


class MnistEncoder(nn.Sequential):
    """784 -> 128 -> code (3): ReLU on the hidden layer, a linear code (a ReLU there would zero whole axes of a 3-d
    embedding)."""
    def __init__(self, code_dim: int = 3, hidden: int = 128) -> None:
        super().__init__(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, code_dim))


class MnistDecoder(nn.Sequential):
    """code -> 128 -> 784: ReLU on the hidden layer, a sigmoid output so reconstructions lie in the [0, 1] pixel
    range of the inputs."""
    def __init__(self, code_dim: int = 3, hidden: int = 128) -> None:
        super().__init__(nn.Linear(code_dim, hidden), nn.ReLU(), nn.Linear(hidden, 784), nn.Sigmoid())
