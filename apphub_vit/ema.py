"""An exponential moving average (EMA) of the weights, evaluated in their place: Polyak & Juditsky 1992's averaging as
DeiT and timm use it (`timm.utils.ModelEmaV3`: `ema = decay * ema + (1 - decay) * weights` after every optimizer step).

Two pieces share one `WeightAverage`:

* `EMAUpdate`, the last op of the training network: the average's update, one fused `torch._foreach_lerp_` over the
  parameters on their device, so that it is part of the step `DeviceNetwork` captures as a CUDA graph;
* `EvalWithAverage`, a trace: every eval epoch runs on the averaged weights (so the metrics, the best-model file and,
  after the last epoch, the returned model and the saved encoder are the average's), and the next training epoch
  goes on from the trained weights, which the optimizer's state belongs to. Its `state` (the average, and the trained
  weights while the average is in the model) goes into the run's checkpoint, so a resumed run goes on with both.

Buffers are not averaged (the ViT's are constants). The decay is per step: 0.999 averages over about the last 1,000
steps.
"""
from typing import Any, Dict, List, Optional

import torch
from fastestimator.op.tensorop import TensorOp
from fastestimator.trace import Trace
from fastestimator.util.data import Data


class WeightAverage:
    """The averaged copy of `model`'s parameters (made at the first update, on the parameters' device)."""
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        self.model, self.decay = model, decay
        self.average: Optional[List[torch.Tensor]] = None

    def params(self) -> List[torch.Tensor]:
        return list(self.model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        params = [p.detach() for p in self.params()]
        if self.average is None:
            self.average = [p.clone() for p in params]
            return
        if self.average[0].device != params[0].device:  # restored from a checkpoint on the CPU: once, before capture
            self.average = [a.to(params[0].device) for a in self.average]
        torch._foreach_lerp_(self.average, params, 1.0 - self.decay)


class EMAUpdate(TensorOp):
    """After the optimizer step (place it after the UpdateOp, which steps at once): the average's update."""
    def __init__(self, average: WeightAverage, mode: str = "train") -> None:
        super().__init__(inputs=None, outputs=None, mode=mode)
        self.average = average

    def forward(self, data: Any, state: Dict[str, Any]) -> None:
        if not state["warmup"]:  # FastEstimator's warm-up pass runs the ops without an update
            self.average.update()


class EvalWithAverage(Trace):
    """Evaluates on the averaged weights and trains on the trained ones (see the module docstring)."""
    def __init__(self, average: WeightAverage) -> None:
        super().__init__(mode=["train", "eval"])
        self.average = average
        self.trained: Optional[List[torch.Tensor]] = None  # the trained weights while the average is in the model

    @torch.no_grad()
    def on_epoch_begin(self, data: Data) -> None:
        if self.average.average is None:
            return
        params = self.average.params()
        if self.system.mode == "eval" and self.trained is None:  # (not again when a resume repeats an eval)
            self.trained = [p.detach().clone() for p in params]
            for p, a in zip(params, self.average.average):
                p.copy_(a)
        elif self.system.mode == "train" and self.trained is not None:
            for p, t in zip(params, self.trained):
                p.copy_(t)
            self.trained = None

    def state(self) -> Dict[str, Any]:
        return {"average": self.average.average, "trained": self.trained}

    def load_state(self, state: Dict[str, Any]) -> None:
        self.average.average, self.trained = state["average"], state["trained"]  # the update moves them if need be
