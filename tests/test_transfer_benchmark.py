"""benchmarks/transfer.py on the tiny budget: the plumbing (its figures come from the cpu / gpu budgets, see README)."""
import re
import sys

import pytest

from apphub_vit.records import read_record
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import transfer  # noqa: E402


def test_transfer_runs_both_starts_per_seed_and_prints_their_recorded_accuracies(tmp_path, capsys):
    status = transfer.main(["--budget", "tiny", "--out", str(tmp_path), "--seeds", "2"])
    out = capsys.readouterr().out
    assert status in (0, 1)  # tiny runs learn nothing: either start may win
    encoder = tmp_path / "vit_pretrain" / "vit_encoder.pt"
    assert encoder.is_file()
    row = re.compile(r"^\| (pretrained|scratch) \| ([^|]+) \|", re.M)
    rows = {m.group(1): m.group(2).split(", ") for m in row.finditer(out)}
    assert set(rows) == {"pretrained", "scratch"}, out[-2000:]
    for start in ("pretrained", "scratch"):
        for seed in (0, 1):
            record = read_record(str(tmp_path / f"{start}-seed{seed}" / "run_record.json"))
            assert float(rows[start][seed]) == pytest.approx(record["final_accuracy"], abs=5e-5)
            assert record["hparams"]["epochs"] == 1  # one finetuning epoch, whatever run_all's budget says
            assert record["hparams"].get("encoder_weights") == (str(encoder) if start == "pretrained" else None)
            assert record["hparams"].get("from_scratch", False) == (start == "scratch")
    # same budget for both starts
    pre, scratch = (read_record(str(tmp_path / f"{s}-seed0" / "run_record.json"))["hparams"]
                    for s in ("pretrained", "scratch"))
    budget = ("epochs", "batch_size", "train_steps_per_epoch", "synthetic_size", "em_dim", "num_layers")
    assert {k: pre.get(k) for k in budget} == {k: scratch.get(k) for k in budget}
    assert re.search(r"pretrained - scratch: [+-]\d\.\d{4} mean accuracy; pretrained wins \d of 2 seeds", out)


def test_transfer_refuses_a_missing_encoder(tmp_path, capsys):
    assert transfer.main(["--budget", "tiny", "--out", str(tmp_path), "--encoder", str(tmp_path / "no.pt")]) == 2
    assert "no such file" in capsys.readouterr().out


def _cifar10_folder(tmp_path):
    """A small cifar-10-batches-py (100 training images, 10 of each class; 20 test images, 2 of each)."""
    from tests.test_data import _write_cifar10
    _write_cifar10(tmp_path / "c10" / "cifar-10-batches-py", n=20)
    return tmp_path / "c10"


def test_real_transfer_runs_every_setting_per_seed_and_prints_their_recorded_accuracies(tmp_path, capsys):
    data, out = _cifar10_folder(tmp_path), tmp_path / "out"
    status = transfer.main(["--task", "real", "--data_dir", str(data), "--budget", "tiny", "--out", str(out),
                            "--seeds", "2"])
    text = capsys.readouterr().out
    pre = read_record(str(out / "real_pretrain" / "run_record.json"))
    assert pre["hparams"]["dataset"] == "cifar10_split_a" and pre["hparams"]["num_classes"] == 5
    encoder = out / "real_pretrain" / "vit_encoder.pt"
    rows = {(m.group(1), m.group(2)): m.group(3).split(", ") for m in re.finditer(
        r"^\| \((a|b|c)\) [^|]+ \| (pretrained|scratch) \| ([^|]+) \|", text, re.M)}
    assert len(rows) == 6, text[-3000:]
    for setting, label in (("one_epoch", "a"), ("low_data", "b"), ("curve", "c")):
        records = {}
        for start in ("pretrained", "scratch"):
            for seed in (0, 1):
                record = read_record(str(out / f"{setting}-{start}-seed{seed}" / "run_record.json"))
                assert float(rows[(label, start)][seed]) == pytest.approx(record["final_accuracy"], abs=5e-5)
                hp = record["hparams"]
                assert hp["dataset"] == "cifar10_split_b" and hp["num_classes"] == 5
                assert hp.get("encoder_weights") == (str(encoder) if start == "pretrained" else None)
                records[start] = record
        pre_hp, scratch_hp = (records[s]["hparams"] for s in ("pretrained", "scratch"))
        same = ("epochs", "batch_size", "train_steps_per_epoch", "data_dir", "em_dim", "num_layers", "lr")
        assert {k: pre_hp.get(k) for k in same} == {k: scratch_hp.get(k) for k in same}  # only the start differs
        assert records["pretrained"]["schedule"]["global_steps"] == records["scratch"]["schedule"]["global_steps"]
        expected_epochs = {"one_epoch": 1, "low_data": transfer.LOW_DATA["tiny"]["epochs"], "curve": 2}[setting]
        assert pre_hp["epochs"] == expected_epochs
        assert (pre_hp["data_dir"] == str(out / "low_data")) == (setting == "low_data")
    # (c): the curve has an entry per epoch and the PNG is written
    curve = r"^\| 1 \| \d\.\d{4} \| \d\.\d{4} \|\n\| 2 \| \d\.\d{4} \| \d\.\d{4} \|$"
    assert re.search(curve, text, re.M), text[-2000:]
    assert (out / "learning_curve.png").stat().st_size > 1000
    evaluated = read_record(str(out / "curve-pretrained-seed0" / "run_record.json"))["eval"][-1]["images"]
    assert 0 < evaluated <= 16 and f"at the last epoch on {evaluated:,} of its" in text  # what the eval really read
    gain = float(re.search(r"^\(a\) one_epoch: pretrained - scratch: ([+-]\d\.\d{4}) mean accuracy; pretrained wins "
                           r"\d of 2 seeds$", text, re.M).group(1))
    assert status == (0 if gain > 0 else 1)  # tiny runs learn nothing: either may win, and the status says which


def test_low_data_subset_is_balanced_fixed_by_its_seed_and_read_by_the_app_loader(tmp_path):
    import numpy as np

    from apphub_vit.data import dataset_arrays, load_cifar
    data = _cifar10_folder(tmp_path)
    full_train, full_test = (dataset_arrays(d) for d in load_cifar(5, "cifar10_split_b", data_dir=str(data)))

    def subset(name, seed):
        transfer.write_low_data_folder(str(data), str(tmp_path / name), per_class=4, seed=seed)
        return [dataset_arrays(d) for d in load_cifar(5, "cifar10_split_b", data_dir=str(tmp_path / name))]

    train, test = subset("s0", 0)
    assert np.bincount(train["y"], minlength=5).tolist() == [4] * 5  # balanced: 4 of each of the 5 classes
    originals = {x.tobytes(): y for x, y in zip(full_train["x"], full_train["y"])}
    assert all(originals.get(x.tobytes()) == y for x, y in zip(train["x"], train["y"]))  # split b's own images
    assert np.array_equal(test["x"], full_test["x"]) and np.array_equal(test["y"], full_test["y"])  # all test images
    again, _ = subset("s0-again", 0)
    assert np.array_equal(again["x"], train["x"]) and np.array_equal(again["y"], train["y"])  # fixed for a seed
    other, _ = subset("s1", 1)
    assert not np.array_equal(other["x"], train["x"])


def test_real_transfer_needs_a_cifar10_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        transfer.main(["--task", "real", "--budget", "tiny", "--out", str(tmp_path)])
    assert "--task real needs --data_dir" in capsys.readouterr().err
    assert transfer.main(["--task", "real", "--data_dir", str(tmp_path / "nope"), "--budget", "tiny", "--out",
                          str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().out
