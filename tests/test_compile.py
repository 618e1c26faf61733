"""What torch.compile compiles in the apps, and how often. Each graph costs start-up: on a fresh machine (an empty
compile cache) tens of seconds of a GPU run's first minute go to compiling. A graph compiled twice, or for any batch
size where one shape is all it sees, is start-up a user pays for nothing. Run on CPU with a recording backend (no
inductor), so the tests see what dynamo hands over, not how fast it compiles."""
import functools
import os
import subprocess
import sys
from dataclasses import replace
from typing import List

import numpy as np
import pytest
import torch

import apphub_vit  # noqa: F401  (FastEstimator compatibility fix)
from apphub_vit.hardware import resolve_hardware
from apphub_vit.recipes import VIT_RECIPES
from apphub_vit import teacher as teacher_module
from apphub_vit import training
from apphub_vit.teacher import train_teacher
from apphub_vit.training import TTAViews, build_vit, classifier_network
from networks.resnet9 import ResNet9, WithFeatureMap
from pipelines.batched import batched_cifar_ops
from pipelines.cifar import CIFAR_MEAN, CIFAR_STD


@pytest.fixture
def graphs(monkeypatch) -> List[bool]:
    """torch.compile with a backend that runs each graph as traced and records it: one entry per graph compiled,
    True where any of its inputs has a symbolic (dynamic) shape."""
    seen: List[bool] = []

    def symbolic(value) -> bool:
        return isinstance(value, torch.SymInt) or (isinstance(value, torch.Tensor) and
                                                   any(isinstance(size, torch.SymInt) for size in value.shape))

    def record(gm: torch.fx.GraphModule, example_inputs):
        inputs = [node for node in gm.graph.nodes if node.op == "placeholder"]
        seen.append(any(symbolic(node.meta.get("example_value")) for node in inputs))
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: real(fn, **{**kwargs, "backend": record}))
    torch._dynamo.reset()
    yield seen
    torch._dynamo.reset()


@pytest.mark.parametrize("policy", ["autoaugment", "trivialaugment"])
def test_the_augmentation_chain_compiles_once(graphs, policy):
    """The fused train-mode chain with the recipe's strong policy: one graph for every step. AutoAugment's tables and
    Normalize's constants, once made inside the compiled function on its first call, changed what it was guarded on,
    and the whole chain compiled again on the second call."""
    fused = batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, strong=True, num_classes=10, fuse=True, compile=True,
                              policy=policy)[0]
    x = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    outputs = [fused.forward(x, {}) for _ in range(3)]
    assert len(graphs) == 1 and graphs == [False]
    assert all(out.shape == (16, 3, 32, 32) and torch.isfinite(out).all() for out in outputs)
    assert not torch.equal(outputs[0], outputs[1])  # fresh draws each step, from the one graph


def _tiny_vit():
    """The recipe's ViT, shrunk, as the apps build it with compile on (fp32, CPU): the model, compiled by its
    network."""
    vit = VIT_RECIPES["vit"]
    recipe = replace(vit, model=replace(vit.model, num_layers=1, em_dim=32, num_heads=2, ff_dim=64))
    hw = replace(resolve_hardware(recipe, precision="fp32", compile=False), compile=True)
    model = build_vit("vit", 10, recipe, hw)
    classifier_network(model, [], 10, recipe, hw)
    return model


def test_the_model_compiles_one_static_graph_per_shape(graphs):
    """The recipe's ViT as the apps build it compiled: a train graph and an eval graph, each for its own batch size.
    Under torch's automatic dynamic shapes the eval graph, the second batch size the model saw, was compiled for any
    batch, which compiles for longer."""
    model = _tiny_vit()
    model.train()
    model(torch.randn(8, 3, 32, 32))[0].sum().backward()  # the train step's shape
    model.eval()
    with torch.no_grad():
        model(torch.randn(20, 3, 32, 32))  # the eval batch's
        model(torch.randn(20, 3, 32, 32))
    assert graphs == [False, False]


