"""The fault matrix: what a user can get wrong or what can go wrong in a run, through the command line as users run it,
and what the apps do then. Nothing a user already has is lost, and every refusal says what is wrong.

| case | the app |
| --- | --- |
| a boolean that is not True / False (`--overwrite no`) | refuses before reading data, names the option |
| `--batch_size 0`, an unknown option | refuses, names it |
| a loss that is not finite (`--lr 1e3`) | stops, exits non-zero, saves nothing non-finite, the record says so |
| a second run into a folder in use | refuses at start, naming the running process |
| SIGKILL mid-epoch (also with `--ema`) | `--resume True` continues from the last epoch, ends as an uninterrupted run |
| a CIFAR pickle that runs a command | refuses it, runs nothing |
| an empty / random / truncated / folder `--encoder_weights` | says what the file is and how to get a good one |
"""
import os
import pickle
import signal
import time

import numpy as np
import pytest
import torch

from apphub_vit.data import load_cifar
from apphub_vit.encoder_io import ENCODER_FILE
from apphub_vit.records import RECORD_FILE, read_record
from apphub_vit import runs
from apphub_vit.runs import (CHECKPOINT_FILE, LOCK_FILE, Checkpoint, HostCopy, SafeBestModelSaver,
                             _cpu)
from tests.conftest import REPO, cli, start_cli

PRETRAIN = str(REPO / "apphub_vit" / "pretrain.py")
TINY = ["--dataset", "synthetic", "--batch_size", "16", "--eval_steps_per_epoch", "2", "--num_process", "0",
        "--num_layers", "1", "--em_dim", "16", "--num_heads", "2", "--ff_dim", "32", "--patch_size", "8",
        "--distill", "0"]  # no teacher (conftest.TINY_VIT)


def _cli(args, cwd, command="train"):
    """`fastestimator train ARGS` in a process of its own (forked from one that imported TensorFlow, torch and
    FastEstimator once for all of them: conftest.cli)."""
    return cli([command] + list(args), cwd)


def _message(out):
    """The last line of the error: what a user reads."""
    return out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""


def _run(save_dir, *extra, steps=3, epochs=1, size="[96,32]"):
    return [PRETRAIN, "--save_dir", save_dir, "--epochs", epochs, "--train_steps_per_epoch", steps, "--synthetic_size",
            size, *TINY, *extra]


def test_strict_options_refuse_before_anything_is_replaced(tmp_path):
    done = tmp_path / "done"
    assert _cli(_run(done), tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    for option, value, message in (("--overwrite", "no", "overwrite must be True or False, got 'no'"),
                                   ("--compile", "no", "compile must be True or False, got 'no'"),
                                   ("--device_augment", "1", "device_augment must be True or False, got 1"),
                                   ("--norm_first", "no", "norm_first must be True or False, got 'no'"),
                                   ("--batch_size", "0", "batch_size must be a positive whole number, got 0"),
                                   ("--lrr", "0.1", "has no option 'lrr' (did you mean 'lr'?)")):
        out = _cli(_run(done, option, value), tmp_path)
        assert out.returncode != 0 and message in _message(out), (option, _message(out))
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before  # the finished run's files, untouched


def test_a_diverging_run_stops_exits_non_zero_and_saves_nothing_non_finite(tmp_path):
    out = _cli(_run(tmp_path / "run", "--lr", "1e3", steps=20, epochs=2), tmp_path)
    assert out.returncode != 0
    assert "training diverged: the loss 'ce' is not finite by step" in _message(out) and "--lr" in _message(out)
    record = read_record(str(tmp_path / "run" / RECORD_FILE))
    assert record["ended"].startswith("training diverged") and record["schedule"]["stopped_early"]
    for name in os.listdir(tmp_path / "run"):
        if name.endswith(".pt") and name != CHECKPOINT_FILE:
            state = torch.load(tmp_path / "run" / name, weights_only=True)
            state = state["state_dict"] if name == ENCODER_FILE else state
            assert all(torch.isfinite(v).all() for v in state.values() if torch.is_floating_point(v)), name
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def _wait_for(predicate, proc, seconds=300):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.stderr[-3000:]
        assert time.time() - start < seconds, "timed out"
        time.sleep(0.05)


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tmp_path):
    long_run = _run(tmp_path / "run", steps=4, epochs=100000, size="[64,32]")  # runs until killed below
    first = start_cli(["train"] + long_run, tmp_path)
    try:
        _wait_for(lambda: (tmp_path / "run" / LOCK_FILE).exists(), first)
        out = _cli(_run(tmp_path / "run", "--overwrite", "True"), tmp_path)
        assert first.poll() is None  # still running while the second was refused
        assert out.returncode != 0 and f"is in use by another run (process {first.pid}" in _message(out)
    finally:
        first.kill()
        first.wait()


