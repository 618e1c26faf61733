"""Model bookkeeping shared by the apps: parameter counts, and whether a state_dict fits a model."""
from typing import Any, Dict, Iterable, List, Mapping, Tuple, Union

import torch


def count_parameters(models: Union[torch.nn.Module, Iterable[torch.nn.Module]]) -> Dict[str, Any]:
    """{"total", "trainable", "per_model": {name: {"total", "trainable"}}} over `models` (one model or several); a
    parameter shared between models (or tied within one) counts once in the totals. A model is named by its
    `model_name` (as `fe.build` sets it), else `<class name>_<index>`."""
    if isinstance(models, torch.nn.Module):  # one model (an nn.Sequential would otherwise iterate its layers)
        models = [models]
    seen, total, trainable, per_model = set(), 0, 0, {}
    for index, model in enumerate(models):
        name = getattr(model, "model_name", None) or f"{type(model).__name__}_{index}"
        own_total = own_trainable = 0
        for param in model.parameters():  # parameters() already yields a tied tensor once per module
            own_total += param.numel()
            own_trainable += param.numel() if param.requires_grad else 0
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
                trainable += param.numel() if param.requires_grad else 0
        per_model[name] = {"total": own_total, "trainable": own_trainable}
    return {"total": total, "trainable": trainable, "per_model": per_model}


def state_dict_mismatches(own: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], *,
                          loaded_name: str = "loaded", limit: int = 5) -> List[str]:
    """What keeps `loaded` from loading into a model whose state_dict is `own`: "missing [keys]" (in `own` only),
    "unexpected [keys]" (in `loaded` only) and one "key: <loaded_name> (shape) vs model (shape)" per shape mismatch,
    at most `limit` of each kind. Empty when it fits (`load_state_dict(loaded)` would succeed, strict)."""
    missing, unexpected = sorted(set(own) - set(loaded)), sorted(set(loaded) - set(own))
    shapes = [f"{k}: {loaded_name} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in loaded.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    return (([f"missing {missing[:limit]}"] if missing else []) +
            ([f"unexpected {unexpected[:limit]}"] if unexpected else []) + shapes[:limit])


def non_finite(state: Mapping[str, torch.Tensor]) -> List[str]:
    """The names of the floating-point tensors of a state_dict that hold a NaN or an infinity (weights a diverged
    training left), in order; empty when every one is finite."""
    floats = [(k, v) for k, v in state.items() if torch.is_floating_point(v)]
    finite: Dict[str, bool] = {}
    by_device: Dict[torch.device, List[Tuple[str, torch.Tensor]]] = {}
    for k, v in floats:
        by_device.setdefault(v.device, []).append((k, v))
    for group in by_device.values():  # one check per device, so one wait for a GPU instead of one per tensor
        flags = torch.stack([torch.isfinite(v).all() for _, v in group]).tolist()
        finite.update((k, flag) for (k, _), flag in zip(group, flags))
    return [k for k, _ in floats if not finite[k]]
