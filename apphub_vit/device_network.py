"""A FastEstimator TorchNetwork that keeps the GPU busy: where the apphub's end-to-end loop loses its speed.

`Estimator.fit` runs the apphub ViT at a fraction of what its pipeline and its model manage alone on a GPU
(docs/performance.md). Per training step, FastEstimator 1.7's `TorchNetwork`:

1. copies every output the traces might want (`ce`, and `y_pred` when a trace asks for it) back to the CPU with a
   blocking `.to("cpu")`: the host waits for the GPU to finish the step before it may queue the next one, so the
   Python work of each step (traces, data hand-over, op dispatch) is never overlapped with GPU work;
2. copies the batch to the GPU from pageable memory, which is synchronous;
3. with `mixed_precision`, uses fp16 with a GradScaler, whose inf check (`.item()`) is one more sync per step.

`DeviceNetwork` keeps training outputs on the device (they are turned into numbers only when a trace logs them,
every `log_steps`), copies inputs through pinned memory without blocking, and runs the forward pass under bf16
autocast when asked (bf16 has fp32's range, so no loss scaling and no sync). In eval and test mode scalars (the losses,
which FastEstimator's EvalEssential stacks with numpy) come to the host after every batch, and other outputs stay on
the device until a trace copies what it reads (`to_number`). On a CPU it behaves as `TorchNetwork`.

Without syncs the GPU still idles: a training step is a few hundred kernels queued by FastEstimator's op chain in Python
(augmentation, forward, `torch.autograd.grad`, FastEstimator's UpdateOp's gradient copy per parameter, which the
apps' `DistributedUpdateOp` skips, the optimizer), several times longer on the host than on the GPU for a model of
this size. With `cuda_graph=True` the whole train step (every op, the backward
pass and the optimizer step) is captured once as a CUDA graph (PyTorch's "whole network capture") and then
replayed: one launch per step. Inputs are copied into the graph's fixed buffers, the learning rate that FastEstimator's
`LRScheduler` sets as a float is copied into a device tensor the captured optimizer reads, and random draws
(augmentation, stochastic depth) still change at every replay (CUDA graphs advance the generator's offset).

FastEstimator's TorchNetwork moves every model (and in training its optimizer's state) to the CPU at the end of every
epoch, train and eval, and back at the start of the next: two copies of the weights per epoch, and new addresses, so a
graph captured in one epoch would read stale memory in the next. `keep_on_device=True` (the default) leaves the models
and their optimizers' state on the GPU between epochs, so the graph captured in the first training epoch is replayed
for the whole run; `unload()` moves them to the CPU, as FastEstimator leaves them, at the end (`AppEstimator` calls it
after `fit()` and `test()`). Everything that changes the weights between epochs must then write in place (`copy_`, as
`load_state_dict` and the EMA's swap do); a file saved from them must be written from a CPU copy. With
`keep_on_device=False` the graph is dropped at the end of every epoch and captured again at the first step of the next
(each capture reuses one side stream and first returns the last graph's memory pool to the GPU, so memory stays flat
over epochs). What it needs: fixed shapes (a batch of another shape runs uncaptured), no host syncs and no host-side
randomness in the ops (so not MixUpCutMix, not fp16's GradScaler), and optimizers a graph can replay: Adam / AdamW
built with `capturable=True`, SGD with `fused=True` (the apps build them so on a GPU). A capture that fails anyway (a
sync in an op, out of memory) is reported and the run goes on without the graph. More, with the bugs of capturing
every epoch and their tests: docs/cuda-graphs.md.
"""
import gc
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import torch
from fastestimator.network import BaseNetwork, TorchNetwork
from fastestimator.op.tensorop.model import UpdateOp
from fastestimator.util.base_util import NonContext


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.pin_memory().to(device, non_blocking=True) if value.device.type == "cpu" else value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _capturable(optimizer: torch.optim.Optimizer, group: Dict[str, Any]) -> bool:
    """Whether a captured step can run this optimizer's update of `group`: Adam / AdamW built with capturable=True
    (their step count lives on the device), or SGD's fused kernel (torch has no capturable SGD; the fused one keeps no
    step count and reads a tensor learning rate on the device, so nothing in its step waits for the host once the
    momentum buffers exist, which the eager warm-up steps make)."""
    return bool(group.get("capturable", False)) or (isinstance(optimizer, torch.optim.SGD) and bool(group.get("fused")))


