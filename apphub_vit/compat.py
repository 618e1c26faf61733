"""Compatibility of FastEstimator 1.7.0 (built against torch 2.3.1) with current PyTorch.

FastEstimator 1.7.0's `fastestimator.dataset.dataloader.InfiniteSampler.__init__` calls
`Sampler.__init__(data_source=None)`. PyTorch deprecated that argument in 2.2 and later removed it, after which
`Sampler` has no `__init__` of its own and every `fit()` dies at its first epoch with
`TypeError: object.__init__() takes exactly one argument` (seen with torch 2.11 and 2.14.1).

The fix slides a tiny base class between `InfiniteSampler` and `Sampler` that accepts (and ignores, as old torch did)
the `data_source` argument, so FastEstimator's own code runs unchanged. It is applied on import of any of our packages,
which covers both `fastestimator train apphub_vit/...` and Python calls, and is a no-op on a torch whose `Sampler`
still takes `data_source`. Remove it once FastEstimator drops that call.
"""
import inspect

from torch.utils.data import Sampler


def _sampler_takes_data_source() -> bool:
    init = Sampler.__init__
    if init is object.__init__:
        return False
    return "data_source" in inspect.signature(init).parameters


class _SamplerAcceptingDataSource(Sampler):
    """`Sampler` as torch < 2.2 defined it: `__init__(data_source=None)`, the argument unused."""
    def __init__(self, data_source=None) -> None:  # noqa: ARG002 - kept for FastEstimator's call
        super().__init__()


def patch_infinite_sampler() -> bool:
    """Make FastEstimator's InfiniteSampler constructible on this torch. Returns True if a patch was applied."""
    from fastestimator.dataset.dataloader import InfiniteSampler
    if _sampler_takes_data_source() or _SamplerAcceptingDataSource in InfiniteSampler.__mro__:
        return False
    InfiniteSampler.__bases__ = (_SamplerAcceptingDataSource, )
    return True


patch_infinite_sampler()