def _checkpoint_epoch(path):
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


@pytest.mark.parametrize("extra", [[], ["--ema", "0.9"]], ids=["default", "ema"])
def test_a_run_killed_mid_epoch_resumes_and_ends_as_an_uninterrupted_run(tmp_path, extra):
    # the default recipe, random augmentation included: the checkpoint carries every generator's state (and, with
    # ema, the average and the trained weights, which the model holds the average in place of after an eval)
    args = dict(steps=20, epochs=4, size="[320,32]")  # seconds an epoch: the kill below lands in epoch 3
    whole = _cli(_run(tmp_path / "whole", "--seed", "0", *extra, **args), tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "killed"
    proc = start_cli(["train"] + _run(run, "--seed", "0", *extra, **args), tmp_path)
    _wait_for(lambda: _checkpoint_epoch(run / CHECKPOINT_FILE) >= 2, proc)
    time.sleep(0.3)  # into epoch 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    assert not (run / RECORD_FILE).exists() and (run / LOCK_FILE).exists()  # a killed run leaves its (stale) lock
    saved = torch.load(run / "vit_pretrain_best_accuracy.pt", weights_only=True)  # whole: written to a temporary name
    assert saved and not [p for p in os.listdir(run) if p.endswith(".partial") and p != CHECKPOINT_FILE + ".partial"]
    again = _cli(_run(run, "--seed", "0", *extra, **args), tmp_path)  # the same command without --resume: refused
    assert again.returncode != 0 and "not overwriting" in _message(out=again) + again.stderr
    resumed = _cli(_run(run, "--seed", "0", "--resume", "True", *extra, **args), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after epoch" in resumed.stdout
    a, b = read_record(str(tmp_path / "whole" / RECORD_FILE)), read_record(str(run / RECORD_FILE))
    assert b["resumed_after_epochs"] and b["resumed_after_epochs"][0] >= 2 and b["ended"] == "finished"
    assert [e["epoch"] for e in b["eval"]] == [1, 2, 3, 4]
    assert [(e["step"], e["metrics"]) for e in b["eval"]] == [(e["step"], e["metrics"]) for e in a["eval"]]
    enc_a = torch.load(tmp_path / "whole" / ENCODER_FILE, weights_only=True)["state_dict"]
    enc_b = torch.load(run / ENCODER_FILE, weights_only=True)["state_dict"]
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)  # the same final weights


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (the copies from it are what the batching is for)"))])
def test_the_checkpoints_copy_holds_every_tensor_apart_in_one_transfer_per_dtype(tmp_path, device):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 3, device=device)).sum().backward()
    optimizer.step()
    state = {"models": model.state_dict(), "optimizers": optimizer.state_dict(), "lr": np.float32(0.5),
             "rng": [torch.get_rng_state(), (1, "a")], "step": torch.tensor(7, device=device), "none": None}
    copy = _cpu(state)
    flat = [(k, v) for k, v in copy["models"].items()] + [(k, v) for i, s in copy["optimizers"]["state"].items()
                                                          for k, v in s.items()]
    originals = list(model.state_dict().values()) + [v for s in optimizer.state_dict()["state"].values()
                                                     for v in s.values()]
    assert len(flat) == len(originals) == 4 + 4 * 3  # weights and biases; each one's step, exp_avg, exp_avg_sq
    for (name, got), want in zip(flat, originals):
        assert got.device.type == "cpu" and got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want.cpu()) and not got.requires_grad, name
    assert copy["lr"] == 0.5 and type(copy["lr"]) is float and copy["rng"][1] == (1, "a") and copy["none"] is None
    assert torch.equal(copy["rng"][0], torch.get_rng_state()) and copy["step"].item() == 7
    with torch.no_grad():  # copies, not the originals: the next training step leaves them as they were
        for p in model.parameters():
            p.add_(1.0)
    assert all(not torch.equal(got, want.cpu()) for (_, got), want in zip(flat[:4], model.state_dict().values()))
    # one transfer per device and dtype: the float32 copies are views of one host buffer per device they came from
    # (AdamW's step counts stay on the CPU beside parameters on a GPU)
    devices = {want.device for want in originals if want.dtype == torch.float32}
    assert len({v.untyped_storage().data_ptr() for _, v in flat if v.dtype == torch.float32}) == len(devices)
    torch.save(copy, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert all(torch.equal(back["models"][k], v) for k, v in copy["models"].items())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (where the copy runs while the host goes on)"))])
def test_a_host_copy_holds_the_values_of_when_it_was_made_not_of_when_it_is_read(device):
    weights = torch.nn.Linear(256, 256).to(device)
    then = {k: v.detach().cpu().clone() for k, v in weights.state_dict().items()}
    box = {"w": [1, 2]}
    copy = HostCopy({"model": weights.state_dict(), "box": box})
    with torch.no_grad():  # what training does next, queued after the copy on the same stream
        for _ in range(5):
            weights.weight.mul_(2.0).add_(1.0)
    box["w"].append(3)  # a caller's list, changed after the copy was made
    got = copy.result()
    assert all(torch.equal(got["model"][k], v) and got["model"][k].device.type == "cpu" for k, v in then.items())
    assert got["box"] == {"w": [1, 2]} and not torch.equal(got["model"]["weight"], weights.weight.detach().cpu())


class _System:
    mode, epoch_idx, global_step = "eval", 1, 10


def test_the_best_model_and_the_checkpoint_are_written_after_the_eval_in_order_from_its_weights(tmp_path,
                                                                                                monkeypatch):
    """An eval epoch only queues the files; the next training epoch's start writes them (the best model first, whole,
    then the checkpoint that names it), each with the weights of the eval, whatever training did since."""
    from fastestimator.util.data import Data
    model = torch.nn.Linear(3, 2)
    model.model_name, model.optimizer = "net", None
    saver = SafeBestModelSaver(model, str(tmp_path), metric="accuracy", save_best_mode="max")
    checkpoint = Checkpoint(str(tmp_path), [model], [saver], config={}, lock=None)
    for trace in (saver, checkpoint):
        trace.system = _System()
    order = []
    save = runs._save

    def slow_save(state, path):
        if path.endswith("net_best_accuracy.pt"):
            time.sleep(0.3)  # a slow disk: the checkpoint must still come after it
        save(state, path)
        order.append(os.path.basename(path))

    monkeypatch.setattr(runs, "_save", slow_save)
    at_eval = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint._ranks_rng = [runs._rng_state(), runs._rng_state()]  # as torchrun's rank 0 gathers them
    data = Data({"accuracy": 0.5})
    saver.on_epoch_end(data)
    checkpoint.on_epoch_end(data)
    assert not (tmp_path / "net_best_accuracy.pt").exists() and not (tmp_path / CHECKPOINT_FILE).exists()
    with torch.no_grad():
        model.weight.add_(1.0)  # the next epoch trains on before the files are written
    _System.mode = "train"
    try:
        checkpoint.on_epoch_begin(Data())  # starts both writes
    finally:
        _System.mode = "eval"
    checkpoint.writes.join()
    assert order == ["net_best_accuracy.pt", CHECKPOINT_FILE]
    best = torch.load(tmp_path / "net_best_accuracy.pt", weights_only=True)
    saved = runs.load_checkpoint(str(tmp_path / CHECKPOINT_FILE))
    for k, v in at_eval.items():
        assert torch.equal(best[k], v) and torch.equal(saved["models"]["net"][k], v), k
    assert saved["traces"][0]["best"] == 0.5 and saved["traces"][0]["model_path"].endswith("net_best_accuracy.pt")
    for rng in (saved["rng"], *saved["ranks_rng"]):  # every generator's state restores (a resumed rank's too)
        runs._set_rng_state(rng)
    data = Data({"accuracy": 0.7})  # a better eval as the run's last: its files are written when the run ends
    saver.on_epoch_end(data)
    checkpoint.on_epoch_end(data)
    checkpoint.on_end(Data())
    assert torch.equal(torch.load(tmp_path / "net_best_accuracy.pt", weights_only=True)["weight"], model.weight)
    assert runs.load_checkpoint(str(tmp_path / CHECKPOINT_FILE))["traces"][0]["best"] == 0.7


def test_the_checkpoints_copy_keeps_each_tensors_layout_through_a_resume(tmp_path):
    """The conv stem's weights are channels_last on a GPU (apphub_vit/training.py), and so are their AdamW moments; the
    fused AdamW refuses a moment laid out unlike its parameter, so a resumed run must get them back in that layout."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.ones(1, 3, 8, 8))
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 3, 8, 8).to(memory_format=torch.channels_last)).sum().backward()
    optimizer.step()
    torch.save(_cpu({"model": model.state_dict(), "optimizer": optimizer.state_dict()}), tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    weight = model[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert saved["model"]["0.weight"].stride() == weight.stride() and torch.equal(saved["model"]["0.weight"], weight)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(saved["optimizer"])
    for p in model.parameters():
        for name in ("exp_avg", "exp_avg_sq"):
            assert fresh.state[p][name].stride() == p.stride(), name
            assert torch.equal(fresh.state[p][name], optimizer.state[p][name]), name


def test_resume_without_a_checkpoint_or_with_other_options_is_refused(tmp_path):
    out = _cli(_run(tmp_path / "new", "--resume", "True"), tmp_path)
    assert out.returncode != 0 and "no checkpoint to resume from" in _message(out)
    assert _cli(_run(tmp_path / "done"), tmp_path).returncode == 0
    out = _cli(_run(tmp_path / "done", "--resume", "True", "--lr", "0.5"), tmp_path)
    assert out.returncode != 0 and "options differ from the checkpointed run's in overrides, recipe" in _message(out)


def _write_cifar100(folder, payload=None):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 20), ("test", 10)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": [i % 100 for i in range(n)],
                 b"coarse_labels": [0] * n, b"filenames": [b"x.png"] * n}
        if payload is not None and name == "train":
            batch[b"filenames"] = payload
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)


class _Payload:
    """What a doctored data file can hold: unpickling it runs a command."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}", ))