def _eval_output(value: torch.Tensor) -> torch.Tensor:
    """An eval or test output as the traces get it: a scalar (a loss, which FastEstimator's EvalEssential stacks with
    numpy) on the host; anything else on its device, for the trace that wants it to copy (`to_number`) only what it
    reads: PredictionGrid 16 images of a batch rather than thousands of normalised ones. bf16 becomes fp32, which numpy
    can hold."""
    value = value.float() if value.dtype == torch.bfloat16 else value
    return value.cpu() if value.ndim == 0 else value


class DeviceNetwork(TorchNetwork):
    """`fe.Network` for torch models with asynchronous training steps; `autocast_dtype` e.g. torch.bfloat16.

    cuda_graph: replay each train step as a CUDA graph (see the module docstring), after `graph_warmup` ordinary steps
    (where torch.compile compiles and the optimizer creates its state).
    keep_on_device: on a GPU, keep the models and their optimizers' state there between epochs (and the graph with
    them) until `unload()`; False: FastEstimator's behaviour, to the CPU after every epoch."""
    _capture_stream: Optional[torch.cuda.Stream] = None

    def __init__(self, ops: Sequence[Any], autocast_dtype: Optional[torch.dtype] = None, cuda_graph: bool = False,
                 graph_warmup: int = 3, keep_on_device: bool = True) -> None:
        # FastEstimator's TorchNetwork always runs on cuda:0; this one on the current GPU, which is the rank's own
        # under torchrun (`apphub_vit.distributed.setup`) and cuda:0 otherwise
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        if device is None:
            super().__init__(ops=ops)
        else:
            BaseNetwork.__init__(self, target_type="torch", device=device, ops=ops)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs a CUDA GPU; none is visible. Use cuda_graph=False on a CPU.")
        self.autocast_dtype, self.cuda_graph, self.graph_warmup = autocast_dtype, cuda_graph, graph_warmup
        self.keep_on_device = keep_on_device and self.device.type == "cuda"
        self.eager_train_steps = 0  # train steps run without a graph (warm-up, other shapes)
        self.graph_captures = 0
        self.graph_failure: Optional[str] = None  # why capturing failed, if it did (the run then goes on without)
        self._drop_graph()

    def _drop_graph(self) -> None:
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._graph_key: Optional[Tuple] = None
        self._graph_in: Dict[str, torch.Tensor] = {}
        self._graph_out: Dict[str, Any] = {}
        self._graph_lr: List[Tuple[Dict[str, Any], torch.Tensor]] = []

    def __exit__(self, *exc: Any) -> None:
        if not self.keep_on_device:
            self._drop_graph()  # TorchNetwork moves the models to the CPU here: the graph's addresses go stale
            return super().__exit__(*exc)
        # TorchNetwork.__exit__ without its moves to the CPU: the models, their optimizers' state and the graph stay
        for op in reversed(self.ctx_ops):
            if isinstance(op, UpdateOp):
                op.defer = op.__dict__.get('_old_defer', op.defer)
            else:
                break
        BaseNetwork.__exit__(self, *exc)

    def unload(self) -> None:
        """Every model and its optimizer's state to the CPU, where FastEstimator leaves them after an epoch, and the
        graph dropped (its addresses would go stale). The next epoch moves them back (`TorchNetwork.__call__`)."""
        self._drop_graph()
        if self.device.type == "cpu":
            return
        for model in self.models:  # FastEstimator's own collection: every op's models, the scheduled ops' too
            model.to("cpu")
            if getattr(model, "current_optimizer", None) is not None:
                self._move_optimizer_between_device(model.current_optimizer.state, "cpu")

    def prewarm(self, batches: Mapping[str, Dict[str, Any]], epoch: int = 1) -> None:
        """One step of each mode on its batch (`batches`: {mode: a batch as the pipeline gives it}), outside
        FastEstimator's loop, updating nothing: no weight, no optimizer state, no step counted. What the steps call
        under torch.compile is traced and compiled (or loaded from the cache) now, the train step's backward pass too:
        its `DistributedUpdateOp` computes the gradients and drops them. FastEstimator's own warm-up in `fit()` runs
        forward passes only, and left the backward's compilation to the first training step. The apps run this on
        a thread beside the teacher's training (`apphub_vit.teacher.BesideTeacher`)."""
        for mode, batch in batches.items():
            with self(mode=mode, epoch=epoch, ds_id="", warmup=True):
                self.ctx_state["prewarm"] = True
                self.run_step(batch)

    def _get_effective_batch_input(self, batch: MutableMapping[str, Any]) -> Dict[str, Any]:
        if self.device.type == "cpu":
            return super()._get_effective_batch_input(batch)
        return {key: _to_device(batch[key], self.device) for key in self.ctx_gpu_inputs if key in batch}

    def _autocast(self) -> Any:
        return (torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None else NonContext())

    def _run_step(self, batch: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        if self.device.type == "cpu" and self.autocast_dtype is None:
            return super()._run_step(batch)
        batch_in = self._get_effective_batch_input(batch)
        self.ctx_state["tape"] = NonContext()
        train = self.ctx_state["mode"] == "train" and not self.ctx_state["warmup"]
        captured = None
        if self.cuda_graph and train:  # the batch's shapes pick the graph (only then: eval steps need no key)
            key = tuple((k, v.shape, v.dtype) if isinstance(v, torch.Tensor) else (k, v) for k, v in batch_in.items())
            if key == self._graph_key:
                captured = self._replay(batch_in)
            elif self._graph is None and self.eager_train_steps >= self.graph_warmup and self.ctx_state["req_grad"]:
                captured = self._capture(batch_in, key)
        if captured is not None:
            batch_in = captured
        else:
            self.eager_train_steps += train
            with torch.no_grad() if not self.ctx_state["req_grad"] else NonContext():
                with self._autocast():
                    self._forward_batch(batch_in, self.ctx_state, self.ctx_ops)
        # training outputs stay where they are (a trace turns them into numbers every `log_steps`), on a GPU
        stay = self.device.type != "cpu" and self.ctx_state["mode"] == "train"
        prediction = {}
        for key in self.ctx_outputs:
            if key in batch_in:
                value = batch_in[key]
                if isinstance(value, torch.Tensor):
                    value = value.detach() if stay else _eval_output(value.detach())
                prediction[key] = value
        return batch, prediction

    def _capture(self, batch_in: Dict[str, Any], key: Tuple) -> Optional[Dict[str, Any]]:
        """Capture one train step (every op, backward, optimizer step) into a CUDA graph and run it. If the capture
        fails, say why and return None: this run goes on without a graph (slower, same results)."""
        static_in = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch_in.items()}
        lrs = []  # the captured optimizer reads its learning rate from a device tensor, refreshed before each replay
        for model in self.ctx_models:
            optimizer = model.current_optimizer
            if optimizer is None:
                continue
            if not all(_capturable(optimizer, group) for group in optimizer.param_groups):
                raise ValueError(f"cuda_graph=True needs an optimizer a graph can replay (model {model.model_name!r} "
                                 f"has {type(optimizer).__name__} without it): build Adam / AdamW with "
                                 f"capturable=True or SGD with fused=True, or use cuda_graph=False")
            for group in optimizer.param_groups:
                lrs.append((group, torch.tensor(float(group["lr"]), device=self.device)))
        data = dict(static_in)
        graph = torch.cuda.CUDAGraph()
        stream = self._side_stream()
        gc.collect()  # as torch.cuda.graph: free what reference cycles still hold of the last epoch's graph
        # The last epoch's graph memory is a private pool that only that graph could use: once the graph is gone, the
        # allocator still keeps its blocks cached until empty_cache. Without this, every epoch's capture held a new
        # pool (about 1.6 GB at batch 512): four runs sharing an H100 filled its 80 GB within 27 epochs, and their
        # captures then failed for want of memory (test_memory_stays_flat_over_epochs_of_new_captures).
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        for group, lr in lrs:
            group["lr"] = lr
        failure = None
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin()
                try:
                    with self._autocast():
                        self._forward_batch(data, self.ctx_state, self.ctx_ops)
                finally:
                    graph.capture_end()
        except RuntimeError as err:  # torch.OutOfMemoryError included
            failure = err
        finally:
            for group, lr in lrs:
                group["lr"] = float(lr)  # FastEstimator's LRScheduler and logs see a float, as without a graph
        if failure is not None:
            self._abandon_capture(failure)
            return None
        torch.cuda.current_stream().wait_stream(stream)
        self._graph, self._graph_key, self._graph_in, self._graph_lr = graph, key, static_in, lrs
        # what the traces asked for, where the graph wrote it
        self._graph_out = {k: data[k] for k in self.ctx_outputs if k in data and data[k] is not static_in.get(k)}
        self.graph_captures += 1
        return self._replay(batch_in)  # capturing ran nothing: run this step

    @classmethod
    def _side_stream(cls) -> torch.cuda.Stream:
        """One side stream for every capture, as torch.cuda.graph does. torch keeps a cuBLAS workspace per stream for
        good (pytorch/pytorch#99196): a new stream per epoch left a new workspace inside each epoch's graph memory,
        which then could not be freed (on an H100, four runs sharing the GPU ran out of memory by epoch 18;
        test_memory_stays_flat_over_epochs_of_new_captures). A few matrix products on the new stream make its
        workspaces now, in ordinary memory, instead of during the first capture."""
        if cls._capture_stream is None:
            cls._capture_stream = torch.cuda.Stream()
            with torch.cuda.stream(cls._capture_stream):
                for dtype in (torch.float32, torch.bfloat16):
                    a = torch.ones(16, 16, device="cuda", dtype=dtype)
                    torch.nn.functional.linear(a, a, a[0]).mm(a)  # cuBLAS and cuBLASLt (bias epilogue)
            torch.cuda.current_stream().wait_stream(cls._capture_stream)
        return cls._capture_stream

    def _abandon_capture(self, err: BaseException) -> None:
        """A capture records kernels without running them: drop what it left (gradients holding unrun results, a
        deferred update) and turn the graph off for the rest of this network's life."""
        self.ctx_state["deferred"].clear()
        for model in self.ctx_models:
            if model.current_optimizer is not None:
                model.current_optimizer.zero_grad(set_to_none=True)
        self._drop_graph()
        self.cuda_graph = False
        # capture_begin marks the GPU's random generator as capturing, and only a capture_end that succeeds unmarks
        # it: after a capture that failed, every later random draw (dropout, augmentation) raised "Offset increment
        # outside graph capture encountered unexpectedly". A copy of its state (same seed and offset, not capturing)
        # takes its place, so training goes on drawing the numbers it would have drawn without the graph.
        for generator in torch.cuda.default_generators:
            generator.graphsafe_set_state(generator.clone_state())
        gc.collect()
        torch.cuda.empty_cache()
        self.graph_failure = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
        print(f"DeviceNetwork: capturing the train step as a CUDA graph failed ({self.graph_failure}). Training goes "
              f"on without the graph (same results, slower). Usual causes: an op waits for the GPU (`.item()`, a copy "
              f"to the host, a data-dependent shape) or draws random numbers on the host; pass cuda_graph=False to "
              f"skip the attempt.", flush=True)

    def _replay(self, batch_in: Dict[str, Any]) -> Dict[str, Any]:
        for k, v in batch_in.items():
            if isinstance(v, torch.Tensor):
                self._graph_in[k].copy_(v, non_blocking=True)
        for group, lr in self._graph_lr:
            lr.fill_(group["lr"])  # a float set by the LRScheduler trace since the last step
        self._graph.replay()
        # copies: the graph's outputs are overwritten by the next replay, a trace may keep them longer
        out = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self._graph_out.items()}
        return {**batch_in, **out}
