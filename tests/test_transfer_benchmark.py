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
    rows = {m.group(1): m.group(2).split(", ") for m in re.finditer(r"^\| (pretrained|scratch) \| ([^|]+) \|", out,
                                                                      re.M)}
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