@pytest.mark.parametrize("padded", ["as on a CPU", "contiguous"])
def test_the_test_time_views_run_on_the_single_image_evals_graph(graphs, monkeypatch, padded):
    """The last epoch's eval: each view of the eval batch (`TTAViews`, fed to the model one view at a time by
    `ModelOnViews`) runs on the graph compiled for the single-image evals. The eval ops hand the model channels_last
    strides (ChannelTranspose's permute of the NHWC batch). On an H100 the stack of views came back contiguous, failed
    the compiled graph's stride guard ("stride mismatch at index 1, expected 1, actual 1024"), and the eval graph
    compiled a second time, in FastEstimator's warm-up. A CPU's ops keep the layout, so the second case makes the
    shifted views contiguous, as a GPU's reflection padding may."""
    if padded == "contiguous":
        real_pad = training.F.pad
        monkeypatch.setattr(training.F, "pad", lambda *args, **kwargs: real_pad(*args, **kwargs).contiguous())
    model = _tiny_vit().eval()
    eval_ops = batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, fuse=True)[1:]  # ChannelTranspose, Normalize (eval mode)
    assert [type(op).__name__ for op in eval_ops] == ["ChannelTranspose", "Normalize"]
    x = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8)
    for op in eval_ops:
        x = op.forward(x, {})
    views = TTAViews("x", "x", views="flip_translate").forward(x, {})
    with torch.no_grad():
        single = model(x)
        per_view = [model(view) for view in views.chunk(6)]
    assert graphs == [False]
    torch.testing.assert_close(per_view[0], single)  # the first view is the image itself


@pytest.mark.parametrize("feature_map", [False, True])
def test_the_frozen_teacher_compiles_one_graph_as_the_students_step_calls_it(graphs, monkeypatch, feature_map):
    """With compile on, the teacher `train_teacher` returns is compiled as the student's step calls it: one static
    graph, its results the eager forward's. With locality guidance that is the `WithFeatureMap` wrapper, which runs the
    ResNet-9's layers one by one: compiling the ResNet-9 inside it compiled nothing that ran (the wrapper never calls
    it), and the student's step on an H100 took as long as with the eager teacher (docs/performance.md). Its own
    training stays eager."""
    monkeypatch.setattr(teacher_module, "ResNet9", functools.partial(ResNet9, width=16))  # seconds on a CPU
    hw = replace(resolve_hardware(VIT_RECIPES["vit"], precision="fp32", compile=False), compile=True)
    rng = np.random.default_rng(0)
    data = {"x": rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), "y": rng.integers(0, 2, 32)}
    teacher = train_teacher(data, data, 2, 1, hw, CIFAR_MEAN, CIFAR_STD, train_steps_per_epoch=1,
                            feature_map=feature_map)["model"]
    assert graphs == []  # its training: eager
    assert isinstance(teacher, WithFeatureMap) is feature_map
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        outputs = [teacher(x) for _ in range(3)]  # as in the student's steps
        eager = teacher._call_impl(x)  # the forward without torch.compile
    assert graphs == [False]
    for out in outputs:
        torch.testing.assert_close(out, eager)
    assert (isinstance(eager, tuple) and len(eager) == 2) is feature_map  # (logits, map) where guided


def test_the_app_says_so_when_it_compiles(tmp_path):
    """A compiling app's estimator carries the note fit() prints before FastEstimator's warm-up (silent, and a minute
    on a fresh machine); one that does not compile has none."""
    from apphub_vit import pretrain
    from apphub_vit.common import COMPILE_NOTE
    tiny = dict(epochs=1, batch_size=16, train_steps_per_epoch=1, eval_steps_per_epoch=1, num_process=0,
                synthetic_size=[32, 16], dataset="synthetic", num_layers=1, em_dim=16, num_heads=2, ff_dim=32,
                patch_size=8, distill=0)
    assert pretrain.get_estimator(**tiny, compile=True, save_dir=str(tmp_path / "on")).warmup_note == COMPILE_NOTE
    assert pretrain.get_estimator(**tiny, compile=False, save_dir=str(tmp_path / "off")).warmup_note is None


