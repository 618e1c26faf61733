"""Distillation from a CNN teacher (apphub_vit/teacher.py, networks/resnet9.py): the teacher network against the
reference script's, the distillation targets, the student's loss, and the app's teacher file."""
import functools
import importlib.util
import json
import time
from dataclasses import replace

import fastestimator as fe
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apphub_vit import finetune as finetune_app
from apphub_vit import teacher as teacher_module
from apphub_vit.hardware import resolve_hardware
from apphub_vit.recipes import VIT_RECIPES
from apphub_vit.records import RECORD_FILE
from apphub_vit.teacher import (TEACHER_FILE, BesideTeacher, DistillTargets, LocalityGuidance, TeacherLabels,
                                frozen_teacher, teacher_lr, train_teacher)
from apphub_vit.training import build_vit, classifier_network
from apphub_vit.vit_app import vit_book
from networks.resnet9 import MAP_CHANNELS, MAP_LAYERS, ResNet9, WithFeatureMap
from pipelines.cifar import CIFAR_MEAN, CIFAR_STD
from tests.conftest import REPO, TINY_RUN, TINY_SHAPE, TINY_VIT


def _reference_module():
    spec = importlib.util.spec_from_file_location("resnet9_reference", REPO / "benchmarks" / "resnet9_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resnet9_is_the_reference_scripts_network():
    ours, reference = ResNet9(num_classes=10, width=8), _reference_module().resnet9(width=8)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    torch.manual_seed(0)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 32, 32)
    ours.eval(), reference.eval()
    out = ours(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(x))


def test_resnet9_trains_every_parameter():
    model = ResNet9(num_classes=3, width=4)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_distill_targets_mix_the_teachers_smoothed_hard_label_in_and_teacher_labels_give_it_alone():
    targets = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    teacher = torch.tensor([[5.0, 0.0, 1.0], [0.0, 0.0, 3.0]])  # argmax 0, 2
    out = DistillTargets(("t", "z"), "d", weight=0.25, smoothing=0.3).forward([targets, teacher], {})
    smooth = lambda k: torch.full((3, ), 0.1) + 0.7 * F.one_hot(torch.tensor(k), 3)  # noqa: E731
    torch.testing.assert_close(out, torch.stack([0.75 * targets[0] + 0.25 * smooth(0),
                                                 0.75 * targets[1] + 0.25 * smooth(2)]))
    torch.testing.assert_close(out.sum(dim=1), torch.ones(2))
    # the distillation head's target: the teacher's label alone, smoothed the same way, in float32 under autocast too
    labels = TeacherLabels("z", "d", smoothing=0.3).forward(teacher.bfloat16(), {})
    assert labels.dtype == torch.float32
    torch.testing.assert_close(labels, torch.stack([smooth(0), smooth(2)]))


def test_teacher_schedule_is_pages_triangle():
    lr = teacher_lr(steps_per_epoch=10, epochs=24)
    assert lr(0) == 0.0 and lr(50) == pytest.approx(0.4) and lr(240) == 0.0
    assert lr(25) == pytest.approx(0.2) and lr(145) == pytest.approx(0.2)


