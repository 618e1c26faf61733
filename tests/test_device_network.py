"""DeviceNetwork's CUDA-graph train step: the same updates as the uncaptured step, fresh randomness at every replay,
a new capture after each epoch. The graph tests need a CUDA GPU (skipped on a CPU, as in CI); on the GPU host, where
pytest may be missing, `python tests/test_device_network.py` runs them."""
import math
import os
import sys
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import apphub_vit  # noqa: E402,F401  (FastEstimator compatibility fix)
import fastestimator as fe  # noqa: E402
from fastestimator.backend import set_lr  # noqa: E402
from fastestimator.op.tensorop import TensorOp  # noqa: E402
from fastestimator.op.tensorop.loss import CrossEntropy  # noqa: E402
from fastestimator.op.tensorop.model import ModelOp, UpdateOp  # noqa: E402
from fastestimator.schedule import EpochScheduler  # noqa: E402

from apphub_vit.device_network import DeviceNetwork, _capturable  # noqa: E402
from apphub_vit.hardware import cuda_graph_blockers, resolve_hardware  # noqa: E402
from apphub_vit.recipes import VIT_RECIPES  # noqa: E402
from apphub_vit.training import make_optimizer  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none here)")


class _Noise(TensorOp):
    """x + scale * uniform noise drawn on the device: randomness a captured graph must redraw at every replay."""
    def __init__(self, scale: float) -> None:
        super().__init__(inputs="x", outputs="x", mode="train")
        self.scale = scale

    def forward(self, data: torch.Tensor, state):
        return data + self.scale * torch.rand_like(data)


class _HostSync(TensorOp):
    """Reads a value back to the host every step (`.item()`): something a CUDA graph cannot capture."""
    def __init__(self) -> None:
        super().__init__(inputs="x", outputs="x", mode="train")

    def forward(self, data: torch.Tensor, state):
        return data * 1.0 if data.abs().max().item() >= 0 else data


class _Recorder(TensorOp):
    """x unchanged; notes whether each call ran inside a CUDA-graph capture (where a first call that compiles fails)."""
    def __init__(self) -> None:
        super().__init__(inputs="x", outputs="x", mode="train")
        self.capturing = []

    def forward(self, data: torch.Tensor, state):
        self.capturing.append(torch.cuda.is_current_stream_capturing())
        return data * 1.0


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05, fused=True, capturable=True)


def _sgd(params):  # as the teacher's and recipe apphub's on a GPU: momentum, Nesterov, weight decay, fused
    return torch.optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)


def _network(cuda_graph: bool, noise: float = 0.0, seed: int = 0, first_ops=(), keep_on_device: bool = True,
             optimizer_fn=_adamw):
    torch.manual_seed(seed)
    model = fe.build(model_fn=lambda: torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                                          torch.nn.Linear(32, 5)),
                     optimizer_fn=optimizer_fn)
    ops = list(first_ops) + ([_Noise(noise)] if noise else []) + [
        ModelOp(model=model, inputs="x", outputs="y_pred"),
        CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True),
        UpdateOp(model=model, loss_name="ce")
    ]
    return DeviceNetwork(ops=ops, cuda_graph=cuda_graph, graph_warmup=2, keep_on_device=keep_on_device), model


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(8, 16, generator=g), "y": torch.randint(0, 5, (8, ), generator=g)} for _ in range(n)]


def _train(network, model, epochs, steps, lrs, between_epochs=None):
    """`epochs` epochs of `steps` steps, setting a new learning rate before each step (as FastEstimator's LRScheduler)
    and calling `between_epochs(model)` after each epoch but the last; returns the loss of every step."""
    losses, batches, i = [], _batches(epochs * steps), 0
    for epoch in range(epochs):
        with network(mode="train", epoch=epoch + 1, ds_id="", desired_output_keys={"ce"}):
            for _ in range(steps):
                set_lr(model, lrs[i])
                losses.append(float(network.run_step(batches[i])["ce"]))
                i += 1
        if between_epochs is not None and epoch < epochs - 1:
            between_epochs(model)
    return losses


@torch.no_grad()
def _halve_the_weights(model):
    for p in model.parameters():
        p.mul_(0.5)  # in place, as load_state_dict and the EMA's swap write: a kept graph must see it


