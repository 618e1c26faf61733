"""apphub_vit/distributed.py: torchrun data-parallel training on CPUs (gloo, 2 processes), the sharded BatchLoader,
and a machine with several GPUs without torchrun (FastEstimator's DataParallel undone, one message)."""
import json
import subprocess
import sys
import time
from unittest import mock

import fastestimator as fe
import numpy as np
import pytest
import torch
from fastestimator.op.tensorop.model import UpdateOp
from torch.utils._python_dispatch import TorchDispatchMode

from apphub_vit import distributed
from apphub_vit import finetune as finetune_app
from apphub_vit import mnist as mnist_app
from apphub_vit import pretrain as pretrain_app
from apphub_vit.distributed import World, parse_command, single_device
from apphub_vit.encoder_io import ENCODER_FILE, load_encoder_state
from apphub_vit.options import OptionError
from apphub_vit.records import RECORD_FILE, read_record
from apphub_vit.runs import CHECKPOINT_FILE
from apphub_vit.teacher import TEACHER_FILE
from networks.vit import ViTModel
from pipelines.loader import BatchLoader
from tests.conftest import CLIENT, REPO, TINY_RUN, TINY_VIT, CliServer, cli, cli_env, start_cli

TINY = ["--dataset", "synthetic", "--num_process", "0", "--num_layers", "2", "--em_dim", "32", "--num_heads", "2",
        "--ff_dim", "64", "--patch_size", "8", "--warmup", "False",
        "--distill", "0"]  # no teacher (conftest.TINY_VIT)
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # after `python`


def _launch(args, cwd, env=None):
    """`torchrun --standalone --nproc_per_node 2 ARGS` on the CPU (gloo), started: torchrun and its ranks each a process
    of its own, forked from one that imported TensorFlow, torch and FastEstimator once (tests/cli_server.py; the ranks
    through torchrun's --no-python and tests/cli_client.py) instead of importing them again (most of a tiny run's wall
    time). A launch as users type it: test_a_two_rank_pretraining_and_finetuning_...'s first."""
    return start_cli(["python"] + TORCHRUN + ["--no-python"] + CLIENT + ["python"] + [str(a) for a in args], cwd,
                     dict(env or {}, CLI_SERVER_SOCKET=CliServer.socket_path()))


def _torchrun(args, cwd, as_users_launch_it=False):
    """`torchrun --standalone --nproc_per_node 2 ARGS` run to its end (_launch's, or as users launch it: torchrun's
    and each rank's interpreter importing everything anew); its stdout."""
    if as_users_launch_it:
        out = subprocess.run([sys.executable] + TORCHRUN + [str(a) for a in args], capture_output=True, text=True,
                             env=cli_env(), cwd=cwd, timeout=300)
    else:
        out = _launch(args, cwd)
        out.wait(300)
    # each rank's traceback (torch prefixes its lines "[rankN]:"), which the output's tail may have scrolled past
    ranks = "\n".join(line for line in out.stderr.splitlines() if line.startswith("[rank"))[-6000:]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + "\nthe ranks' own lines:\n" + ranks
    return out.stdout


def test_a_loss_that_is_not_finite_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # rank 1 alone sees it: stopping alone would leave rank 0 waiting at its next gradient all-reduce
    step = [REPO / "tests" / "distributed_step.py", tmp_path / "run"]
    out = _launch(step + _tiny_run(1, 6), tmp_path, env=dict(NAN_LOSS_ON_RANK="1"))
    out.wait(300)
    # TrainingDiverged on both ranks; stderr in the messages too: once (2026-12-07, a clean-clone CI) neither rank
    # printed its message, and what stopped them was not shown
    assert out.returncode != 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("training diverged: the loss 'ce' is not finite by step 2") == 2, \
        out.stdout[-3000:] + "\nstderr:\n" + out.stderr[-3000:]
    record = read_record(str(tmp_path / "run" / RECORD_FILE))
    assert record["ended"].startswith("training diverged") and record["schedule"]["global_steps"] == 2


