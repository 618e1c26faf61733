"""Networks of the apps: the Conv2d-embedding ViT and the baselines."""
from networks.vit import ViTConfig, ViTEmbeddings, ViTEncoder, ViTModel

__all__ = ["ViTConfig", "ViTEmbeddings", "ViTEncoder", "ViTModel"]
