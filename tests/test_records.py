"""RunRecorder: the run record written by tiny real runs (the ViT pretrain app, and a two-model MSE estimator)."""
import json
import math
import time
from pathlib import Path

import fastestimator as fe
import numpy as np
import pytest
import torch
import torch.nn as nn
from fastestimator.dataset.numpy_dataset import NumpyDataset
from fastestimator.op.tensorop.loss import MeanSquaredError
from fastestimator.op.tensorop.model import ModelOp, UpdateOp

from apphub_vit import pretrain
from apphub_vit.records import RECORD_FILE, RECORD_FORMAT, RunRecorder, attach_recorder, find_recorder

# Tiny on purpose: a run of 2 epochs x 3 steps takes seconds on a 2-core CPU.
TINY_VIT = dict(num_layers=2, em_dim=32, num_heads=2, ff_dim=64, patch_size=8, distill=0)  # no teacher
VIT_RUN = dict(epochs=2, batch_size=16, train_steps_per_epoch=3, eval_steps_per_epoch=2, num_process=0,
               synthetic_size=[128, 64], dataset="synthetic", log_steps=2)


def tiny_vit_run(save_dir: Path, **overrides) -> fe.Estimator:
    """Pretrain the tiny ViT for VIT_RUN's budget; the app writes its own run record."""
    estimator = pretrain.get_estimator(**dict(VIT_RUN, **TINY_VIT, save_dir=str(save_dir), **overrides))
    estimator.fit(warmup=False)
    return estimator


def tiny_mse_estimator(save_dir: Path, epochs: int = 2, **recorder_kwargs) -> fe.Estimator:
    """An autoencoder-like estimator with no accuracy: encoder (first layer frozen) + decoder, MSE loss."""
    x = np.random.RandomState(0).rand(64, 8).astype("float32")
    pipeline = fe.Pipeline(train_data=NumpyDataset({"x": x}), eval_data=NumpyDataset({"x": x[:32]}), batch_size=16,
                           num_process=0)

    def encoder_fn() -> nn.Module:
        model = nn.Sequential(nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 3))
        model[0].requires_grad_(False)  # 8*3 + 3 = 27 frozen of 39
        return model

    encoder = fe.build(encoder_fn, optimizer_fn="adam", model_name="encoder")
    decoder = fe.build(lambda: nn.Linear(3, 8), optimizer_fn="adam", model_name="decoder")  # 32 parameters
    network = fe.Network(ops=[
        ModelOp(model=encoder, inputs="x", outputs="z"),
        ModelOp(model=decoder, inputs="z", outputs="x_hat"),
        MeanSquaredError(inputs=("x_hat", "x"), outputs="mse"),
        UpdateOp(model=encoder, loss_name="mse"),
        UpdateOp(model=decoder, loss_name="mse")
    ])
    recorder = RunRecorder(app="tiny_autoencoder", save_dir=str(save_dir), dataset="random", hparams={"lr": 1e-3},
                           **recorder_kwargs)
    return fe.Estimator(pipeline=pipeline, network=network, epochs=epochs, traces=[recorder], log_steps=2)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("vit_run")
    estimator = tiny_vit_run(save_dir)
    return estimator, json.loads((save_dir / RECORD_FILE).read_text())