def _tiny_run(epochs, steps):
    return TINY + ["--epochs", epochs, "--batch_size", "16", "--train_steps_per_epoch", steps, "--eval_steps_per_epoch",
                   "2", "--synthetic_size", "[256,64]"]


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_two_ranks_of_half_the_batch_train_the_weights_one_process_trains_with_the_whole(tmp_path):
    # 16 training images and a global batch of 16: each of the 2 steps (2 epochs) sees every image, in one process
    # or as 2 x 8 on two ranks; no augmentation (tests/distributed_step.py), no dropout (recipe "vit"). SGD with
    # momentum: its step is linear in the gradient. (AdamW's divides by the gradient's size, which blows the float
    # noise of a zero gradient, the attention's key bias, up to lr-sized steps: equal to 5e-4 only.) No relative-
    # localization loss: its token pairs are random draws, which two processes cannot make as one does.
    step = [REPO / "tests" / "distributed_step.py"]
    options = TINY + ["--epochs", "2", "--batch_size", "16", "--synthetic_size", "[16,16]", "--eval_steps_per_epoch",
                      "1", "--optimizer", "sgd", "--schedule", "constant", "--warmup_epochs", "0", "--lr", "0.05",
                      "--seed", "5", "--drloc", "0"]
    _torchrun(step + [tmp_path / "two"] + options, tmp_path)
    one = cli(["python"] + step + [tmp_path / "one"] + options, tmp_path, timeout=300)  # `python STEP ...`
    assert one.returncode == 0, one.stderr[-3000:]
    start = torch.load(tmp_path / "one" / "initial.pt", weights_only=True)
    assert all(torch.equal(v, torch.load(tmp_path / "two" / "initial.pt", weights_only=True)[k])
               for k, v in start.items())  # the same start: rank 0's weights, broadcast, are the seeded ones
    single = torch.load(tmp_path / "one" / "vit_pretrain_best_accuracy.pt", weights_only=True)
    ranks = torch.load(tmp_path / "two" / "vit_pretrain_best_accuracy.pt", weights_only=True)
    moved = max(float((single[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # the steps changed the weights well beyond the tolerance below
    for key, value in single.items():
        torch.testing.assert_close(ranks[key], value, rtol=1e-4, atol=1e-5, msg=key)
    record = read_record(str(tmp_path / "two" / RECORD_FILE))
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["per_rank_batch_size"] == 8
    assert record["schedule"]["batch_size"] == 16 and record["timing"]["train_images"] == 32


def test_a_two_rank_pretraining_and_finetuning_write_one_set_of_files_and_the_encoder_finetunes_alone(tmp_path):
    out = _torchrun(["-m", "apphub_vit.distributed", "pretrain", "--save_dir", tmp_path / "pre"] + _tiny_run(2, 3),
                    tmp_path, as_users_launch_it=True)
    assert out.count("FastEstimator-Start") == 1  # rank 0's log alone (torchrun's exit status 0: both ranks')
    assert out.count("Saved encoder to") == 1 and out.count("Saved run record to") == 1  # rank 0 alone wrote
    assert _files(tmp_path / "pre") == sorted([CHECKPOINT_FILE, ENCODER_FILE, RECORD_FILE, "prediction_grid.png",
                                               "vit_pretrain_best_accuracy.pt"])
    assert _files(tmp_path) == ["pre"]  # nothing anywhere else (no second rank's default runs/ folder)
    record = read_record(str(tmp_path / "pre" / RECORD_FILE))
    assert record["distributed"] == dict(record["distributed"], world_size=2, backend="gloo", global_batch_size=16,
                                         per_rank_batch_size=8)
    assert record["timing"]["train_images"] == 2 * 3 * 16 and record["hparams"]["recipe"]["batch_size"] == 16
    assert record["timing"]["train_images_per_second"] == pytest.approx(
        2 * record["distributed"]["train_images_per_second_per_rank"], rel=0.01)
    assert [e["epoch"] for e in record["eval"]] == [1, 2]
    encoder = tmp_path / "pre" / ENCODER_FILE
    # the 2-rank finetuning of that encoder, then one process finetuning it as any encoder
    out = _torchrun(["-m", "apphub_vit.distributed", "finetune", "--encoder_weights", encoder, "--save_dir",
                     tmp_path / "fine"] + _tiny_run(1, 2), tmp_path)
    assert out.count("Saved run record to") == 1
    assert "vit_finetune_best_accuracy.pt" in _files(tmp_path / "fine")
    assert read_record(str(tmp_path / "fine" / RECORD_FILE))["distributed"]["world_size"] == 2
    tuned = finetune_app.finetune(str(encoder), dataset="synthetic", save_dir=str(tmp_path / "alone"), **TINY_RUN)
    assert isinstance(tuned, ViTModel) and tuned.linear_classifier.out_features == 10
    assert read_record(str(tmp_path / "alone" / RECORD_FILE))["distributed"]["world_size"] == 1
    saved = load_encoder_state(str(encoder))["state_dict"]
    assert any(not torch.equal(v.cpu(), saved[k]) for k, v in tuned.vit_encoder.state_dict().items())  # trained


def test_under_torchrun_rank_0_trains_the_teacher_and_every_rank_distils_from_that_one(tmp_path):
    # recipe "vit" distils (TINY turns it off for the other tests); one teacher file, trained once, loaded by rank 1
    out = _torchrun(["-m", "apphub_vit.distributed", "pretrain", "--save_dir", tmp_path / "run"] + _tiny_run(1, 2)
                    + ["--distill", "0.5", "--teacher_epochs", "1"], tmp_path)
    assert out.count("distillation teacher (a ResNet-9): training it, 1 epochs") == 1, out[-3000:]
    assert out.count("distillation teacher (a ResNet-9): evaluating the one saved by this run") == 1, out[-3000:]
    assert TEACHER_FILE in _files(tmp_path / "run")
    record = read_record(str(tmp_path / "run" / RECORD_FILE))
    assert record["hparams"]["recipe"]["distill"] == 0.5 and not record["hparams"]["teacher"]["reused"]
    assert record["distributed"]["world_size"] == 2 and [e["epoch"] for e in record["eval"]] == [1]


def _checkpoint_epoch(path):
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


def test_a_two_rank_run_stopped_mid_epoch_resumes_and_ends_as_the_uninterrupted_run(tmp_path):
    # the default recipe, random augmentation included: the checkpoint holds every rank's generators
    def command(folder, *extra):
        return ["-m", "apphub_vit.distributed", "pretrain", "--save_dir", folder, "--seed", "0", *extra] + TINY + [
            "--epochs", "4", "--batch_size", "16", "--train_steps_per_epoch", "20", "--eval_steps_per_epoch", "2",
            "--synthetic_size", "[320,32]"]  # seconds an epoch: the stop below lands in epoch 3

    _torchrun(command(tmp_path / "whole"), tmp_path)
    run = tmp_path / "stopped"
    proc = _launch(command(run), tmp_path)
    start = time.time()
    while _checkpoint_epoch(run / CHECKPOINT_FILE) < 2:
        assert proc.poll() is None, proc.stderr[-3000:]
        assert time.time() - start < 240, "timed out"
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 3
    proc.terminate()  # torchrun stops both ranks
    proc.wait(timeout=120)
    assert proc.returncode != 0 and not (run / RECORD_FILE).exists()
    out = _torchrun(command(run, "--resume", "True"), tmp_path)
    assert out.count("resumed after epoch") == 2  # both ranks restored the checkpoint
    a, b = read_record(str(tmp_path / "whole" / RECORD_FILE)), read_record(str(run / RECORD_FILE))
    assert b["resumed_after_epochs"][0] >= 2 and [e["epoch"] for e in b["eval"]] == [1, 2, 3, 4]
    assert [(e["step"], e["metrics"]) for e in b["eval"]] == [(e["step"], e["metrics"]) for e in a["eval"]]
    enc_a = torch.load(tmp_path / "whole" / ENCODER_FILE, weights_only=True)["state_dict"]
    enc_b = torch.load(run / ENCODER_FILE, weights_only=True)["state_dict"]
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)  # the same final weights


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [batch["i"].tolist() for batch in loader]


@pytest.mark.parametrize("n, world_size, batch", [(24, 2, 8), (24, 3, 6), (29, 2, 8)])
def test_the_shards_of_an_epoch_hold_every_image_once_and_add_up_to_one_processs_batches(n, world_size, batch):
    arrays = {"i": np.arange(n)}
    device = torch.device("cpu")
    ranks = [BatchLoader(arrays, batch, shuffle=True, drop_last=True, device=device, rank=r, world_size=world_size,
                         seed=7) for r in range(world_size)]
    alone = BatchLoader(arrays, batch, shuffle=True, drop_last=True, device=device, seed=7)
    assert all(len(loader) == n // batch for loader in ranks + [alone])
    orders = []
    for epoch in (1, 2):
        shards = [_epoch(loader, epoch) for loader in ranks]
        assert all(len(b) == batch // world_size for shard in shards for b in shard)
        seen = [i for shard in shards for b in shard for i in b]
        assert len(seen) == len(set(seen)) == n // batch * batch  # disjoint; all images but a last partial batch
        # step k of the ranks together: the batch one process takes at step k
        assert [sorted(sum(step, [])) for step in zip(*shards)] == [sorted(b) for b in _epoch(alone, epoch)]
        orders.append(seen)
    assert orders[0] != orders[1]  # a new order every epoch
    assert _epoch(ranks[0], 1) == _epoch(BatchLoader(arrays, batch, shuffle=True, drop_last=True, device=device,
                                                     rank=0, world_size=world_size, seed=7), 1)  # seeded
    with pytest.raises(ValueError, match="batch_size 9 .* does not split evenly over 2 processes.*multiple of 2"):
        BatchLoader(arrays, 9, shuffle=True, drop_last=True, device=device, rank=0, world_size=2, seed=7)
    with pytest.raises(ValueError, match="needs drop_last=True"):
        BatchLoader(arrays, 8, shuffle=False, device=device, rank=0, world_size=2)
    with pytest.raises(ValueError, match="needs a seed"):
        BatchLoader(arrays, 8, shuffle=True, drop_last=True, device=device, rank=1, world_size=2)


def test_what_does_not_shard_is_refused_under_torchrun_saying_what_to_do(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:  # a ViT app whose torchrun world has 2 ranks (without joining a group)
        patch.setattr(distributed, "setup", lambda: World(rank=0, size=2))
        for bad, match in ((dict(augment="apphub", device_augment=False), "device_augment=False .* not sharded"),
                           (dict(batch_size=15), "batch_size=15 is the global batch.*multiple of 2")):
            with pytest.raises(OptionError, match=match):
                pretrain_app.get_estimator(save_dir=str(tmp_path / "vit"), **{**TINY_RUN, **TINY_VIT, **bad})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(OptionError, match="mnist trains in one process, but torchrun started 2.*torchrun --nproc"):
        mnist_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "mnist"), **TINY_RUN)
    assert not (tmp_path / "vit").exists() and not (tmp_path / "mnist").exists()


def test_the_command_parses_options_as_fastestimator_train_does(tmp_path):
    settings = tmp_path / "my.json"
    settings.write_text(json.dumps({"lr": 0.1, "epochs": 5}))
    parsed = parse_command(["finetune", "--synthetic_size", "[256,64]", "--from_scratch", "True", "--epochs", "2",
                            "--hyperparameters", str(settings), "--warmup", "False", "--dataset", "synthetic"])
    assert parsed == {"app": "finetune", "warmup": False, "options": {
        "synthetic_size": [256, 64], "from_scratch": True, "epochs": 2, "lr": 0.1, "dataset": "synthetic"}}
    for argv in ([], ["train"], ["apphub_vit/pretrain.py"]):
        with pytest.raises(SystemExit, match="usage: torchrun --nproc_per_node N -m apphub_vit.distributed"):
            parse_command(argv)


def _linear():
    return torch.nn.Linear(2, 2)


def test_several_gpus_without_torchrun_train_on_one_and_say_how_to_use_all(tmp_path, capsys, monkeypatch):
    # FastEstimator wraps the model in DataParallel when it counts more than one GPU; on a CPU DataParallel holds the
    # module and runs it unchanged, so the wrapping and its undoing can be seen here
    monkeypatch.setattr(distributed, "_told_single_gpu", False)
    with mock.patch("fastestimator.network.get_num_gpus", return_value=2), \
            mock.patch("torch.cuda.device_count", return_value=2):
        assert isinstance(fe.build(model_fn=_linear, optimizer_fn="adam"), torch.nn.DataParallel)
        est = pretrain_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), **TINY_RUN, **TINY_VIT)
        again = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "b"), from_scratch=True,
                                           **TINY_RUN, **TINY_VIT)
    said = capsys.readouterr().out
    assert said.count("2 GPUs are visible; this run trains on one of them") == 1  # once per process
    assert "torchrun --nproc_per_node 2 -m apphub_vit.distributed pretrain|finetune" in said
    model = est.model
    assert type(model) is ViTModel and type(again.model) is ViTModel and model.model_name == "vit_pretrain"
    assert {id(p) for g in model.optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert all(op.model is model for op in est.network.ops if hasattr(op, "model"))
    est.fit(warmup=False)  # trains and saves as without the wrapper
    assert read_record(str(tmp_path / "a" / RECORD_FILE))["distributed"]["world_size"] == 1
    assert single_device(model) is model


class _TwoBiases(torch.nn.Module):
    """A linear layer and two parameters added together, whose gradients autograd gives as one tensor."""
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 4)
        self.a, self.b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * (self.a + self.b)  # d/da = d/db: AddBackward passes one gradient to both


