"""Smoke tests of the benchmark scripts on CPU with tiny configurations (their figures come from real runs
elsewhere)."""
import csv
import os
import re
import shlex
import sys
from dataclasses import replace

import pytest
import torch

from tests.conftest import CLIENT, REPO, CliServer

sys.path.insert(0, str(REPO / "benchmarks"))
import throughput  # noqa: E402


def test_throughput_prints_every_row_with_its_ratio(capsys, monkeypatch):
    built = []  # the options of every estimator the benchmark builds

    def spy(**kwargs):
        built.append(kwargs)
        return get_estimator(**kwargs)

    get_estimator = throughput.pretrain.get_estimator
    monkeypatch.setattr(throughput.pretrain, "get_estimator", spy)
    throughput.main(["--size", "tiny", "--steps", "3", "--skip", "1", "--batch_size", "24"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "images/s" not in line and "---" not in line]
    has_timm = throughput.timm_vit(throughput.SIZES["tiny"]) is not None
    assert len(rows) == 8 + has_timm, out[-3000:]
    if has_timm:  # the hand-written peer loop, last, and the ratio of our path to it
        assert rows[-1].startswith("| peer: hand-written timm ViT loop") and "our path end to end / the hand" in out
    else:
        assert "peer row skipped: timm is not installed" in out
    # TFLOP/s for the rows that train a model, from a FLOP count of that row's model
    flops = re.search(r"FLOPs per training image \(forward \+ backward\): ours ([0-9.]+) G, the plain ViT "
                      r"([0-9.]+) G", out)
    assert flops and float(flops.group(1)) > float(flops.group(2)) > 0, out[-2000:]  # the conv stem's 3x3 convolutions
    assert [row.split("|")[4].strip() == "-" for row in rows[:8]] == [False] * 5 + [True, True, False]
    assert "our path as the plain ViT" in out
    # that row, and only it, turns them off (the default recipe has them); likewise the per-image policy
    assert [k["batch_size"] for k in built if k.get("stem") == "patch" and k.get("lsa") is False] == [24]
    assert [k["batch_size"] for k in built if k.get("augment") == "apphub"] == [24]
    rates = [float(row.split("|")[2].replace(",", "")) for row in rows]
    ratios = [float(row.split("|")[3].strip().rstrip("x")) for row in rows]
    assert all(rate > 0 for rate in rates)
    assert ratios[0] == 1.0 and all(abs(r - rate / rates[0]) < 0.01 + 0.01 * r for r, rate in zip(ratios, rates))
    assert re.search(r"without our FastEstimator sampler fix", out)
    assert "our path, end to end (batch 24," in out and "apphub recipe, end to end (batch 128," in out  # --batch_size


def test_throughput_only_peer_measures_our_path_and_the_peer_against_it(capsys):
    throughput.main(["--size", "tiny", "--steps", "2", "--skip", "1", "--batch_size", "16", "--only", "peer"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "images/s" not in line and "---" not in line]
    has_timm = throughput.timm_vit(throughput.SIZES["tiny"]) is not None
    assert [row.split("|")[1].strip().split(" (")[0] for row in rows] == \
        ["our path, end to end"] + ["peer: hand-written timm ViT loop, same size"] * has_timm, out[-2000:]
    assert "vs our path end to end" in out and "apphub" not in out.split("device:")[1]
    assert float(rows[0].split("|")[3].strip().rstrip("x")) == 1.0
    if has_timm:
        assert "/ the faster peer:" in out


def test_the_peer_loop_refuses_cuda_graphs_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ValueError, match="needs a GPU"):
        throughput.timm_loop(torch.nn.Linear(1, 1), batch_size=2, steps=1, skip=0, graphs=True)


def test_throughput_refuses_a_batch_size_below_one(capsys):
    with pytest.raises(SystemExit):
        throughput.main(["--size", "tiny", "--batch_size", "0"])
    assert "--batch_size must be a positive number of images, got 0" in capsys.readouterr().err


def test_sampler_as_shipped_is_only_inside_the_block():
    from fastestimator.dataset.dataloader import InfiniteSampler
    from torch.utils.data import BatchSampler

    from apphub_vit.compat import fastestimator_sampler_as_shipped

    def first_batches():
        batches = iter(BatchSampler(InfiniteSampler(list(range(6)), shuffle=False), batch_size=2, drop_last=False))
        return [next(batches) for _ in range(2)]

    import inspect
    if "islice" in inspect.getsource(BatchSampler.__iter__):  # torch versions whose BatchSampler has the bug
        with fastestimator_sampler_as_shipped():
            assert first_batches() == [[0, 1], [0, 1]]  # FastEstimator 1.7.0 on this torch: restarted every batch
    assert first_batches() == [[0, 1], [2, 3]]


def test_accuracy_script_resumes_from_its_checkpoint(tmp_path, capsys):
    """--restore_dir: a second run with more epochs continues after the first run's last epoch (same step count,
    same weights: the first eval after resuming repeats the last one's loss exactly) and reports every epoch."""
    import accuracy

    from tests.test_data import _write_cifar10
    _write_cifar10(tmp_path / "data" / "cifar-10-batches-py", n=64)
    args = ["--data_dir", str(tmp_path / "data"), "--em_dim", "16", "--batch_size", "16", "--train_steps_per_epoch",
            "2", "--eval_steps_per_epoch", "2", "--restore_dir", str(tmp_path / "resume"), "--distill", "0",
            "--tta", "none"]  # TTA: the last epoch's eval predicts on views, the same epoch of a longer run does not
    accuracy.main(args + ["--epochs", "2", "--save_dir", str(tmp_path / "one")])
    last_eval = r"Eval: step: 4; epoch: 2; accuracy: \S+; ce: (\S+);"
    before = re.findall(last_eval, capsys.readouterr().out)
    accuracy.main(args + ["--epochs", "3", "--save_dir", str(tmp_path / "two")])
    out = capsys.readouterr().out
    assert "resumed after epoch 2 (step 4)" in out, out[-2000:]
    assert len(before) == 1 and re.findall(last_eval, out) == before
    assert re.search(r"Train: step: 6; epoch: 3;", out) and not re.search(r"Train: step: \d+; epoch: 1;", out)
    csv = (tmp_path / "two" / "accuracy.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in csv[1:]] == [["1", "2"], ["2", "4"], ["3", "6"]]
    first = (tmp_path / "one" / "accuracy.csv").read_text().splitlines()[1:]
    assert csv[1:3] == first  # the first two epochs' accuracies carried over from the checkpoint


def test_resnet9_reference_augments_as_page_and_trains(tmp_path, capsys):
    """Each image is a 32x32 window of the padded image, mirrored or not, with exactly one 8x8 square zeroed; the
    script trains end to end on a tiny model and prints one line per epoch and the comparison."""
    import torch

    import resnet9_reference as ref

    padded = torch.rand(64, 3, 40, 40) + 1  # no zeros, so the zeroed pixels are the cutout's
    out = ref.augment(padded, generator=torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32)
    zeros = (out == 0).all(1)  # [N, H, W]: pixels zeroed in every channel
    assert ((out == 0).any(1) == zeros).all() and (zeros.sum((1, 2)) == 64).all()
    flips = 0
    for img, src, hole in zip(out, padded, zeros):
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert len(rows) == len(cols) == 8 and rows[-1] - rows[0] == 7 and cols[-1] - cols[0] == 7  # one square
        windows = [(src[:, t:t + 32, c:c + 32], flip) for t in range(9) for c in range(9) for flip in (0, 1)]
        match = [flip for win, flip in windows
                 if torch.equal(torch.where(hole, 0.0, win.flip(2) if flip else win), img)]
        assert len(match) == 1
        flips += match[0]
    assert 16 < flips < 48  # about half mirrored
    assert ref.lr_at(0, 10, 0.4, 5, 24) == 0 and ref.lr_at(50, 10, 0.4, 5, 24) == 0.4
    assert abs(ref.lr_at(145, 10, 0.4, 5, 24) - 0.2) < 1e-9 and ref.lr_at(240, 10, 0.4, 5, 24) == 0

    from tests.test_data import _write_cifar10
    _write_cifar10(tmp_path / "cifar-10-batches-py", n=64)
    ref.main(["--data_dir", str(tmp_path), "--epochs", "2", "--batch_size", "32", "--width", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(";")[0] for line in lines[:2]] == ["resnet9_reference: epoch 1", "resnet9_reference: epoch 2"]
    assert "on the original CIFAR-10: 94.06%" in lines[-1]


def test_flop_count_of_a_vit_matches_its_matmuls_by_hand():
    from networks.resnet9 import MAP_CHANNELS
    from networks.vit import ViTConfig, ViTModel
    config = ViTConfig(num_layers=1, em_dim=16, num_heads=2, ff_dim=32, patch_size=8, drop=0.0, pool="mean")
    patches, tokens, dim = 16, 17, 16  # (32 / 8)^2 patches, and the CLS token (kept with mean pooling)
    forward = 2 * (patches * (3 * 8 * 8) * dim  # patch embedding
                   + tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim  # qkv, attention, out
                   + 2 * tokens * dim * 32  # MLP
                   ) + 2 * dim * 10  # head
    model = ViTModel.from_config(10, config)
    assert throughput.train_flops_per_image(model, batch=3, backward=False) == pytest.approx(forward, rel=0.01)
    # backward: twice the forward, less the gradient of the images, which nothing needs (the patch embedding's input)
    backward = 2 * forward - 2 * patches * (3 * 8 * 8) * dim
    assert throughput.train_flops_per_image(model, batch=3) == pytest.approx(forward + backward, rel=0.01)
    # DeiT's distillation head (recipe vit's): one more dim x 10 matmul, forward and backward (its gradient reaches the
    # CLS token's output, so the whole backward is counted as above)
    head = ViTModel.from_config(10, replace(config, distill_head=True))
    assert throughput.train_flops_per_image(head, batch=3) == pytest.approx(forward + backward + 3 * 2 * dim * 10,
                                                                            rel=0.01)
    # locality guidance: one more patches x dim x 256 matmul (to the teacher's channels), forward and backward
    guided = ViTModel.from_config(10, replace(config, guide=1.0))
    assert throughput.train_flops_per_image(guided, batch=3) == pytest.approx(
        forward + backward + 3 * 2 * patches * dim * MAP_CHANNELS, rel=0.01)
    # a row's model as the app resolves it: distill=0 drops the recipe's head and guidance, which the default counts
    default, untaught = (throughput.vit_flops(dict(throughput.SIZES["tiny"], **kw)) for kw in ({}, {"distill": 0}))
    tiny = throughput.SIZES["tiny"]
    grid = (32 // tiny["patch_size"])**2  # the guided tokens
    assert default - untaught == pytest.approx(3 * 2 * tiny["em_dim"] * (100 + grid * MAP_CHANNELS), rel=0.01)


def _forked_cli(monkeypatch):
    """--cli for the scripts' runs: each a process of its own, forked from one that imported TensorFlow, torch and
    FastEstimator once (tests/cli_server.py) instead of importing them again (most of a tiny run's wall time)."""
    monkeypatch.setenv("CLI_SERVER_SOCKET", CliServer.socket_path())
    return shlex.join(CLIENT + ["fastestimator"])


def test_time_to_accuracy_reads_each_target_from_the_runs_records(tmp_path, capsys, monkeypatch):
    import json
    import time_to_accuracy
    out = tmp_path / "tta"
    assert time_to_accuracy.main(["--budget", "tiny", "--seeds", "2", "--first_seed", "1", "--targets", "0.0,1.01",
                                  "--out", str(out), "--epochs", "2", "--cli", _forked_cli(monkeypatch),
                                  "--fresh_cache"]) == 0
    text = capsys.readouterr().out
    assert text.count("(empty compile caches)") == 2 and "; each with empty compile caches; runs in" in text
    rows = [line for line in text.splitlines() if line.startswith("| seed")]
    assert len(rows) == 4 and "| mean |" in text and "| std |" in text, text[-2000:]
    assert rows[:2] == rows[2:]  # each seed's row as its run ended, then the same rows in the final table
    rows = rows[2:]
    for seed, row in zip((1, 2), rows):  # --first_seed 1: the runs are seeds 1 and 2, each given to the app
        assert re.search(rf"^seed {seed}: .* --seed {seed} ", text, re.M), text[:2000]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == f"seed {seed}"
        record = json.loads((out / f"seed{seed}" / "run_record.json").read_text())
        first_eval = record["eval"][0]
        startup, wall, teacher = float(cells[5]), float(cells[4]), float(cells[7])  # recipe vit's teacher, 1 epoch
        # of the start-up, FastEstimator's warm-up (the app's AppEstimator tells the record when fit() was called)
        assert "| startup (s) | of which warm-up (s) | teacher (s) |" in text
        assert float(cells[6]) == pytest.approx(record["timing"]["warmup_seconds"], abs=0.06)
        assert 0 < record["timing"]["warmup_seconds"] <= startup + 0.06
        assert "| teacher (s) |" in text and teacher == pytest.approx(record["hparams"]["teacher"]["seconds"], abs=0.06)
        # 0%: reached at the first eval, which ends after start-up and the teacher (strictly, in the record's own
        # times; the table's figures are rounded to 0.1 s, and a tiny run's first epoch can take less) and before the
        # process exits
        assert first_eval["time"] > record["timing"]["fit_started"]
        assert startup + teacher <= float(cells[1]) + 0.1 and float(cells[1]) <= wall
        assert abs(float(cells[1]) - (first_eval["time"] - record["timing"]["fit_started"]) - startup - teacher) < 0.2
        assert cells[2] == "-"  # 101% is never reached
        assert cells[3] == f"{record['final_accuracy']:.2%}"
        assert float(cells[8]) == pytest.approx(record["timing"]["train_seconds"], abs=0.06)
        assert float(cells[10]) == pytest.approx(first_eval["seconds"], abs=0.06)
        # recipe vit predicts with the shifted views: the same model on single images and on flips alone last
        last = record["eval"][-1]["metrics"]
        assert "| final, no TTA | final, flip only |" in text
        assert cells[12:14] == [f"{last['accuracy_no_tta']:.2%}", f"{last['accuracy_flip']:.2%}"]
    # the curves: every eval of both runs, on the table's clock (the 0% target is the first eval), and their picture
    with open(out / "curves.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    assert [(c["seed"], c["epoch"]) for c in curves] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert {c["series"] for c in curves} == {  # the recipe and the options the app was given, but --epochs
        "vit --augment apphub --batch_size 16 --em_dim 16 --ff_dim 32 --num_heads 2 --num_layers 1 --patch_size 8 "
        "--teacher_epochs 1"}
    for seed, row in zip((1, 2), rows):
        record = json.loads((out / f"seed{seed}" / "run_record.json").read_text())
        mine = [c for c in curves if c["seed"] == str(seed)]
        assert [float(c["test_accuracy"]) for c in mine] == [e["metrics"]["accuracy"] for e in record["eval"]]
        assert float(mine[0]["seconds_from_process_start"]) == pytest.approx(float(row.split("|")[2]), abs=0.06)
        assert float(mine[1]["seconds_from_process_start"]) - float(mine[0]["seconds_from_process_start"]) == \
            pytest.approx(record["eval"][1]["time"] - record["eval"][0]["time"], abs=0.002)
    assert (out / "curves.png").stat().st_size > 10_000
    # a series of another folder beside it in one picture; nothing overwritten, nothing trained
    other = tmp_path / "other"
    other.mkdir()
    (other / "curves.csv").write_text("series,seed,epoch,seconds_from_process_start,test_accuracy\n"
                                      "apphub,0,1,3.5,0.25\napphub,0,2,4.5,0.5\n")
    png = tmp_path / "both.png"
    assert time_to_accuracy.main(["--plot", str(out), str(other), "--png", str(png)]) == 0
    assert "6 evals of 3 runs drawn in" in capsys.readouterr().out and png.stat().st_size > 10_000
    # the same series in two folders (one recipe, two versions of the code): kept apart, named after their folders
    again = tmp_path / "again"
    again.mkdir()
    (again / "curves.csv").write_text((other / "curves.csv").read_text())
    rows = time_to_accuracy.read_curves([str(out), str(other), str(again)])
    # a series found in one folder keeps its own name
    assert {r["series"] for r in rows} == {curves[0]["series"], "other: apphub", "again: apphub"}
    assert time_to_accuracy.main(["--plot", str(other), str(again), "--png", str(tmp_path / "same.png")]) == 0
    assert "4 evals of 2 runs drawn in" in capsys.readouterr().out
    for argv, message in ((["--plot", str(out), "--png", str(png)], "already exists"),
                          (["--plot", str(tmp_path / "none"), "--png", str(tmp_path / "x.png")], "does not exist"),
                          (["--plot", str(out)], "go together"),
                          (["--plot", str(out), "--png", str(tmp_path / "x.png"), "--epochs", "3"], "takes no app"),
                          (["--budget", "tiny", "--out", str(other)], "already holds runs")):  # its curves
        with pytest.raises(SystemExit):
            time_to_accuracy.main(argv)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("after_fit", [True, False])
def test_time_to_accuracy_stops_at_a_failed_run_and_shows_what_it_measured(after_fit, tmp_path, capsys, monkeypatch):
    """A run that fails stops the series with exit 1. One that failed after fit() wrote its record (once, a bug at
    the models' unloading) still gets its row: its times and accuracy were measured."""
    import json
    import time_to_accuracy
    script = (_forked_cli(monkeypatch) + ' "$@"; exit 3') if after_fit else "exit 3"
    cli = shlex.join(["sh", "-c", script, "sh"])
    argv = ["--budget", "tiny", "--seeds", "2", "--out", str(tmp_path / "t"), "--epochs", "1", "--cli", cli]
    assert time_to_accuracy.main(argv) == 1
    captured = capsys.readouterr()
    assert "seed 0: the run exited with 3" in captured.err
    assert "seed 1" not in captured.out + captured.err  # the series stopped
    rows = [line for line in captured.out.splitlines() if line.startswith("| seed 0 |")]
    if after_fit:
        assert "seed 0 failed after fit() wrote its record" in captured.out and len(rows) == 1
        record = json.loads((tmp_path / "t" / "seed0" / "run_record.json").read_text())
        cells = [c.strip() for c in rows[0].strip("|").split("|")]
        assert cells[5] == f"{record['final_accuracy']:.2%}"  # after the four targets: the accuracy it reached
        assert (tmp_path / "t" / "curves.csv").read_text().count("\n") == 1 + len(record["eval"])  # its curve too
    else:
        assert not rows and "failed after fit()" not in captured.out


def test_time_to_accuracy_splits_a_teachers_training_out_of_start_up():
    import time_to_accuracy
    record = {"metrics": {"accuracy_key": "accuracy"}, "final_accuracy": 0.5, "wall": 100.0, "t0": 1000.0,
              "eval": [{"metrics": {"accuracy": 0.5}, "time": 1090.0}],
              "timing": {"fit_started": 1050.0, "train_seconds": 30.0, "eval_seconds": 5.0}}
    plain = time_to_accuracy.summarize({**record, "hparams": {"teacher": None}}, [0.5])
    assert plain["warmup"] is None and "warm-up" not in time_to_accuracy.table([plain], [0.5])  # an older record
    assert plain["first eval"] is None  # a record from before eval entries had their own seconds
    assert plain["startup"] == 50.0 and plain["teacher"] is None and plain["other"] == 15.0
    assert "teacher" not in time_to_accuracy.table([plain], [0.5]) and plain["final, no TTA"] is None
    assert "no TTA" not in time_to_accuracy.table([plain], [0.5])  # a run without flip TTA has no such column
    distilled = time_to_accuracy.summarize({**record, "hparams": {"teacher": {"seconds": 32.0}},
                                            "timing": {**record["timing"], "warmup_seconds": 4.0}}, [0.5])
    assert distilled["startup"] == 18.0 and distilled["teacher"] == 32.0 and distilled["other"] == 15.0
    assert distilled["warmup"] == 4.0  # part of the start-up, not taken from it
    both = time_to_accuracy.table([distilled, plain], [0.5])
    assert "| startup (s) | of which warm-up (s) | teacher (s) |" in both
    assert "| seed 0 | 90.0 | 50.00% | 100.0 | 18.0 | 4.0 | 32.0 |" in both
    assert "| seed 1 | 90.0 | 50.00% | 100.0 | 50.0 | - | - |" in both  # the plain run: neither warm-up nor teacher
    assert distilled["50%"] == 90.0 and "| teacher (s) |" in both


def test_time_to_accuracy_needs_data_or_the_tiny_budget(tmp_path, capsys):
    import time_to_accuracy
    with pytest.raises(SystemExit):
        time_to_accuracy.main(["--out", str(tmp_path)])
    assert "--data_dir is needed" in capsys.readouterr().err


def test_epoch_profile_times_every_part_of_an_epoch_once(tmp_path, capsys):
    import epoch_profile
    estimator = epoch_profile.finetune.get_estimator(from_scratch=True, epochs=3, save_dir=str(tmp_path),
                                                     **epoch_profile.TINY)
    profile = epoch_profile.instrument(estimator)
    with epoch_profile.timed_gc(profile):
        estimator.fit()
    summary = epoch_profile.summarize(profile)
    for mode, steps in (("train", 4), ("eval", 2)):  # 64 / 16 training images, 32 / 16 eval images
        table = summary[mode]
        assert table[epoch_profile.STEP]["calls"] == steps
        # FastEstimator's own traces (added inside fit()) are timed too
        assert "trace Logger" in table and f"trace {'TrainEssential' if mode == 'train' else 'EvalEssential'}" in table
        assert table[epoch_profile.GC]["calls"] >= 1
        # the parts are disjoint: nothing counted twice, so what is left of the total is not negative
        whole = (epoch_profile.TOTAL, epoch_profile.REST)
        parts = sum(row["later"] for region, row in table.items() if region not in whole)
        assert 0 < parts <= table[epoch_profile.TOTAL]["later"] + 1e-6
        assert table[epoch_profile.REST]["later"] == pytest.approx(table[epoch_profile.TOTAL]["later"] - parts)
    assert len(profile.epochs) == 6
    assert epoch_profile.main(["--budget", "tiny", "--epochs", "2", "--save_dir", str(tmp_path / "cli")]) == 0
    text = capsys.readouterr().out
    assert "| network steps (run_step) |" in text and "eval epochs" in text


def test_epoch_profile_profiles_the_last_train_and_eval_epochs_apart(tmp_path, capsys):
    import epoch_profile
    argv = ["--budget", "tiny", "--epochs", "2", "--torch_profiler", "--save_dir", str(tmp_path)]
    assert epoch_profile.main(argv) == 0
    text = capsys.readouterr().out
    # one report per mode, each with its own operator table (the eval one holds no backward pass)
    train, eval_ = text.split("\ntrain epoch under torch.profiler: wall ")[1:], text.split(
        "\neval epoch under torch.profiler: wall ")[1:]
    assert len(train) == 1 and len(eval_) == 1
    eval_table = eval_[0].split("\ntrain epochs")[0]
    assert "aten::addmm" in eval_table and "backward" not in eval_table.lower()
    assert "backward" in train[0].split("\neval epoch under")[0].lower()


def test_epoch_profile_counts_each_gpu_kernel_once():
    from types import SimpleNamespace

    import epoch_profile
    from torch.autograd import DeviceType

    def event(device_type, us, annotation=False):
        return SimpleNamespace(device_type=device_type, self_device_time_total=us, is_user_annotation=annotation)
    # a CPU op that launched a 300 us kernel carries its time too; so does a user's annotation around them
    events = [event(DeviceType.CPU, 300.0), event(DeviceType.CUDA, 300.0), event(DeviceType.CUDA, 300.0, True),
              event(DeviceType.CUDA, 200.0)]
    assert epoch_profile.device_seconds(events) == pytest.approx(500e-6)


def test_epoch_profile_tells_kinds_of_kernel_apart_by_name_attention_before_convolution():
    from types import SimpleNamespace

    import epoch_profile
    from torch.autograd import DeviceType

    def kernel(name, us, device_type=DeviceType.CUDA):
        return SimpleNamespace(key=name, device_type=device_type, self_device_time_total=us, is_user_annotation=False)
    events = [kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob", 100.0),  # "fprop" in it
              kernel("void cudnn::fusion::compute_dot_do_o<true>(void const*)", 10.0),
              kernel("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", 50.0),
              kernel("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NNN", 30.0),
              kernel("triton_poi_fused_gelu_view_16", 20.0),
              kernel("triton_poi_fused_convolution_backward_max_pool2d_with_indices_7", 5.0),
              kernel("void at::native::elementwise_kernel<128, 4>", 8.0),
              kernel("aten::scaled_dot_product_attention", 999.0, DeviceType.CPU)]  # a CPU op: not a kernel
    kinds = epoch_profile.kernel_kinds(events)
    assert kinds == pytest.approx({"attention": 110e-6, "convolution": 55e-6, "matrix product": 30e-6,
                                   "other Triton": 20e-6, "other": 8e-6})
    assert list(kinds) == ["attention", "convolution", "matrix product", "other Triton", "other"]  # largest first
    assert sum(kinds.values()) == pytest.approx(epoch_profile.device_seconds(events))


def test_epoch_profile_needs_two_epochs_and_data(capsys):
    import epoch_profile
    with pytest.raises(SystemExit):
        epoch_profile.main(["--budget", "tiny", "--epochs", "1"])
    assert "at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        epoch_profile.main([])
    assert "--data_dir is needed" in capsys.readouterr().err


def test_epoch_profile_regions_exclude_the_regions_inside_them():
    import time

    import epoch_profile
    profile = epoch_profile.EpochProfile()
    profile.current = (1, "train")
    inner = profile.timed("inner", lambda: time.sleep(0.05))
    outer = profile.timed("outer", lambda: (time.sleep(0.02), inner()))
    outer()
    assert profile.seconds[(1, "train", "inner")] == pytest.approx(0.05, abs=0.015)
    assert profile.seconds[(1, "train", "outer")] == pytest.approx(0.02, abs=0.015)
    assert profile.calls[(1, "train", "outer")] == profile.calls[(1, "train", "inner")] == 1


def test_sweep_runs_the_control_and_each_variant_on_held_out_images_and_reuses_finished_runs(
        tmp_path, capsys, monkeypatch):
    import csv
    import json
    import sweep
    out = tmp_path / "sweep"
    argv = ["--budget", "tiny", "--out", str(out), "--seeds", "1", "--parallel", "2", "--cli", _forked_cli(monkeypatch),
            "--variant", "wd=--weight_decay 0.1"]
    assert sweep.main(argv) == 0
    text = capsys.readouterr().out
    assert text.count(": started (") == 2 and "| control | (none) |" in text and "| wd | --weight_decay 0.1 |" in text
    for name, decay in (("control-s0", None), ("wd-s0", 0.1)):
        record = json.loads((out / name / "run_record.json").read_text())
        assert record["hparams"]["validation"] == 16 and record["hparams"]["overrides"].get("weight_decay") == decay
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["variant"], r["epoch"]) for r in rows} == {(v, e) for v in ("control", "wd") for e in ("1", "2")}
    assert all((out / name).is_file() for name in ("sweep.md", "comparison.md", "comparison.png"))
    assert sweep.main(argv) == 0  # the same command again: nothing runs, the report is written from the records
    text = capsys.readouterr().out
    assert ": started (" not in text and text.count("reused (finished earlier)") == 2 and "| wd |" in text
    with pytest.raises(SystemExit):  # another command over the same runs stops before anything starts
        sweep.main(argv[:-1] + ["wd=--weight_decay 0.2"])
    assert "holds a run of another command" in capsys.readouterr().err


def test_sweep_verdict_picks_the_best_variant_that_beats_the_control_by_the_margin():
    import sweep
    last = {"control": [0.900, 0.910], "a": [0.912, 0.912], "b": [0.909, 0.909], "c": [0.916, 0.914]}
    leads, pick = sweep.verdict(last, margin=0.3)
    assert leads == pytest.approx({"a": 0.7, "b": 0.4, "c": 1.0}) and pick == "c"
    assert sweep.verdict(last, margin=1.5) == (pytest.approx(leads), None)
    assert sweep.verdict({"control": [0.9], "a": [0.903]}, margin=0.3)[1] == "a"  # exactly the margin wins


def test_sweep_report_gives_each_runs_first_epoch_at_the_target():
    import sweep

    def record(*accuracies):
        return {"final_accuracy": accuracies[-1], "best_accuracy": max(accuracies), "metrics": {"accuracy_key": None},
                "eval": [{"epoch": e, "metrics": {"accuracy": a}} for e, a in enumerate(accuracies, 1)]
                + [{"epoch": len(accuracies), "metrics": {}}]}  # an eval without accuracy (a trace's) is skipped

    records = {"control-s0": record(0.5, 0.9, 0.89), "control-s1": record(0.5, 0.8, 0.85),
               "short-s0": record(0.7, 0.91), "short-s1": record(0.92, 0.95)}
    text, _ = sweep.report({"control": [], "short": ["--epochs", "2"]}, [0, 1], records, 0.3, "cmd")
    assert "| first epoch at 90% |" in text
    assert text.splitlines()[4].endswith("| 2, - |") and text.splitlines()[5].endswith("| 2, 1 |")
    text, _ = sweep.report({"control": []}, [0, 1], records, 0.3, "cmd", target=0.85)
    assert "| first epoch at 85% |" in text and text.splitlines()[4].endswith("| 2, 3 |")


def test_sweep_refuses_a_target_that_is_not_a_fraction(tmp_path, capsys):
    import sweep
    with pytest.raises(SystemExit):
        sweep.main(["--budget", "tiny", "--out", str(tmp_path / "s"), "--variant", "wd=--weight_decay 0.1",
                    "--target", "90"])
    assert "--target is a validation accuracy as a fraction (0.9 for 90%), got 90" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before anything ran


@pytest.mark.parametrize("variant, message", [("lr", "write NAME=FLAGS"), ("control=--lr 1", "write NAME=FLAGS"),
                                              ("a b=--lr 1", "write NAME=FLAGS"), ("lr=", "no app flags"),
                                              ("s=--seed 3", "sets --seed"), ("v=--validation 0", "sets --validation")])
def test_sweep_refuses_what_cannot_be_a_variant(variant, message, tmp_path, capsys):
    import sweep
    with pytest.raises(SystemExit):
        sweep.main(["--budget", "tiny", "--out", str(tmp_path), "--variant", variant])
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any run started


def test_time_to_accuracy_fresh_cache_gives_each_run_empty_compile_caches(tmp_path, monkeypatch):
    """--fresh_cache: each run's process finds torch.compile's caches (inductor's, Triton's) in an empty folder of its
    own, which is gone after the run, failed or not; without it the process keeps the machine's caches."""
    import time_to_accuracy
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    seen = []

    def call(command, env, **kwargs):  # the training process, failing at once
        folders = (env.get("TORCHINDUCTOR_CACHE_DIR"), env.get("TRITON_CACHE_DIR"))
        parent = os.path.dirname(folders[0]) if folders[0] else None
        seen.append((folders, parent, parent is not None and os.path.isdir(parent) and not os.listdir(parent)))
        return 3

    monkeypatch.setattr(time_to_accuracy.subprocess, "call", call)
    for seed, fresh in ((0, True), (1, True), (2, False)):
        with pytest.raises(time_to_accuracy.RunFailed, match="exited with 3"):
            time_to_accuracy.run_once(["fastestimator"], [], str(tmp_path / f"seed{seed}"), seed,
                                      str(tmp_path / f"seed{seed}.log"), fresh_cache=fresh)
    (first, first_parent, first_empty), (second, second_parent, second_empty), (plain, _, _) = seen
    assert first_empty and second_empty and first_parent != second_parent  # empty, and one per run
    assert all(os.path.dirname(f) == parent for fs, parent in ((first, first_parent), (second, second_parent))
               for f in fs) and len(set(first)) == 2  # inductor's and Triton's, apart
    assert not os.path.exists(first_parent) and not os.path.exists(second_parent)  # removed after each run
    assert plain == (None, None)
