"""FastEstimator Pipelines shared by the apps."""
from apphub_vit import compat  # noqa: F401  (patches FastEstimator 1.7.0 for current PyTorch on import)
