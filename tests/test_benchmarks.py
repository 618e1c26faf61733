"""Smoke tests of the benchmark scripts on CPU with tiny configurations (their figures come from real runs elsewhere)."""
import re
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import throughput  # noqa: E402


def test_throughput_prints_every_row_with_its_ratio(capsys):
    throughput.main(["--size", "tiny", "--steps", "3", "--skip", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "images/s" not in line and "---" not in line]
    assert len(rows) == 7, out[-3000:]
    rates = [float(row.split("|")[2].replace(",", "")) for row in rows]
    ratios = [float(row.split("|")[3].strip().rstrip("x")) for row in rows]
    assert all(rate > 0 for rate in rates)
    assert ratios[0] == 1.0 and all(abs(r - rate / rates[0]) < 0.01 + 0.01 * r for r, rate in zip(ratios, rates))
    assert re.search(r"without our FastEstimator sampler fix", out)


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