def test_vit_record_fields(vit_run):
    estimator, record = vit_run
    assert record["format"] == RECORD_FORMAT
    assert record["app"] == "vit_pretrain" and record["dataset"] == "synthetic CIFAR-100"
    # the resolved recipe once, with the overrides applied: no second copy of any field elsewhere in hparams
    assert record["hparams"]["recipe"]["batch_size"] == 16 and record["hparams"]["overrides"]["batch_size"] == 16
    assert record["hparams"]["recipe"]["name"] == "vit" and record["hparams"]["recipe"]["model"]["em_dim"] == 32
    recipe_fields = set(record["hparams"]["recipe"]) | set(record["hparams"]["recipe"]["model"])
    assert not recipe_fields & (set(record["hparams"]) - {"recipe", "overrides"})
    params = list(estimator.model.parameters())
    assert record["parameters"]["total"] == sum(p.numel() for p in params)
    assert record["parameters"]["trainable"] == sum(p.numel() for p in params if p.requires_grad)
    schedule = record["schedule"]
    assert (schedule["epochs"], schedule["train_epochs_run"], schedule["batch_size"]) == (2, 2, 16)
    assert schedule["global_steps"] == 6 and not schedule["stopped_early"]
    # One eval entry per epoch, at the global step where it ran, with every eval key the app logged.
    assert [(e["epoch"], e["step"]) for e in record["eval"]] == [(1, 3), (2, 6)]
    assert all({"accuracy", "ce"} <= set(e["metrics"]) for e in record["eval"])
    assert [e["images"] for e in record["eval"]] == [32, 32]  # 2 eval steps of the CPU's eval batch, 16
    assert record["eval"][0]["elapsed"] < record["eval"][1]["elapsed"] < record["timing"]["total_seconds"]
    # each eval epoch's own time, and together the run's eval time
    assert all(e["seconds"] > 0 for e in record["eval"])
    assert sum(e["seconds"] for e in record["eval"]) == pytest.approx(record["timing"]["eval_seconds"], abs=1e-3)
    assert record["eval"][1]["time"] - record["eval"][0]["time"] == pytest.approx(
        record["eval"][1]["elapsed"] - record["eval"][0]["elapsed"], abs=0.05)
    assert record["metrics"] == {"accuracy_key": "accuracy", "loss_key": "ce"}
    accuracies = [e["metrics"]["accuracy"] for e in record["eval"]]
    assert record["best_accuracy"] == max(accuracies) and record["final_accuracy"] == accuracies[-1]
    assert record["final_loss"] == record["eval"][-1]["metrics"]["ce"]
    assert [e["step"] for e in record["train_log"]] == [1, 2, 4, 6]  # FastEstimator logs step 1 and every log_steps
    assert all("ce" in e["metrics"] for e in record["train_log"])


