"""The compare command: table rows and curves from records of tiny real runs, and every kind of bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apphub_vit.compare import COLUMNS, load_runs, main, table_rows
from apphub_vit.records import RECORD_FILE
from tests.test_records import tiny_mse_estimator, tiny_vit_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """A folder of two real runs: the tiny ViT (accuracy + ce) and the tiny autoencoder (mse only)."""
    root = tmp_path_factory.mktemp("runs")
    tiny_vit_run(root / "vit")
    tiny_mse_estimator(root / "ae").fit(warmup=False)
    return root


def record_of(runs_dir: Path, name: str) -> dict:
    return json.loads((runs_dir / name / RECORD_FILE).read_text())


def rows_by_run(out: Path) -> dict:
    """The table in comparison.md as {run: {column: cell}}."""
    lines = [line for line in (out / "comparison.md").read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert tuple(header) == COLUMNS
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def run_cli(capsys, *args) -> tuple:
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_table_rows_png_and_printed_table(runs_dir, tmp_path, capsys):
    out = tmp_path / "report"
    status, stdout, _ = run_cli(capsys, runs_dir / "vit", runs_dir / "ae", "--out", out)
    assert status == 0
    rows = rows_by_run(out)
    assert list(rows) == ["vit", "ae"]  # one row per run, in the order given
    vit, ae = record_of(runs_dir, "vit"), record_of(runs_dir, "ae")
    assert rows["vit"]["app"] == "vit_pretrain" and rows["vit"]["dataset"] == "synthetic CIFAR-100"
    assert rows["vit"]["epochs"] == "2"
    assert rows["vit"]["best acc"] == f"{100 * vit['best_accuracy']:.2f}%"
    assert rows["vit"]["final acc"] == f"{100 * vit['final_accuracy']:.2f}%"
    assert rows["vit"]["final loss"] == f"{vit['final_loss']:.4f} (ce)"
    assert rows["vit"]["train time (s)"] == f"{vit['timing']['train_seconds']:.1f}"
    assert rows["vit"]["train img/s"] == f"{vit['timing']['train_images_per_second']:.1f}"
    assert rows["vit"]["params"] == f"{vit['parameters']['total']:,}"
    assert rows["ae"]["params"] == "71" and rows["ae"]["trainable"] == "44"
    assert rows["ae"]["best acc"] == "" and rows["ae"]["final acc"] == ""  # no accuracy: blanks
    assert rows["ae"]["final loss"] == f"{ae['final_loss']:.4f} (mse)"
    png = (out / "comparison.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert "| vit | vit_pretrain | synthetic CIFAR-100 | 2 |" in stdout  # the table is printed too


def test_folder_of_run_folders(runs_dir, tmp_path, capsys):
    (runs_dir / "unfinished").mkdir(exist_ok=True)
    status, _, err = run_cli(capsys, runs_dir, "--out", tmp_path)
    assert status == 0
    assert list(rows_by_run(tmp_path)) == ["ae", "vit"]  # subfolders in name order
    assert "unfinished" in err and RECORD_FILE in err  # the folder without a record is named, not silently dropped


def test_json_file_argument_and_duplicate_run_names(runs_dir, tmp_path, capsys):
    copy = tmp_path / "copy" / "vit"
    shutil.copytree(runs_dir / "vit", copy)
    status, _, _ = run_cli(capsys, runs_dir / "vit" / RECORD_FILE, copy, "--out", tmp_path / "out")
    assert status == 0
    assert list(rows_by_run(tmp_path / "out")) == ["vit", "vit (2)"]


def bad_files(runs_dir: Path, folder: Path) -> dict:
    good = (runs_dir / "vit" / RECORD_FILE).read_text()
    files = {
        "missing": folder / "nowhere" / RECORD_FILE,
        "empty": folder / "empty.json",
        "truncated": folder / "truncated.json",
        "foreign": folder / "foreign.json",
        "list": folder / "list.json",
    }
    folder.mkdir(exist_ok=True)
    files["empty"].write_text("")
    files["truncated"].write_text(good[:len(good) // 2])
    files["foreign"].write_text(json.dumps({"name": "a Keras history", "loss": [1.0, 0.5]}))
    files["list"].write_text("[1, 2, 3]")
    return files


@pytest.mark.parametrize("kind, message", [("missing", "no such file"), ("empty", "is empty"),
                                           ("truncated", "not valid JSON"), ("foreign", "not an apphub_vit run record"),
                                           ("list", "not an apphub_vit run record")])
def test_bad_record_is_an_error_naming_the_file(runs_dir, tmp_path, capsys, kind, message):
    bad = bad_files(runs_dir, tmp_path / "bad")[kind]
    status, stdout, err = run_cli(capsys, runs_dir / "vit", bad, "--out", tmp_path / "out")
    assert status == 1
    assert str(bad) in err and message in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_skip_bad_warns_names_and_compares_the_rest(runs_dir, tmp_path, capsys):
    bad = bad_files(runs_dir, tmp_path / "bad")
    status, _, err = run_cli(capsys, *bad.values(), runs_dir / "ae", runs_dir / "vit", "--out", tmp_path / "out",
                             "--skip-bad")
    assert status == 0
    assert all(str(path) in err for path in bad.values()) and err.count("warning") == len(bad)
    assert list(rows_by_run(tmp_path / "out")) == ["ae", "vit"]


def test_skip_bad_with_nothing_left_is_an_error(runs_dir, tmp_path, capsys):
    bad = bad_files(runs_dir, tmp_path / "bad")
    status, _, err = run_cli(capsys, bad["empty"], bad["foreign"], "--out", tmp_path / "out", "--skip-bad")
    assert status == 1 and "no readable run records" in err


def test_folder_without_records_is_an_error(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    status, _, err = run_cli(capsys, tmp_path / "empty_run", "--out", tmp_path / "out")
    assert status == 1 and str(tmp_path / "empty_run") in err


def test_different_metrics_and_missing_fields_give_blanks(runs_dir, tmp_path, capsys):
    record = record_of(runs_dir, "vit")
    for entry in record["eval"]:  # another app's metric names: a top-5 accuracy and a "loss", no "accuracy" / "ce"
        entry["metrics"] = {"top5": 0.5, "loss": 2.0}
    record["metrics"] = {"accuracy_key": "top5", "loss_key": "loss"}
    for key in ("best_accuracy", "final_accuracy", "final_loss", "timing", "parameters", "schedule", "device"):
        record.pop(key)
    record["run"] = "odd"
    (tmp_path / "odd.json").write_text(json.dumps(record))
    status, _, _ = run_cli(capsys, runs_dir / "vit", tmp_path / "odd.json", "--out", tmp_path / "out")
    assert status == 0
    odd = rows_by_run(tmp_path / "out")["odd"]
    assert odd["app"] == "vit_pretrain"
    assert all(odd[c] == "" for c in COLUMNS[3:])
    assert (tmp_path / "out" / "comparison.png").read_bytes().startswith(PNG_MAGIC)


def test_rows_from_python_api(runs_dir):
    rows = table_rows(load_runs([str(runs_dir / "vit"), str(runs_dir / "ae")]))
    assert [row[:3] for row in rows] == [["vit", "vit_pretrain", "synthetic CIFAR-100"],
                                         ["ae", "tiny_autoencoder", "random"]]


def test_never_overwrites_outputs_without_force(runs_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, runs_dir / "vit", "--out", out)[0] == 0
    before = {name: (out / name).read_bytes() for name in ("comparison.md", "comparison.png")}
    status, _, err = run_cli(capsys, runs_dir / "ae", "--out", out)
    assert status == 1 and "comparison.md" in err and "--force" in err
    assert {name: (out / name).read_bytes() for name in before} == before
    (out / "comparison.md").unlink()  # one output alone in the way is enough to refuse
    status, _, err = run_cli(capsys, runs_dir / "ae", "--out", out)
    assert status == 1 and "comparison.png" in err and not (out / "comparison.md").exists()
    assert run_cli(capsys, runs_dir / "ae", "--out", out, "--force")[0] == 0
    assert list(rows_by_run(out)) == ["ae"]


def test_module_command_line(runs_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "apphub_vit.compare", str(runs_dir / "ae"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                              "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr
    assert "| ae | tiny_autoencoder | random |" in result.stdout
    assert (tmp_path / "comparison.md").is_file() and (tmp_path / "comparison.png").is_file()


def test_run_all_tiny_budget_end_to_end(tmp_path, capsys):
    """The one command, at the seconds-long `tiny` budget: runs into OUT/<run>, then the comparison of all of them."""
    from apphub_vit.run_all import main as run_all_main
    runs = "vit_pretrain,vit_finetune,vit_scratch,mnist_autoencoder"
    assert run_all_main(["--out", str(tmp_path), "--budget", "tiny", "--only", runs]) == 0
    rows = rows_by_run(tmp_path)
    assert list(rows) == runs.split(",")
    assert rows["mnist_autoencoder"]["best acc"] == "" and "(mse)" in rows["mnist_autoencoder"]["final loss"]
    scratch = json.loads((tmp_path / "vit_scratch" / RECORD_FILE).read_text())
    finetune = json.loads((tmp_path / "vit_finetune" / RECORD_FILE).read_text())
    # The transfer question is fair: same budget and architecture, only the start differs.
    same = ("epochs", "batch_size", "train_steps_per_epoch", "num_layers", "em_dim", "patch_size")
    assert all(scratch["hparams"].get(k) == finetune["hparams"].get(k) for k in same), \
        (scratch["hparams"], finetune["hparams"])
    assert scratch["parameters"] == finetune["parameters"]
    assert finetune["hparams"]["encoder_weights"].endswith("vit_pretrain/vit_encoder.pt")
    assert (tmp_path / "comparison.png").is_file() and "Produced by" in (tmp_path / "comparison.md").read_text()
    capsys.readouterr()
    # Again into the same OUT: refused before any training, naming what is in the way.
    assert run_all_main(["--out", str(tmp_path), "--budget", "tiny", "--only", "mnist_autoencoder"]) == 1
    err = capsys.readouterr().err
    assert "mnist_autoencoder" in err and "--force" in err


@pytest.mark.parametrize("budget", ["cpu", "gpu"])
def test_run_all_budgets_fit_the_apps_signatures(budget, tmp_path):
    """Every run of the cpu and gpu budgets passes only arguments its app's get_estimator takes (no training here)."""
    import importlib
    import inspect

    from apphub_vit.run_all import RUNS, make_plans
    plans = make_plans(budget, str(tmp_path), mnist_dir=str(tmp_path), force=False, num_process=0)
    assert [p.name for p in plans] == list(RUNS)
    for plan in plans:
        inspect.signature(importlib.import_module(plan.module).get_estimator).bind(**plan.kwargs)
    by_name = {p.name: p.kwargs for p in plans}
    budget_keys = ("epochs", "batch_size", "train_steps_per_epoch", "synthetic_size", "num_layers", "em_dim")
    assert all(by_name["vit_finetune"].get(k) == by_name["vit_scratch"].get(k) for k in budget_keys)