def test_prewarm_runs_each_modes_step_and_the_backward_pass_but_updates_nothing():
    """`DeviceNetwork.prewarm`: a train step's forward and backward pass (what a compiled model compiles, the backward
    included) and an eval step, with every weight, the optimizer's state and the step count left as they were; then
    the first real step trains as it would have. On a CPU, and on a GPU with the graph on."""
    from apphub_vit.distributed import DistributedUpdateOp
    gpu = torch.cuda.is_available()
    torch.manual_seed(0)
    model = fe.build(model_fn=lambda: torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                                          torch.nn.Linear(32, 5)), optimizer_fn=_adamw if gpu else
                     lambda p: torch.optim.AdamW(p, lr=1e-2))
    network = DeviceNetwork(ops=[ModelOp(model=model, inputs="x", outputs="y_pred"),
                                 CrossEntropy(inputs=("y_pred", "y"), outputs="ce", from_logits=True),
                                 DistributedUpdateOp(model=model, loss_name="ce")], cuda_graph=gpu, graph_warmup=2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    backward = []
    model[0].weight.register_hook(lambda grad: backward.append(grad.shape))
    batch = _batches(1)[0]
    network.prewarm({"train": batch, "eval": batch})
    assert backward == [(32, 16)]  # one backward pass, in the train step only
    assert all(p.grad is None for p in model.parameters())
    assert not model.current_optimizer.state and network.eager_train_steps == 0 and network.graph_captures == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value.cpu(), before[key].cpu()), key
    with network(mode="train", epoch=1, ds_id="", desired_output_keys={"ce"}):
        network.run_step(batch)
    assert backward == [(32, 16)] * 2 and network.eager_train_steps == int(gpu)  # (counted on a GPU only)
    assert not torch.equal(model[0].weight.detach().cpu(), before["0.weight"].cpu())  # the real step updates


@needs_cuda
@pytest.mark.parametrize("keep_on_device, captures", [(True, 1), (False, 3)])
def test_graph_steps_match_uncaptured_steps_across_epochs_and_learning_rates(keep_on_device, captures):
    lrs = [1e-2 * (1 + i % 3) for i in range(24)]
    eager, eager_model = _network(cuda_graph=False, keep_on_device=keep_on_device)
    graph, graph_model = _network(cuda_graph=True, keep_on_device=keep_on_device)
    eager_losses = _train(eager, eager_model, epochs=3, steps=8, lrs=lrs, between_epochs=_halve_the_weights)
    graph_losses = _train(graph, graph_model, epochs=3, steps=8, lrs=lrs, between_epochs=_halve_the_weights)
    # kept on the GPU, the first epoch's graph serves the run; moved off it after every epoch, one capture per epoch
    assert graph.graph_captures == captures
    assert graph.eager_train_steps == 2  # the warm-up steps of the first epoch only
    assert eager_losses[-1] < eager_losses[0]
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    for p_graph, p_eager in zip(graph_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p_graph.detach().cpu(), p_eager.detach().cpu(), rtol=1e-4, atol=1e-5)
    assert float(graph_model.current_optimizer.param_groups[0]["lr"]) == lrs[-1]  # a float again, as FE expects


@needs_cuda
def test_fused_sgd_steps_in_the_graph_match_uncaptured_ones():
    """torch has no capturable SGD; its fused kernel reads the learning rate from a device tensor, so the graph may
    replay it (the teacher's and recipe apphub's optimizer). The same steps, learning rates changing every step."""
    lrs = [1e-2 * (1 + i % 3) for i in range(24)]
    eager, eager_model = _network(cuda_graph=False, optimizer_fn=_sgd)
    graph, graph_model = _network(cuda_graph=True, optimizer_fn=_sgd)
    eager_losses = _train(eager, eager_model, epochs=3, steps=8, lrs=lrs)
    graph_losses = _train(graph, graph_model, epochs=3, steps=8, lrs=lrs)
    assert graph.graph_captures == 1 and graph.graph_failure is None and graph.eager_train_steps == 2
    assert eager_losses[-1] < eager_losses[0]
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    for p_graph, p_eager in zip(graph_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p_graph.detach().cpu(), p_eager.detach().cpu(), rtol=1e-4, atol=1e-5)


def test_only_optimizers_a_graph_can_replay_are_captured():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert _capturable(_adamw(params), _adamw(params).param_groups[0])
    assert _capturable(_sgd(params), _sgd(params).param_groups[0])
    for unfit in (torch.optim.AdamW(params, lr=1e-2), torch.optim.SGD(params, lr=1e-2, momentum=0.9)):
        assert not _capturable(unfit, unfit.param_groups[0])  # a host-side step count; SGD's foreach path
    with mock.patch.object(torch.cuda, "is_available", lambda: True):  # the apps' optimizers as built on a GPU
        for recipe in VIT_RECIPES.values():
            optimizer = make_optimizer(recipe, True, set())(params)
            assert all(_capturable(optimizer, group) for group in optimizer.param_groups), recipe.name