def test_a_cifar_pickle_that_would_run_a_command_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "the_payload_ran"
    _write_cifar100(tmp_path / "data" / "cifar-100-python", payload=_Payload(marker))
    out = _cli([PRETRAIN, "--data_dir", tmp_path / "data", "--dataset", "cifair100", "--save_dir", tmp_path / "run",
                "--epochs", "1", *TINY[2:]], tmp_path)
    assert out.returncode != 0 and "refers to posix.system" in _message(out), _message(out)
    assert not marker.exists()
    _write_cifar100(tmp_path / "clean" / "cifar-100-python")  # the same files without the payload load
    train, _ = load_cifar(100, "cifair100", str(tmp_path / "clean"))
    assert len(train) == 20


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One good pretraining run for the bad-encoder cases below: each damages a copy of its encoder file, never it."""
    root = tmp_path_factory.mktemp("pretrained")
    out = _cli(_run(root / "pre"), root)
    assert out.returncode == 0, _message(out)
    return root / "pre"


@pytest.mark.parametrize("kind, message", [
    ("empty", "is an empty file (0 bytes)"),
    ("random", "is not a file torch.save wrote"),
    ("truncated", "is truncated or damaged"),
    ("folder", "is a folder: pass '"),
    ("objects", "holds Python objects besides tensors"),
])
def test_bad_encoder_files_say_what_they_are(tmp_path, pretrained, kind, message):
    path = tmp_path / f"{kind}.pt"
    data = (pretrained / ENCODER_FILE).read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "folder":
        path = pretrained
    else:
        torch.save({"config": {}, "state_dict": {}, "extra": _Payload(tmp_path / "x")}, path)
    out = _cli([str(REPO / "apphub_vit" / "finetune.py"), "--encoder_weights", path, "--save_dir", tmp_path / "fine",
                "--epochs", "1", *TINY[:8]], tmp_path)
    assert out.returncode != 0 and message in _message(out), _message(out)
    assert "weights_only=False" not in out.stderr  # never advise a user to load a file that can run code
    assert not (tmp_path / "x").exists()
    assert (pretrained / ENCODER_FILE).read_bytes() == data  # the user's good file is untouched
