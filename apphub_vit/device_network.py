"""A FastEstimator TorchNetwork that keeps the GPU busy: where the apphub's end-to-end loop loses its speed.

Measured on an H200 (../shared/gpu/README.md), `Estimator.fit` ran the apphub ViT at a third of what its pipeline and
its model manage alone. Per training step, FastEstimator 1.7's `TorchNetwork`:

1. copies every output the traces might want (`ce`, and `y_pred` when a trace asks for it) back to the CPU with a
   blocking `.to("cpu")`: the host waits for the GPU to finish the step before it may queue the next one, so the
   Python work of each step (traces, data hand-over, op dispatch) is never overlapped with GPU work;
2. copies the batch to the GPU from pageable memory, which is synchronous;
3. with `mixed_precision`, uses fp16 with a GradScaler, whose inf check (`.item()`) is one more sync per step.

`DeviceNetwork` keeps training outputs on the device (they are turned into numbers only when a trace logs them,
every `log_steps`), copies inputs through pinned memory without blocking, and runs the forward pass under bf16
autocast when asked (bf16 has fp32's range, so no loss scaling and no sync). Eval mode keeps FastEstimator's own
behaviour (its EvalEssential trace stacks per-batch values with numpy). On a CPU it behaves as `TorchNetwork`.
"""
from typing import Any, Dict, MutableMapping, Optional, Sequence, Tuple

import torch
from fastestimator.network import TorchNetwork
from fastestimator.util.base_util import NonContext


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.pin_memory().to(device, non_blocking=True) if value.device.type == "cpu" else value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class DeviceNetwork(TorchNetwork):
    """`fe.Network` for torch models with asynchronous training steps; `autocast_dtype` e.g. torch.bfloat16."""
    def __init__(self, ops: Sequence[Any], autocast_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(ops=ops)
        self.autocast_dtype = autocast_dtype

    def _get_effective_batch_input(self, batch: MutableMapping[str, Any]) -> Dict[str, Any]:
        if self.device.type == "cpu":
            return super()._get_effective_batch_input(batch)
        return {key: _to_device(batch[key], self.device) for key in self.ctx_gpu_inputs if key in batch}

    def _run_step(self, batch: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        if self.device.type == "cpu" and self.autocast_dtype is None:
            return super()._run_step(batch)
        batch_in = self._get_effective_batch_input(batch)
        self.ctx_state["tape"] = NonContext()
        autocast = (torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else NonContext())
        with torch.no_grad() if not self.ctx_state["req_grad"] else NonContext():
            with autocast:
                self._forward_batch(batch_in, self.ctx_state, self.ctx_ops)
        keep_on_device = self.device.type != "cpu" and self.ctx_state["mode"] == "train"
        prediction = {}
        for key in self.ctx_outputs:
            if key in batch_in:
                value = batch_in[key]
                value = value.detach() if isinstance(value, torch.Tensor) else value
                if isinstance(value, torch.Tensor) and not keep_on_device:
                    value = value.float().cpu() if value.dtype == torch.bfloat16 else value.cpu()
                prediction[key] = value
        return batch, prediction