def _optimizer_state(model):
    return [v for s in model.current_optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


@needs_cuda
def test_models_stay_on_the_gpu_between_epochs_until_unloaded():
    network, model = _network(cuda_graph=True)
    _train(network, model, epochs=2, steps=4, lrs=[1e-2] * 8)
    assert all(p.is_cuda for p in model.parameters()) and all(v.is_cuda for v in _optimizer_state(model))
    assert network._graph is not None and network.graph_captures == 1
    network.unload()
    assert not any(p.is_cuda for p in model.parameters()) and not any(v.is_cuda for v in _optimizer_state(model))
    assert network._graph is None
    losses = _train(network, model, epochs=1, steps=4, lrs=[1e-2] * 4)  # back on the GPU: a new graph, and it trains
    assert all(p.is_cuda for p in model.parameters()) and network.graph_captures == 2
    assert all(math.isfinite(loss) for loss in losses)


def test_unload_moves_the_models_of_scheduled_ops_too():
    """A run whose eval ops change by epoch (recipe vit's TTA views, an EpochScheduler) ends with unload(): it must
    reach the scheduled ops' models (it once asked each op for its models, and a Scheduler has none to give). The
    moves to the CPU are recorded, as this runs on a CPU: the network is told its device is a GPU."""
    network, model = _network(cuda_graph=False)
    scheduled = fe.build(model_fn=lambda: torch.nn.Linear(16, 5), optimizer_fn=None)
    network = DeviceNetwork(ops=network.ops + [EpochScheduler({1: None, 2: ModelOp(model=scheduled, inputs="x",
                                                                                     outputs="y2", mode="eval")})])
    network.device = torch.device("cuda")
    with mock.patch.object(torch.nn.Module, "to", autospec=True) as to:
        network.unload()
    assert mock.call(model, "cpu") in to.call_args_list and mock.call(scheduled, "cpu") in to.call_args_list


@needs_cuda
def test_memory_stays_flat_over_epochs_of_new_captures():
    network, model = _network(cuda_graph=True, keep_on_device=False)
    batches, allocated, reserved = _batches(4), [], []
    for epoch in range(6):
        with network(mode="train", epoch=epoch + 1, ds_id="", desired_output_keys={"ce"}):
            for batch in batches:
                network.run_step(dict(batch))
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
        reserved.append(torch.cuda.memory_reserved())  # what the process holds on the GPU, as nvidia-smi shows it
    assert network.graph_captures == 6
    assert allocated[-1] <= allocated[1], f"GPU memory grows with every epoch's graph: {allocated}"
    assert reserved[-1] <= reserved[1], f"GPU memory held grows with every epoch's graph: {reserved}"


@needs_cuda
def test_random_ops_draw_anew_at_every_replay():
    network, model = _network(cuda_graph=True, noise=3.0)
    batch = _batches(1)[0]
    with network(mode="train", epoch=1, ds_id="", desired_output_keys={"ce"}):
        set_lr(model, 0.0)  # the weights stay put: only the noise can change the loss
        losses = [float(network.run_step(dict(batch))["ce"]) for _ in range(6)]
    assert network.graph_captures == 1
    replayed = losses[2:]  # steps 3..6 are replays
    assert len(set(replayed)) == len(replayed), f"replays repeated their random draws: {replayed}"


@needs_cuda
def test_a_batch_of_another_shape_runs_uncaptured():
    network, model = _network(cuda_graph=True)
    batches = _batches(4) + [{"x": torch.randn(3, 16), "y": torch.randint(0, 5, (3, ))}]
    with network(mode="train", epoch=1, ds_id="", desired_output_keys={"ce"}):
        for batch in batches:
            network.run_step(batch)
    assert network.graph_captures == 1 and network.eager_train_steps == 3  # 2 warm-up + the short batch


@needs_cuda
def test_a_step_that_cannot_be_captured_trains_on_without_the_graph():
    # with noise drawn on the GPU: a failed capture once left torch's random generator stuck "capturing", and the next
    # random draw raised (the MNIST app's dropout, below)
    network, model = _network(cuda_graph=True, noise=0.5, first_ops=[_HostSync()])
    eager, eager_model = _network(cuda_graph=False, noise=0.5, first_ops=[_HostSync()])
    lrs = [1e-2] * 8
    torch.manual_seed(7)
    graph_losses = _train(network, model, epochs=1, steps=8, lrs=lrs)
    torch.manual_seed(7)  # the same draws: the failed capture must not have moved the generator
    eager_losses = _train(eager, eager_model, epochs=1, steps=8, lrs=lrs)
    assert network.graph_failure is not None  # also printed, with what to do
    assert network.graph_captures == 0 and network.cuda_graph is False and network.eager_train_steps == 8
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)


