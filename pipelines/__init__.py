"""FastEstimator Pipelines shared by the apps."""