class _Clones(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.clone.default
        return func(*args, **(kwargs or {}))


def test_the_update_hands_each_gradient_over_without_a_copy_and_trains_as_fastestimators_update():
    """FastEstimator's UpdateOp clones every gradient into `.grad` (one copy kernel per parameter and step, inside the
    captured GPU step); DistributedUpdateOp hands each over as it is, but clones one whose memory another parameter
    already got, so that the two `.grad`s stay apart. Three steps of each, deferred as FastEstimator defers the last
    update op and not: the same weights, bit for bit."""
    torch.manual_seed(0)
    models = [fe.build(model_fn=_TwoBiases, optimizer_fn=lambda p: torch.optim.AdamW(p, lr=0.1)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ops = [UpdateOp(model=models[0], loss_name="loss"),
           distributed.DistributedUpdateOp(model=models[1], loss_name="loss")]
    x = torch.randn(8, 6)
    clones = []
    for defer in [True, False, True]:
        counted = []
        for model, op in zip(models, ops):
            op.defer = defer
            state = {"warmup": False, "tape": None, "deferred": {}, "mode": "train"}
            loss = model(x).square().mean()
            with _Clones() as mode:
                op.forward(loss, state)
            counted.append(mode.count)
            if defer:  # the step waits: the handed-over gradients are still there to look at
                assert model.a.grad is not None and torch.equal(model.a.grad, model.b.grad)
                assert model.a.grad.data_ptr() != model.b.grad.data_ptr()
                for fn in state["deferred"].pop(model.model_name):
                    fn()
            assert all(p.grad is None for p in model.parameters())  # zero_grad's None, as FastEstimator's step
        clones.append(counted)
    assert clones == [[4, 1]] * 3  # FastEstimator's: one per parameter; this one: the shared gradient's only
    for mine, theirs in zip(models[1].state_dict().values(), models[0].state_dict().values()):
        assert torch.equal(mine, theirs)