@pytest.mark.parametrize("budget", ["tiny", "cpu", "gpu"])
def test_run_all_adds_the_real_photo_runs_only_with_a_cifar10_folder(budget, tmp_path):
    """With cifar10_dir the three real-photo runs come after vit_scratch (pretrain on split a, finetune and scratch on
    split b, one budget for both); their arguments fit the apps; the other seven runs stay as they were."""
    import importlib
    import inspect

    from apphub_vit.run_all import REAL_RUNS, RUNS, make_plans
    plain = make_plans(budget, str(tmp_path), None, False, 0)
    plans = make_plans(budget, str(tmp_path), None, False, 0, cifar10_dir="/data/c10")
    assert [p.name for p in plans] == list(RUNS[:3] + REAL_RUNS + RUNS[3:])
    assert [(p.name, p.kwargs) for p in plans if p.name in RUNS] == [(p.name, p.kwargs) for p in plain]
    real = {p.name: p.kwargs for p in plans if p.name in REAL_RUNS}
    for plan in plans:
        inspect.signature(importlib.import_module(plan.module).get_estimator).bind(**plan.kwargs)
    assert real["real_pretrain"]["dataset"] == "cifar10_split_a"
    assert real["real_finetune"]["dataset"] == real["real_scratch"]["dataset"] == "cifar10_split_b"
    assert all(kwargs["data_dir"] == "/data/c10" for kwargs in real.values())
    assert real["real_finetune"]["encoder_weights"] == str(tmp_path / "real_pretrain" / "vit_encoder.pt")
    assert real["real_scratch"]["from_scratch"] is True
    budget_keys = ("epochs", "batch_size", "train_steps_per_epoch", "eval_steps_per_epoch", "lr", "num_layers",
                   "em_dim", "patch_size")
    tuned, scratch = ({k: real[name].get(k) for k in budget_keys} for name in ("real_finetune", "real_scratch"))
    assert tuned == scratch


def test_run_all_real_photo_runs_end_to_end_and_refused_without_the_folder(tmp_path, capsys):
    from apphub_vit.run_all import main as run_all_main
    from tests.test_data import _write_cifar10
    _write_cifar10(tmp_path / "c10" / "cifar-10-batches-py", n=20)
    runs = "real_pretrain,real_finetune,real_scratch"
    out = tmp_path / "out"
    assert run_all_main(["--out", str(out), "--budget", "tiny", "--cifar10_dir", str(tmp_path / "c10"), "--only",
                         runs]) == 0
    rows = rows_by_run(out)
    assert list(rows) == runs.split(",")
    assert [rows[r]["dataset"] for r in rows] == ["cifar10_split_a", "cifar10_split_b", "cifar10_split_b"]
    assert "--cifar10_dir" in (out / "comparison.md").read_text()
    capsys.readouterr()
    assert run_all_main(["--out", str(tmp_path / "x"), "--budget", "tiny", "--only", "real_pretrain"]) == 1
    assert "need --cifar10_dir" in capsys.readouterr().err
    assert run_all_main(["--out", str(tmp_path / "y"), "--budget", "tiny", "--cifar10_dir", str(tmp_path / "no"),
                         "--only", runs]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()  # refused before any run