def test_vit_record_timing_device_versions(vit_run):
    _, record = vit_run
    timing = record["timing"]
    assert timing["train_images"] == 2 * 3 * 16
    assert 0 < timing["train_seconds"] < timing["total_seconds"]
    assert 0 < timing["eval_seconds"] < timing["total_seconds"]
    # Eval time is not train time: the two parts are disjoint slices of the whole run.
    assert timing["train_seconds"] + timing["eval_seconds"] <= timing["total_seconds"] + 1e-3
    assert math.isclose(timing["train_images_per_second"], timing["train_images"] / timing["train_seconds"],
                        rel_tol=0.01)
    assert record["device"]["type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert record["device"]["name"]
    assert set(record["versions"]) == {"python", "torch", "torchvision", "fastestimator", "numpy"}
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["fastestimator"] == "1.7.0"


def test_the_record_times_fastestimators_warm_up_apart(tmp_path, capsys):
    """The apps' AppEstimator tells its recorder when fit() was called: from then to the first epoch is FastEstimator's
    warm-up (a step in each mode, where torch.compile traces and compiles), part of a run's start-up. Its note (set by
    the apps when they compile) comes before the warm-up, which prints nothing."""
    estimator = pretrain.get_estimator(**dict(VIT_RUN, **TINY_VIT, save_dir=str(tmp_path)))
    estimator.warmup_note = "compiling now"
    called = time.time()
    estimator.fit()  # with the warm-up, as FastEstimator's command line runs it
    timing = json.loads((tmp_path / RECORD_FILE).read_text())["timing"]
    assert 0 < timing["warmup_seconds"] <= timing["fit_started"] - called + 0.01
    out = capsys.readouterr().out
    assert out.count("compiling now") == 1 and out.index("compiling now") < out.index("FastEstimator-Start")


def test_no_accuracy_two_models_and_frozen_parameters(tmp_path):
    tiny_mse_estimator(tmp_path).fit(warmup=False)
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record["timing"]["warmup_seconds"] is None  # a plain fe.Estimator does not say when fit() was called
    assert record["metrics"] == {"accuracy_key": None, "loss_key": "mse"}
    assert record["best_accuracy"] is None and record["final_accuracy"] is None
    assert record["best_accuracy_step"] is None
    losses = [e["metrics"]["mse"] for e in record["eval"]]
    assert len(losses) == 2 and record["final_loss"] == losses[-1] and record["best_loss"] == min(losses)
    # models=None counts every model of the network: encoder 39 (27 frozen) + decoder 32.
    assert record["parameters"] == {"total": 71, "trainable": 44, "per_model": {
        "encoder": {"total": 39, "trainable": 12}, "decoder": {"total": 32, "trainable": 32}}}


def test_models_argument_and_shared_parameters_count_once(tmp_path):
    shared = nn.Linear(4, 4)  # 20 parameters, in both models
    model_a, model_b = nn.Sequential(shared, nn.Linear(4, 2)), nn.Sequential(shared)
    estimator = tiny_mse_estimator(tmp_path, epochs=1, models=[model_a, model_b])
    estimator.fit(warmup=False)
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record["parameters"]["total"] == 20 + 10


def test_refuses_to_overwrite_a_record(tmp_path):
    (tmp_path / RECORD_FILE).write_text('{"from": "an earlier run"}')
    with pytest.raises(FileExistsError, match=RECORD_FILE):
        RunRecorder(app="x", save_dir=str(tmp_path), dataset="d")
    RunRecorder(app="x", save_dir=str(tmp_path), dataset="d", overwrite=True)  # asked for: fine
    assert json.loads((tmp_path / RECORD_FILE).read_text()) == {"from": "an earlier run"}


def test_record_appearing_before_fit_stops_it_before_training(tmp_path):
    estimator = tiny_mse_estimator(tmp_path)
    (tmp_path / RECORD_FILE).write_text("{}")  # another run finished into the same folder meanwhile
    with pytest.raises(FileExistsError, match=RECORD_FILE):
        estimator.fit(warmup=False)
    assert estimator.system.global_step is None  # on_begin refused: not one step trained
    assert (tmp_path / RECORD_FILE).read_text() == "{}"


def test_second_fit_of_the_same_estimator_replaces_its_own_record(tmp_path):
    estimator = tiny_mse_estimator(tmp_path, epochs=1)
    estimator.fit(warmup=False)
    estimator.fit(warmup=False)
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record["schedule"]["global_steps"] == 4
    assert not list(tmp_path.glob("*.partial"))


def test_attach_recorder_adds_once_and_keeps_notes(tmp_path):
    estimator = tiny_mse_estimator(tmp_path)
    own = find_recorder(estimator)
    assert attach_recorder(estimator, "other", str(tmp_path / "x"), "d", hparams={"lr": 5, "seed": 0},
                           notes=["no ImageNet weights"]) is own
    assert own.notes == ["no ImageNet weights"] and sum(isinstance(t, RunRecorder) for t in estimator.traces) == 1
    assert own.hparams == {"lr": 1e-3, "seed": 0}  # the app's own values win; missing ones are added


def test_record_device_is_where_training_ran_not_where_fit_leaves_the_models(tmp_path):
    """FastEstimator moves models back to the CPU at the end of fit(): the record must keep the training device.
    ("meta" stands in for a GPU on a CPU-only machine.)"""
    from types import SimpleNamespace

    from fastestimator.util.data import Data

    from apphub_vit.records import RunRecorder
    model = torch.nn.Linear(2, 2, device="meta")
    recorder = RunRecorder("probe", str(tmp_path), "none", models=[model])
    recorder.system = SimpleNamespace(mode="train", global_step=1, epoch_idx=1, num_devices=1, total_epochs=1,
                                      log_steps=1, train_steps_per_epoch=1, eval_steps_per_epoch=1,
                                      network=SimpleNamespace(get_loss_keys=lambda: {"ce"}))
    recorder.on_begin(Data())
    recorder.on_batch_end(Data({"x": torch.zeros(4, 2)}))
    model.to_empty(device="cpu")  # where fit() leaves it
    assert recorder.build_record()["device"]["type"] == "meta"