def test_cuda_graph_without_a_gpu_is_refused_clearly():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_hardware(VIT_RECIPES["vit"], cuda_graph=True)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        DeviceNetwork(ops=[], cuda_graph=True)
    assert resolve_hardware(VIT_RECIPES["vit"]).cuda_graph is False


def test_the_apps_capture_only_what_a_graph_can_replay():
    vit = VIT_RECIPES["vit"]
    assert cuda_graph_blockers(vit, precision="bf16") == []  # the GPU default
    assert "MixUp" in " ".join(cuda_graph_blockers(replace(vit, mix_prob=0.5), precision="bf16"))
    assert "fp16" in " ".join(cuda_graph_blockers(vit, precision="fp16"))
    assert cuda_graph_blockers(VIT_RECIPES["apphub"], precision="bf16") == []  # its SGD is the fused one on a GPU


def test_the_graph_is_on_by_default_only_where_nothing_blocks_it():
    vit = VIT_RECIPES["vit"]
    with mock.patch.object(torch.cuda, "is_available", lambda: True):  # as resolved on a GPU
        assert resolve_hardware(vit).cuda_graph is True
        assert resolve_hardware(vit, precision="fp16").cuda_graph is False
        assert resolve_hardware(VIT_RECIPES["apphub"]).cuda_graph is True
        assert resolve_hardware(vit, cuda_graph=False).cuda_graph is False
        with pytest.raises(ValueError, match="cannot capture this configuration: fp16 loss scaling"):
            resolve_hardware(vit, precision="fp16", cuda_graph=True)
    with mock.patch.object(torch.cuda, "is_available", lambda: False):
        assert resolve_hardware(vit).cuda_graph is False


def test_eval_batches_are_large_on_a_gpu_and_the_train_batch_elsewhere():
    from apphub_vit.hardware import GPU_EVAL_BATCH
    vit = VIT_RECIPES["vit"]
    assert GPU_EVAL_BATCH > vit.batch_size and 10000 % GPU_EVAL_BATCH == 5000 % GPU_EVAL_BATCH == 0  # one shape
    with mock.patch.object(torch.cuda, "is_available", lambda: True):
        assert resolve_hardware(vit).eval_batch_size == GPU_EVAL_BATCH
        assert resolve_hardware(vit, device_augment=False).eval_batch_size == vit.batch_size  # per-sample pipeline
    with mock.patch.object(torch.cuda, "is_available", lambda: False):
        assert resolve_hardware(vit).eval_batch_size == vit.batch_size


@needs_cuda
def test_eval_steps_bring_the_losses_to_the_host_and_leave_the_rest_on_the_gpu():
    """Eval outputs: the loss on the host (FastEstimator's EvalEssential stacks it with numpy), the predictions on the
    GPU in fp32 (a trace copies what it reads), with the values of a plain forward pass."""
    from fastestimator.util.util import to_number
    network, model = _network(cuda_graph=True)
    network.autocast_dtype = torch.bfloat16
    batch = _batches(1)[0]
    with network(mode="eval", epoch=1, ds_id="", desired_output_keys={"ce", "y_pred"}):
        out = network.run_step(dict(batch))
    assert out["ce"].device.type == "cpu" and out["ce"].ndim == 0
    assert out["y_pred"].device.type == "cuda" and out["y_pred"].dtype == torch.float32
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(batch["x"].cuda()).float()
    assert torch.equal(out["y_pred"], expected)
    assert float(np.mean(np.array([out["ce"]]))) == float(out["ce"])  # EvalEssential's stacking works on it
    assert to_number(out["y_pred"]).shape == (8, 5)


@needs_cuda
def test_mnist_app_trains_with_the_graph_on_a_gpu():
    import tempfile
    from apphub_vit.mnist import get_estimator as mnist_estimator
    with tempfile.TemporaryDirectory() as save_dir:
        est = mnist_estimator(dataset="synthetic", synthetic_size=[512, 128], epochs=2, batch_size=64, num_process=0,
                              save_dir=save_dir, log_steps=0)
        assert est.network.cuda_graph and est.network.autocast_dtype == torch.bfloat16  # the GPU defaults
        before = [p.detach().cpu().clone() for p in est.model.parameters()]  # wherever fe.build put the model
        summary = est.fit(summary="mnist", warmup=False)
        assert est.network.graph_failure is None and est.network.graph_captures == 1  # one for the whole run
        # fit() hands the model back on the CPU, as FastEstimator's own network leaves it; the best-model file too
        assert all(p.device.type == "cpu" for p in est.model.parameters())
        best = [f for f in os.listdir(save_dir) if f.startswith(f"{est.model.model_name}_best_")]
        weights = torch.load(os.path.join(save_dir, best[0]), weights_only=True)
        assert len(best) == 1 and weights and all(v.device.type == "cpu" for v in weights.values())
        assert all(not torch.equal(b, p.detach().cpu()) for b, p in zip(before, est.model.parameters()))
        ce = list(summary.history["eval"]["ce"].values())
        assert all(torch.isfinite(torch.tensor(float(c))) for c in ce)


