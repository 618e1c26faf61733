"""The weights' moving average (apphub_vit/ema.py): its update, the op's place after the optimizer step, the trace's
swap (eval on the average, training on the trained weights, a resume's repeated eval), and the app's use of it."""
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from apphub_vit import finetune as finetune_app
from apphub_vit.ema import EvalWithAverage, WeightAverage
from apphub_vit.hardware import resolve_hardware
from apphub_vit.recipes import VIT_RECIPES
from apphub_vit.records import RECORD_FILE
from apphub_vit.runs import CHECKPOINT_FILE
from apphub_vit.training import build_vit, classifier_network
from tests.conftest import TINY_RUN, TINY_SHAPE, TINY_VIT


def _linear(value: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(value)
    return layer


def test_the_average_starts_at_the_weights_then_moves_by_one_minus_decay():
    layer = _linear(0.0)
    average = WeightAverage(layer, decay=0.75)
    average.update()
    assert all(torch.equal(a, torch.zeros_like(a)) for a in average.average)
    for value in (1.0, 1.0):
        with torch.no_grad():
            for p in layer.parameters():
                p.fill_(value)
        average.update()
    # 0 -> 0.25 * 1 -> 0.75 * 0.25 + 0.25 * 1 = 0.4375
    assert all(torch.allclose(a, torch.full_like(a, 0.4375)) for a in average.average)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="decay"):
            WeightAverage(layer, bad)


def _trace(layer: torch.nn.Module, average_value: float):
    average = WeightAverage(layer, decay=0.5)
    average.average = [torch.full_like(p, average_value) for p in layer.parameters()]
    trace = EvalWithAverage(average)
    trace.system = SimpleNamespace(mode="eval")
    return trace


def _values(layer):
    return {float(v) for p in layer.parameters() for v in p.detach().flatten()}


def test_eval_runs_on_the_average_and_training_goes_on_from_the_trained_weights():
    layer = _linear(1.0)
    trace = _trace(layer, 3.0)
    trace.on_epoch_begin(None)
    assert _values(layer) == {3.0}  # eval: the average
    trace.on_epoch_begin(None)  # a resume repeats the last eval: the trained weights are kept, not replaced
    trace.system.mode = "train"
    trace.on_epoch_begin(None)
    assert _values(layer) == {1.0} and trace.trained is None  # training: the trained weights again


def test_the_trace_state_carries_the_trained_weights_through_a_resume():
    layer = _linear(1.0)
    trace = _trace(layer, 3.0)
    trace.on_epoch_begin(None)  # the checkpoint is written after an eval: the model holds the average
    state = trace.state()
    resumed_layer = _linear(3.0)  # what the checkpoint's model weights restore: the average
    resumed = _trace(resumed_layer, 0.0)
    resumed.load_state(state)
    resumed.on_epoch_begin(None)  # the repeated eval
    resumed.system.mode = "train"
    resumed.on_epoch_begin(None)
    assert _values(resumed_layer) == {1.0}
    assert all(torch.equal(a, torch.full_like(a, 3.0)) for a in resumed.average.average)


def test_the_update_op_runs_after_the_optimizer_step():
    base = VIT_RECIPES["vit"]
    recipe = replace(base, model=replace(base.model, **TINY_SHAPE, spt=False, lsa=False), ema=0.9, lr=0.1,
                     schedule="constant", warmup_epochs=0.0)
    hw = resolve_hardware(recipe)
    model = build_vit("student", 10, recipe, hw)
    before = [p.detach().clone() for p in model.parameters()]
    average = WeightAverage(model, recipe.ema)
    network = classifier_network(model, [], 10, recipe, hw, average=average)
    network.transform({"x": torch.randn(8, 3, 32, 32), "y": torch.arange(8)}, mode="train")
    after = [p.detach() for p in model.parameters()]
    assert any(not torch.equal(b, a) for b, a in zip(before, after))  # the step moved the weights
    assert all(torch.equal(avg, a) for avg, a in zip(average.average, after))  # the average starts from the moved ones


def test_the_app_evaluates_and_returns_the_average(tmp_path):
    model = finetune_app.finetune(None, from_scratch=True, dataset="synthetic", save_dir=str(tmp_path), ema=0.5,
                                  **dict(TINY_RUN, epochs=2), **TINY_VIT)
    checkpoint = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    state = checkpoint["traces"][1]  # after the best-model saver's
    params = [p.detach().cpu() for p in model.parameters()]
    assert all(torch.equal(p, a.cpu()) for p, a in zip(params, state["average"]))  # the returned model: the average
    assert any(not torch.equal(p, t.cpu()) for p, t in zip(params, state["trained"]))  # not the trained weights
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record["hparams"]["recipe"]["ema"] == 0.5 and len(record["eval"]) == 2


def test_ema_is_checked():
    with pytest.raises(ValueError, match="ema must be a number in"):
        finetune_app.get_estimator(from_scratch=True, dataset="synthetic", ema=1.0, **TINY_RUN, **TINY_VIT)