class ConstantTeacher(torch.nn.Module):
    """Logits that always name class `k`, whatever the image."""
    def __init__(self, k: int, num_classes: int) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(10 * F.one_hot(torch.tensor(k), num_classes).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


@pytest.mark.parametrize("distill", [0.0, 0.5, 1.0])
def test_the_students_loss_takes_the_teachers_labels_by_the_distill_weight(distill):
    base = VIT_RECIPES["vit"]
    # one head, with the teacher's label mixed into its target
    model = replace(base.model, **TINY_SHAPE, spt=False, lsa=False, drloc=0.0, distill_head=False, guide=0.0)
    recipe = replace(base, model=model, distill=distill, label_smoothing=0.0, lr=0.0)
    hw = resolve_hardware(recipe)
    student = build_vit("student", 10, recipe, hw)
    teacher = fe.build(model_fn=lambda: ConstantTeacher(7, 10).requires_grad_(False), optimizer_fn=None,
                       model_name="teacher")
    before = teacher.logits.detach().clone()
    network = classifier_network(student, [], 10, recipe, hw, teacher=teacher if distill else None)  # "ce": CE alone
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 3  # true labels 0..2, the teacher says 7
    batch = network.transform({"x": x, "y": y}, mode="train")
    logits = batch["y_pred"].float()
    target = (1 - distill) * F.one_hot(y, 10).float() + distill * F.one_hot(torch.full((8, ), 7), 10).float()
    expected = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    assert float(batch["ce"]) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(teacher.logits, before)  # the teacher is never updated


@pytest.mark.parametrize("distill", [0.5, 0.8])
def test_with_a_distillation_head_each_head_learns_its_own_labels_weighted_by_distill(distill):
    """DeiT's objective: (1 - distill) * CE(class head, true label) + distill * CE(distillation head, teacher's)."""
    base = VIT_RECIPES["vit"]
    # (the recipe's locality guidance off: its loss is checked in the guidance test below)
    recipe = replace(base, model=replace(base.model, **TINY_SHAPE, lsa=False, distill_head=True, guide=0.0),
                     distill=distill, label_smoothing=0.1, lr=0.0)
    hw = resolve_hardware(recipe)
    student = build_vit("student", 10, recipe, hw)
    teacher = fe.build(model_fn=lambda: ConstantTeacher(7, 10).requires_grad_(False), optimizer_fn=None,
                       model_name="teacher")
    network = classifier_network(student, [], 10, recipe, hw, teacher=teacher)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 3  # true labels 0..2, the teacher says 7
    batch = network.transform({"x": x, "y": y}, mode="train")

    def ce(logits, labels):  # against labels smoothed by 0.1, as the recipe smooths both
        target = F.one_hot(labels, 10).float() * 0.9 + 0.01
        return -(target * logits.float().log_softmax(dim=1)).sum(dim=1).mean()

    heads = ce(batch["y_pred"], y) * (1 - distill) + ce(batch["y_pred_distill"], torch.full((8, ), 7)) * distill
    assert float(batch["ce"]) == pytest.approx(float(heads + batch["drloc"]), rel=1e-5)
    assert not torch.equal(batch["y_pred"], batch["y_pred_distill"])  # two heads
    evaluated = network.transform({"x": x, "y": y}, mode="eval")  # eval: one prediction, the mean of the two heads
    student.eval()
    with torch.no_grad():
        tokens = student.vit_encoder.forward_tokens(x)
        mean = (student.linear_classifier(student.vit_encoder.pool(tokens))
                + student.distill_classifier(student.vit_encoder.layernorm(tokens[:, 0]))) / 2
    torch.testing.assert_close(evaluated["y_pred"].float(), mean, rtol=1e-4, atol=1e-5)


def test_the_recipes_distillation_head_goes_when_the_teacher_or_mean_pooling_does_unless_asked_for():
    book = vit_book("finetune")
    assert book.resolve("vit", {})[0].model.distill_head  # the default recipe has it
    for overrides in ({"distill": 0}, {"pool": "cls"}, {"distill": 0, "pool": "cls"}):
        recipe, applied = book.resolve("vit", overrides)
        assert not recipe.model.distill_head and applied == overrides  # the record shows what the user gave
    kept = book.resolve("vit", {"distill": 0.8, "lr": 1e-3})[0]
    assert kept.model.distill_head and kept.distill == 0.8
    for overrides, match in (({"distill": 0, "distill_head": True}, "CNN teacher's labels"),
                             ({"pool": "cls", "distill_head": True}, "pool='mean'")):
        with pytest.raises(ValueError, match=match):
            book.resolve("vit", overrides)


def test_a_distillation_head_needs_a_teacher_and_mean_pooling_and_trains_through_the_app(tmp_path):
    with pytest.raises(ValueError, match="distill_head=True trains its head on a CNN teacher's labels"):
        finetune_app.get_estimator(from_scratch=True, dataset="synthetic", save_dir=str(tmp_path / "a"),
                                   **{**TINY_RUN, **TINY_VIT, "distill_head": True, "distill": 0.0})
    with pytest.raises(ValueError, match="pool='mean'"):
        finetune_app.get_estimator(from_scratch=True, dataset="synthetic", save_dir=str(tmp_path / "b"),
                                   **{**TINY_RUN, **TINY_VIT, "distill_head": True, "distill": 0.5, "pool": "cls"})
    model = finetune_app.finetune(None, from_scratch=True, dataset="synthetic", save_dir=str(tmp_path / "c"),
                                  teacher_epochs=1, **{**TINY_RUN, **TINY_VIT, "distill_head": True, "distill": 0.5})
    record = json.loads((tmp_path / "c" / RECORD_FILE).read_text())
    assert record["hparams"]["recipe"]["model"]["distill_head"] and record["hparams"]["teacher"]["epochs"] == 1
    assert model.config.distill_head and model.distill_classifier is not None
    assert np.isfinite(record["final_loss"]) and 0.0 <= record["final_accuracy"] <= 1.0


def test_the_teachers_feature_map_is_its_third_stage_at_a_quarter_of_the_resolution():
    net = ResNet9(num_classes=10, width=8).eval()
    logits, feature_map = WithFeatureMap(net)(torch.randn(3, 3, 32, 32))
    assert feature_map.shape == (3, 32, 8, 8)  # 4 x width channels on the 8x8 grid of a patch-4 ViT's tokens
    x = torch.randn(3, 3, 32, 32)
    logits, feature_map = WithFeatureMap(net)(x)
    torch.testing.assert_close(logits, net(x))
    torch.testing.assert_close(feature_map, torch.nn.Sequential(*list(net)[:MAP_LAYERS])(x))
    assert isinstance(net[MAP_LAYERS - 1], torch.nn.MaxPool2d) and MAP_CHANNELS == 4 * 64


def test_locality_guidance_is_the_mse_to_the_layer_normalised_map_at_the_tokens_grid():
    torch.manual_seed(0)
    feature_map = torch.rand(2, 4, 8, 8) * 5  # non-negative, as after a ReLU and a max-pool
    op = LocalityGuidance(("t", "m"), "g", weight=2.0)

    def expected(tokens, grid):
        target = grid.flatten(2).transpose(1, 2)  # [B, N, C], row-major
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True) + 1e-5)**0.5
        return 2.0 * ((tokens - target)**2).mean()

    tokens = torch.randn(2, 64, 4)  # the same 8x8 grid
    torch.testing.assert_close(op.forward([tokens, feature_map], {}), expected(tokens, feature_map))
    # a coarser grid of tokens (a patch-8 ViT's 4x4): the map averaged over 2x2 blocks
    tokens = torch.randn(2, 16, 4)
    pooled = feature_map.view(2, 4, 4, 2, 4, 2).mean((3, 5))
    torch.testing.assert_close(op.forward([tokens, feature_map], {}), expected(tokens, pooled))
    assert op.forward([tokens, feature_map.bfloat16()], {}).dtype == torch.float32
    tokens = torch.randn(2, 256, 4)  # a finer one (16x16): bilinear
    up = F.interpolate(feature_map, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(op.forward([tokens, feature_map], {}), expected(tokens, up))
    with pytest.raises(ValueError, match="map's 4 channels"):
        op.forward([torch.randn(2, 64, 5), feature_map], {})


class MapTeacher(torch.nn.Module):
    """(logits naming class `k`, a fixed feature map) whatever the image: a `WithFeatureMap` stand-in."""
    def __init__(self, k: int, num_classes: int, feature_map: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(10 * F.one_hot(torch.tensor(k), num_classes).float())
        self.feature_map = torch.nn.Parameter(feature_map)

    def forward(self, x: torch.Tensor):
        return self.logits.expand(len(x), -1), self.feature_map.expand(len(x), -1, -1, -1)


def test_with_locality_guidance_the_middle_blocks_tokens_learn_the_teachers_map_by_the_guide_weight():
    base = VIT_RECIPES["vit"]
    shape = {**TINY_SHAPE, "num_layers": 4, "patch_size": 4}  # 8x8 tokens, the map's grid; guided after 2 blocks
    recipe = replace(base, model=replace(base.model, **shape, lsa=False, guide=0.7), label_smoothing=0.1, lr=0.0)
    hw = resolve_hardware(recipe)
    student = build_vit("student", 10, recipe, hw)
    torch.manual_seed(1)
    feature_map = torch.rand(1, MAP_CHANNELS, 8, 8)
    teacher = fe.build(model_fn=lambda: MapTeacher(7, 10, feature_map).requires_grad_(False), optimizer_fn=None,
                       model_name="teacher")
    network = classifier_network(student, [], 10, recipe, hw, teacher=teacher)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    batch = network.transform({"x": x, "y": y}, mode="train")
    assert batch["y_guide"].shape == (8, 64, MAP_CHANNELS)
    guide = LocalityGuidance(("t", "m"), "g", weight=0.7).forward([batch["y_guide"], batch["teacher_map"]], {})
    assert float(batch["guide"]) == pytest.approx(float(guide)) and float(guide) > 0

    def ce(logits, labels):
        target = F.one_hot(labels, 10).float() * 0.9 + 0.01
        return -(target * logits.float().log_softmax(dim=1)).sum(dim=1).mean()

    heads = ce(batch["y_pred"], y) * 0.5 + ce(batch["y_pred_distill"], torch.full((8, ), 7)) * 0.5
    assert float(batch["ce"]) == pytest.approx(float(heads + batch["drloc"] + guide), rel=1e-5)
    # the guided tokens are the second block's: their loss reaches the blocks up to it and the guide's head, no further
    student.zero_grad()
    student.train()
    _, _, _, guided = student(x)
    guided.square().mean().backward()
    grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in student.named_parameters()}
    assert grads["guide_head.1.weight"] and grads["vit_encoder.encoder.layers.1.linear2.weight"]
    assert grads["vit_encoder.embedding.position_embedding"]
    assert not any(v for n, v in grads.items() if n.startswith(("vit_encoder.encoder.layers.2.",
                                                                 "vit_encoder.encoder.layers.3.", "linear_classifier")))
    student.eval()
    assert student(x).shape == (8, 10)  # eval: the logits alone


def test_locality_guidance_needs_the_teacher_and_goes_with_it_and_trains_through_the_app(tmp_path):
    book = vit_book("finetune")
    with pytest.raises(ValueError, match="guide=0.5 has the ViT imitate a CNN teacher's feature map"):
        book.resolve("vit", {"guide": 0.5, "distill": 0})
    assert book.resolve("vit", {})[0].model.guide == 1.0  # the default recipe's
    recipe, applied = book.resolve("vit", {"distill": 0})
    assert recipe.model.guide == 0.0 and applied == {"distill": 0}  # a recipe's guidance goes with its teacher
    assert book.resolve("vit", {"pool": "cls"})[0].model.guide == 1.0  # (the head goes with mean pooling, not it)
    model = finetune_app.finetune(None, from_scratch=True, dataset="synthetic", save_dir=str(tmp_path / "c"),
                                  teacher_epochs=1, **{**TINY_RUN, **TINY_VIT, "guide": 1.0, "distill": 0.5})
    record = json.loads((tmp_path / "c" / RECORD_FILE).read_text())
    assert record["hparams"]["recipe"]["model"]["guide"] == 1.0 and record["hparams"]["teacher"]["epochs"] == 1
    assert model.guide_head is not None and model.config.guide_layer == 1
    assert np.isfinite(record["final_loss"]) and 0.0 <= record["final_accuracy"] <= 1.0


def _arrays(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = np.where(y[:, None, None, None] == 1, 200, 30).astype(np.uint8).repeat(32, 1).repeat(32, 2).repeat(3, 3)
    x = np.clip(x + rng.integers(-20, 20, x.shape), 0, 255).astype(np.uint8)  # two classes: bright and dark images
    return {"x": x, "y": y.astype(np.int64)}


def test_the_teacher_learns_saves_itself_and_a_resumed_run_reuses_it(tmp_path, monkeypatch, capsys):
    # fp32 on a GPU too: in bf16 these 20 steps end at chance with or without the graph, fused SGD or not (H200: 56% of
    # the held-out images each time), while the full-size teacher learns in bf16 (89% on CIFAR-10 in 12 epochs)
    hw = resolve_hardware(VIT_RECIPES["vit"], precision="fp32")
    # a quarter of Page's width: the same training in under half the time on a CPU (seeds 0-3 all at 1.0; with a
    # learning rate of 0, 0.05-0.59); the full width is the reference script's network (the first test above)
    monkeypatch.setattr(teacher_module, "ResNet9", functools.partial(ResNet9, width=16))
    path = str(tmp_path / TEACHER_FILE)
    torch.manual_seed(0)
    trained = train_teacher(_arrays(64, 0), _arrays(64, 1), 2, 20, hw, CIFAR_MEAN, CIFAR_STD, path=path)
    assert not trained["reused"] and trained["accuracy"] > 0.9  # bright vs dark, in 20 steps
    evals = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FastEstimator-Eval")]
    assert len(evals) == 1 and "epoch: 20;" in evals[0]  # evaluated after its last epoch only
    assert trained["cuda_graph"] is (hw.cuda_graph and torch.cuda.is_available())  # on a GPU its fused SGD is captured
    model = trained["model"]
    assert model.current_optimizer is None and not any(p.requires_grad for p in model.parameters())
    saved = torch.load(path, weights_only=True)
    for key, value in model.state_dict().items():  # the frozen teacher it returns holds the weights it trained
        assert torch.equal(value.cpu(), saved[key]), key
    again = train_teacher(_arrays(64, 0), _arrays(64, 1), 2, 20, hw, CIFAR_MEAN, CIFAR_STD, path=path, reuse=True)
    assert again["reused"] and again["accuracy"] == trained["accuracy"]
    for key, value in again["model"].state_dict().items():
        assert torch.equal(value.cpu(), saved[key]), key


def test_the_work_beside_the_teacher_starts_once_its_step_is_captured_and_ends_before_its_weights_go_in(monkeypatch):
    """`train_teacher(beside=...)` starts the work on a thread of its own after the teacher's first train step that
    leaves no capture to come (on a GPU the fourth, which captures the graph: CUDA calls of another thread during a
    capture can invalidate it; on a CPU the first), and waits for it before it fills the `frozen` teacher the work may
    be using, which it returns with the trained weights."""
    import threading
    monkeypatch.setattr(teacher_module, "ResNet9", functools.partial(ResNet9, width=16))
    hw = resolve_hardware(VIT_RECIPES["vit"], precision="fp32")
    frozen = frozen_teacher(2, hw)
    initial = {k: v.clone() for k, v in frozen.state_dict().items()}
    steps, seen = [], {}
    real_run_step = teacher_module.DeviceNetwork.run_step

    def counting(network, batch):
        steps.append("warm-up" if network.ctx_state["warmup"] else network.ctx_state["mode"])
        return real_run_step(network, batch)

    monkeypatch.setattr(teacher_module.DeviceNetwork, "run_step", counting)

    def work():
        seen.update(thread=threading.current_thread().name, at_step=steps.count("train"))
        while "eval" not in steps:  # until the teacher's training is over, and a while after
            time.sleep(0.01)
        time.sleep(0.5)
        seen["untouched"] = all(torch.equal(v, initial[k]) for k, v in frozen.state_dict().items())
        return "done"

    beside = BesideTeacher(work)
    real_start = beside.start

    def start():  # the teacher's train steps done when it is first asked to start
        seen.setdefault("started_at", steps.count("train"))
        real_start()

    monkeypatch.setattr(beside, "start", start)
    trained = train_teacher(_arrays(32, 0), _arrays(32, 1), 2, 3, hw, CIFAR_MEAN, CIFAR_STD, frozen=frozen,
                            beside=beside)
    first = 4 if hw.cuda_graph else 1  # DeviceNetwork's graph_warmup (3) eager steps, then the capture
    assert seen["started_at"] == first and seen["at_step"] >= first and seen["thread"] != "MainThread"
    assert seen["untouched"] and beside.result(fallback=lambda: "fallback") == "done"
    assert trained["model"] is frozen and not all(torch.equal(v, initial[k]) for k, v in frozen.state_dict().items())


def test_the_teachers_epochs_scan_only_their_own_objects_when_fastestimator_collects_the_garbage(monkeypatch):
    """FastEstimator's pipeline runs a full `gc.collect()` after every epoch. Over the whole heap (with the compiler
    imported, about 0.26 s on a 2-core CPU) that was most of the teacher's time in a short test and about a third of a
    second per epoch of a GPU run. The teacher trains as the student does (`AppEstimator`): what exists is frozen out
    of the collections while it trains, and unfrozen when it is done."""
    import gc
    monkeypatch.setattr(teacher_module, "ResNet9", functools.partial(ResNet9, width=16))
    hw = resolve_hardware(VIT_RECIPES["vit"], precision="fp32")
    frozen_during = []
    real_run_step = teacher_module.DeviceNetwork.run_step

    def noting(network, batch):
        frozen_during.append(gc.get_freeze_count())
        return real_run_step(network, batch)

    monkeypatch.setattr(teacher_module.DeviceNetwork, "run_step", noting)
    gc.unfreeze()
    train_teacher(_arrays(32, 0), _arrays(32, 1), 2, 2, hw, CIFAR_MEAN, CIFAR_STD)
    assert len(frozen_during) >= 4 and min(frozen_during) > 10_000  # the modules, the data, the models: frozen
    assert gc.get_freeze_count() == 0


def test_the_work_beside_the_teacher_that_fails_is_done_again_on_the_main_thread(capsys):
    """A failure of the work on its thread is not the run's end: `result` says why and returns what the fallback, the
    same work on the main thread, gives (where the work is wrong, its error then surfaces there)."""
    def fails():
        raise RuntimeError("not on this thread")

    beside = BesideTeacher(fails)
    assert beside.result(fallback=lambda: "again") == "again"
    assert "the work beside the teacher failed (RuntimeError: not on this thread); doing it now" in \
        capsys.readouterr().out


def test_the_app_trains_the_teacher_records_it_reuses_it_on_resume_and_never_overwrites_it(tmp_path, capsys):
    run = {**TINY_RUN, **TINY_VIT, "epochs": 1, "distill": 0.5}  # the recipe's weight (TINY_VIT's 0 replaced)
    finetune_app.finetune(None, from_scratch=True, dataset="synthetic", save_dir=str(tmp_path),
                          teacher_epochs=1, **run)
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record["hparams"]["recipe"]["distill"] == 0.5
    teacher = record["hparams"]["teacher"]
    assert teacher["epochs"] == 1 and not teacher["reused"] and 0.0 <= teacher["accuracy"] <= 1.0
    assert teacher["cuda_graph"] is torch.cuda.is_available()  # recorded: captured on a GPU, never on a CPU
    saved = (tmp_path / TEACHER_FILE).read_bytes()
    with pytest.raises(FileExistsError, match=TEACHER_FILE):
        finetune_app.finetune(None, from_scratch=True, dataset="synthetic", save_dir=str(tmp_path),
                              teacher_epochs=1, **run)
    assert (tmp_path / TEACHER_FILE).read_bytes() == saved
    capsys.readouterr()
    finetune_app.get_estimator(from_scratch=True, dataset="synthetic", save_dir=str(tmp_path),
                               teacher_epochs=1, resume=True, **run)
    assert "evaluating the one saved by this run" in capsys.readouterr().out  # a resumed run does not train another
    assert (tmp_path / TEACHER_FILE).read_bytes() == saved


def test_distillation_options_are_checked(tmp_path):
    for bad, match in (({"distill": 1.5}, "distill"), ({"teacher_epochs": 0}, "teacher_epochs")):
        with pytest.raises(ValueError, match=match):
            finetune_app.get_estimator(from_scratch=True, dataset="synthetic", save_dir=str(tmp_path),
                                       **{**TINY_RUN, **TINY_VIT, **bad})


def test_the_frozen_teacher_is_a_plain_module_where_several_gpus_are_visible(tmp_path):
    """fe.build wraps a model in DataParallel when it sees several GPUs; the teacher, like the ViT, must not be, or the
    student's captured step would scatter every batch over them."""
    from unittest import mock

    import fastestimator.network
    hw = resolve_hardware(VIT_RECIPES["vit"])
    with mock.patch.object(fastestimator.network, "get_num_gpus", lambda: 2):
        teacher = train_teacher(_arrays(32, 0), _arrays(32, 1), 2, 1, hw, CIFAR_MEAN, CIFAR_STD)
    assert not isinstance(teacher["model"], torch.nn.DataParallel)
    assert teacher["model"].model_name == "teacher" and teacher["model"].current_optimizer is None