@needs_cuda
def test_relative_localization_trains_inside_the_captured_step(tmp_path):
    """The dense relative localization head (`networks.drloc`: randint, gather, its MLP) in the compiled step
    captured as a CUDA graph: captured once, its head trained, and evaluated on the logits alone."""
    from apphub_vit import finetune
    from tests.conftest import TINY_RUN, TINY_VIT
    est = finetune.get_estimator(dataset="synthetic", save_dir=str(tmp_path), from_scratch=True, drloc=0.5,
                                 **{**TINY_RUN, "epochs": 2, "train_steps_per_epoch": 8}, **TINY_VIT)
    assert est.network.cuda_graph and est.model.relative_loc is not None
    before = [p.detach().cpu().clone() for p in est.model.relative_loc.parameters()]
    summary = est.fit(summary="keep", warmup=False)
    assert est.network.graph_failure is None and est.network.graph_captures == 1
    assert all(not torch.equal(b, p.detach().cpu()) for b, p in zip(before, est.model.relative_loc.parameters()))
    ce = [float(c) for c in summary.history["eval"]["ce"].values()]
    assert len(ce) == 2 and all(math.isfinite(c) for c in ce)


@needs_cuda
@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_with_compile_off_the_strong_chain_and_the_model_run_eager_inside_the_captured_step(tmp_path, distill):
    """`compile=False` on a GPU: the AutoAugment chain, the model (and the teacher's forward) run eagerly inside the
    CUDA graph. Eager, Sharpness's `kernel[1, 1] = 5.0` copied a host scalar into a CUDA tensor, the capture failed
    and the run trained without its graph, 4.6x slower (docs/performance.md, twenty-ninth session)."""
    from apphub_vit import finetune
    from tests.conftest import TINY_RUN, TINY_VIT
    est = finetune.get_estimator(dataset="synthetic", save_dir=str(tmp_path), from_scratch=True, compile=False,
                                 augment="autoaugment",
                                 **{**TINY_RUN, "epochs": 2, "train_steps_per_epoch": 8},
                                 **{**TINY_VIT, "distill": distill, "teacher_epochs": 1})
    assert est.network.cuda_graph and not est.network.graph_failure
    est.fit(summary="keep", warmup=False)
    assert est.network.graph_failure is None and est.network.graph_captures == 1


@needs_cuda
def test_the_conv_stem_trains_compiled_with_the_fused_optimizer():
    """The default recipe's conv stem, compiled, one step of its fused AdamW. In the app's full-size runs the compiled
    backward laid the stem's weight gradients out channels_last and the fused AdamW refused them ("must have same
    dtype, device, and layout"), so `build_vit` gives those weights that layout on a GPU. This tiny model did not
    reproduce the refusal without the fix (its step passed on an H200), so the test checks the layout itself and
    that the compiled step trains the stem."""
    from apphub_vit.hardware import compile_model
    from apphub_vit.training import build_vit
    vit = VIT_RECIPES["vit"]
    recipe = replace(vit, model=replace(vit.model, num_layers=1, em_dim=32, num_heads=2, ff_dim=64))
    hw = resolve_hardware(recipe)  # the GPU defaults: bf16, compile
    assert recipe.model.stem == "conv" and hw.compile
    model = build_vit("vit", 10, recipe, hw)
    compile_model(model)  # as the apps' network does (`classifier_network`)
    model.to("cuda")  # in place: the optimizer keeps its parameters
    stem = list(model.vit_encoder.embedding.conv_stem.parameters())
    before = [p.detach().clone() for p in stem]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(torch.randn(16, 3, 32, 32, device="cuda")).float().logsumexp(-1).mean()
    loss.backward()
    model.optimizer.step()
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in stem)
    assert all(torch.isfinite(p).all() and not torch.equal(b, p) for b, p in zip(before, stem))


if __name__ == "__main__":
    for name, test in list(globals().items()):
        if name.startswith("test_") and callable(test):
            try:
                test()
                print(f"PASSED {name}")
            except pytest.skip.Exception as skip:
                print(f"SKIPPED {name}: {skip}")
