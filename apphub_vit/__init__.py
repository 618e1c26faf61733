"""apphub-vit: FastEstimator apps that pretrain a ViT on CIFAR-100, transfer its encoder to CIFAR-10, and baselines."""
from apphub_vit import compat  # noqa: F401  (patches FastEstimator 1.7.0 for current PyTorch on import)
