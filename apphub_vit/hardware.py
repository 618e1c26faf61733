"""Where and how fast an app runs: the device, precision, compilation, and whether a train step is a CUDA graph.

None in an app's hardware arguments means: the best choice for the device found. On a GPU that is the path measured
fastest (docs/performance.md): the six augmentation ops batched on the device (`pipelines/batched.py`), bf16 autocast,
`torch.compile`, and `DeviceNetwork` replaying each train step as a CUDA graph (docs/cuda-graphs.md) wherever the
recipe allows it. On a CPU: fp32, no compilation, no graph.
"""
import importlib
import sys
import threading
from dataclasses import dataclass
from typing import List, Optional

import torch

from apphub_vit import options
from apphub_vit.recipes import Recipe

PRECISIONS = ("fp32", "bf16", "fp16")  # bf16: autocast, no loss scaling; fp16: FastEstimator's mixed_precision
# Eval batches on a GPU. An eval step is a forward pass alone, and FastEstimator's eval loop does per-batch work on the
# host (its op chain, the metric traces' copies of the predictions); at the train batch (256) that host work, not the
# GPU, set the eval speed, and batches of 5,000 made an eval epoch faster than 2,500 did (docs/performance.md; measured
# with an attention kernel since removed). 5,000 divides the CIFAR and MNIST test sets (10,000), the validation split
# (5,000) and a five-class split's test set, so every eval batch has one shape (one compiled graph); its activations
# take about a GB.
GPU_EVAL_BATCH = 5000


@dataclass(frozen=True)
class Hardware:
    gpu: bool
    device_augment: bool  # the augmentation ops batched where the model runs, instead of per sample in the pipeline
    precision: str
    compile: bool
    num_process: Optional[int]  # pipeline worker processes of the per-sample pipeline (None: FastEstimator's default)
    cuda_graph: bool
    eval_batch_size: int  # images per eval (and test) batch


def cuda_graph_blockers(recipe: Recipe, precision: str) -> List[str]:
    """Why a train step of this recipe cannot be a CUDA graph (empty: it can). A graph replays the step as captured:
    fine for random draws on the device and for every optimizer the apps build on a GPU (AdamW / Adam capturable, SGD
    fused), not for MixUpCutMix's draws on the host (mix or cut, box size) or fp16's host-side inf check."""
    return [why for why, blocks in (("MixUp/CutMix draws on the host (mix_prob > 0)", recipe.mix_prob > 0),
                                    ("fp16 loss scaling syncs every step", precision == "fp16")) if blocks]


def resolve_hardware(recipe: Recipe, device_augment: Optional[bool] = None, precision: Optional[str] = None,
                     compile: Optional[bool] = None, num_process: Optional[int] = None,
                     cuda_graph: Optional[bool] = None) -> Hardware:
    """Check the hardware options and fill in the ones left at None for the device found."""
    gpu = torch.cuda.is_available()
    device_augment = True if device_augment is None else options.boolean("device_augment", device_augment)
    precision = options.optional_choice("precision", precision, PRECISIONS) or ("bf16" if gpu else "fp32")
    compile = gpu if compile is None else options.boolean("compile", compile)
    cuda_graph = None if cuda_graph is None else options.boolean("cuda_graph", cuda_graph)
    num_process = None if num_process is None else options.whole_number("num_process", num_process)
    if precision != "fp32" and not gpu:
        raise options.OptionError(f"precision={precision!r} needs a CUDA GPU; none is visible. Use precision='fp32' "
                                  f"on a CPU.")
    if cuda_graph and not gpu:
        raise options.OptionError("cuda_graph=True needs a CUDA GPU; none is visible. Use cuda_graph=False on a CPU.")
    if compile and not gpu:
        print("apphub_vit: torch.compile is on without a GPU: the first steps will be slow while it compiles")
    blockers = cuda_graph_blockers(recipe, precision)
    if cuda_graph and blockers:
        raise options.OptionError(f"cuda_graph=True cannot capture this configuration: {'; '.join(blockers)}. Use "
                                  f"cuda_graph=False (or None, which picks it where it works)")
    return Hardware(gpu=gpu, device_augment=device_augment, precision=precision, compile=compile,
                    num_process=num_process, cuda_graph=gpu and not blockers if cuda_graph is None else cuda_graph,
                    eval_batch_size=GPU_EVAL_BATCH if gpu and device_augment else recipe.batch_size)


def channels_last(model: torch.nn.Module, gpu: bool) -> torch.nn.Module:
    """`model` with its 4-d weights in cuDNN's channels_last layout on a GPU (the fast one for its convolutions; the
    values and state_dict keys stay), as it is on a CPU."""
    return model.to(memory_format=torch.channels_last) if gpu else model


# What torch.compile imports before it can compile anything: dynamo and inductor, seconds of Python imports (about
# 2.4 s on a 2-core CPU) on the main thread if nothing loads them before. Dynamo the main thread needs soon anyway
# (torch.optim imports it when an optimizer is built); inductor, most of the rest, it needs only when it compiles.
COMPILER_MODULES = ("torch._dynamo", "torch._inductor.compile_fx")
_compiler_import: Optional[threading.Thread] = None


def _import_compiler() -> None:
    try:
        for name in COMPILER_MODULES:
            importlib.import_module(name)
        if torch.cuda.is_available():
            # inductor's pool of processes that compile Triton kernels, which its first graph would start otherwise
            from torch._inductor.async_compile import maybe_warm_pool
            maybe_warm_pool()
    except Exception:  # (a torch without these: the main thread's own import, when it compiles, says what is wrong)
        pass


def import_compiler_in_background() -> None:
    """Start importing `COMPILER_MODULES` in a thread, once per process, unless they are loaded already, so that the
    imports run while the main thread loads the data and trains the teacher (the apps compile after it,
    `compiler_imported`), instead of in front of them."""
    global _compiler_import
    if _compiler_import is None and not all(name in sys.modules for name in COMPILER_MODULES):
        _compiler_import = threading.Thread(target=_import_compiler, name="apphub_vit-compiler-import", daemon=True)
        _compiler_import.start()


def compiler_imported() -> None:
    """Wait for `import_compiler_in_background`'s imports, if started: the main thread imports nothing the thread is
    importing (two threads importing one module that imports the other can be handed it half-initialised)."""
    if _compiler_import is not None:
        _compiler_import.join()


def compile_model(model: torch.nn.Module) -> None:
    """`torch.compile` `model` in place (state_dict keys stay those of the plain model) once `compiler_imported`; a
    model compiled already stays as it is. dynamic=False: one static graph per batch shape it sees (the train batch,
    the eval batch: GPU_EVAL_BATCH). Left to torch's automatic dynamic shapes, the ViT's eval graph, the second batch
    size it saw, was compiled for any batch size: longer to compile."""
    compiler_imported()
    if model._compiled_call_impl is None:
        model.compile(dynamic=False)