def test_the_app_compiles_after_the_teacher_has_trained(monkeypatch, tmp_path):
    """The apps' first use of torch.compile, which imports the compiler (seconds), comes after the teacher's training:
    those imports run in the background meanwhile (`import_compiler_in_background`). Before, the model was compiled as
    it was built and the augmentation chain as its op was made, both before the data loaded, and the main thread
    waited for the imports there."""
    from apphub_vit import finetune, vit_app
    events: List[str] = []
    real_compile, real_teacher = torch.compile, vit_app.train_teacher
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: events.append("compile") or
                        real_compile(*args, **kwargs))
    monkeypatch.setattr(vit_app, "train_teacher", lambda *args, **kwargs: events.append("teacher") or
                        real_teacher(*args, **kwargs))
    monkeypatch.setattr(teacher_module, "ResNet9", functools.partial(ResNet9, width=16))  # seconds on a CPU
    finetune.get_estimator(from_scratch=True, epochs=1, batch_size=16, train_steps_per_epoch=1, eval_steps_per_epoch=1,
                           teacher_epochs=1, synthetic_size=[32, 16], dataset="synthetic", num_layers=1, em_dim=16,
                           num_heads=2, ff_dim=32, compile=True, save_dir=str(tmp_path))
    assert events[0] == "teacher" and "compile" in events  # the model and the teacher compiled; the chain at its call


def test_the_app_compiles_its_graphs_beside_the_teacher_and_fit_compiles_none(graphs, monkeypatch, tmp_path):
    """With a teacher and `vit_app.BESIDE_TEACHER` on, the student's network is built and warmed up on a thread of its
    own while the teacher trains (`BesideTeacher`, `DeviceNetwork.prewarm`): every graph is compiled there, after the
    teacher's training began, and FastEstimator's warm-up and the training that follow find each of them ready,
    compiling none. Off (the default until a GPU has timed it), the model and the chain are compiled after the
    teacher, in `fit()`'s warm-up and first step."""
    import threading
    from apphub_vit import finetune, vit_app
    events: List[tuple] = []
    patched, real_teacher = torch.compile, vit_app.train_teacher
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: events.append(
        ("compile", threading.current_thread().name)) or patched(*args, **kwargs))
    monkeypatch.setattr(vit_app, "train_teacher", lambda *args, **kwargs: events.append(
        ("teacher", threading.current_thread().name)) or real_teacher(*args, **kwargs))
    monkeypatch.setattr(teacher_module, "ResNet9", functools.partial(ResNet9, width=16))  # seconds on a CPU
    monkeypatch.setattr(vit_app, "BESIDE_TEACHER", True)
    estimator = finetune.get_estimator(from_scratch=True, epochs=1, batch_size=16, train_steps_per_epoch=2,
                                       eval_steps_per_epoch=1, teacher_epochs=1, synthetic_size=[32, 16],
                                       dataset="synthetic", num_layers=1, em_dim=16, num_heads=2, ff_dim=32,
                                       guide=0, compile=True, save_dir=str(tmp_path))
    assert events[0] == ("teacher", "MainThread")
    # the model, the frozen teacher and the augmentation chain, all beside the teacher
    assert events[1:] == [("compile", "apphub_vit-beside-teacher")] * 3
    # the train graphs of the model, the chain and the teacher, and the model's eval graph
    assert len(graphs) >= 4 and not any(graphs)
    compiled = len(graphs)
    estimator.fit()
    assert len(graphs) == compiled  # the warm-up, the training steps and the eval (with its views): nothing new


def test_the_compiler_imports_in_a_thread_of_its_own():
    """`import_compiler_in_background` starts the compiler's imports on a thread and returns; `compiler_imported`
    waits for them. In a fresh interpreter, where nothing imported the compiler yet."""
    code = """
import sys, threading
from apphub_vit import hardware
assert not any(name in sys.modules for name in hardware.COMPILER_MODULES)
hardware.import_compiler_in_background()
thread = hardware._compiler_import
assert isinstance(thread, threading.Thread) and thread is not threading.main_thread()
hardware.compiler_imported()
assert not thread.is_alive() and all(name in sys.modules for name in hardware.COMPILER_MODULES)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
