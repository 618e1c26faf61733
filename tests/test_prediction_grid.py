"""PredictionGrid: image layouts, undoing normalization, the count and colours of the tiles, the Trace's lifecycle."""
import matplotlib
import numpy as np
import pytest
import torch
from fastestimator.op.numpyop.univariate import Normalize

from apphub_vit.prediction_grid import RIGHT, WRONG, PredictionGrid, denormalize, draw_prediction_grid, to_hwc

matplotlib.use("Agg")
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.image import imread  # noqa: E402


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


@pytest.mark.parametrize("shape, expected", [((28, 28), (28, 28, 1)), ((1, 28, 28), (28, 28, 1)),
                                             ((3, 32, 32), (32, 32, 3)), ((32, 32, 3), (32, 32, 3)),
                                             ((28, 28, 1), (28, 28, 1))])
def test_to_hwc_guesses_layout(shape, expected):
    assert to_hwc(np.zeros(shape)).shape == expected


def test_to_hwc_rejects_other_channel_counts():
    with pytest.raises(ValueError, match="1- or 3-channel"):
        to_hwc(np.zeros((8, 8, 5)))
    assert to_hwc(np.zeros((3, 3, 3)), channels_first=True).shape == (3, 3, 3)


def test_denormalize_inverts_fastestimator_normalize():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalized = Normalize(inputs="x", outputs="x", mean=mean, std=std).forward([image], {})[0]
    assert np.allclose(denormalize(normalized, mean, std), image / 255.0, atol=1e-5)
    gray = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
    norm_gray = Normalize(inputs="x", outputs="x", mean=0.1307, std=0.3081).forward([gray[..., 0]], {})[0]
    assert np.allclose(denormalize(norm_gray[..., None], 0.1307, 0.3081), gray / 255.0, atol=1e-5)


def test_draw_grid_count_and_colours(tmp_path):
    images = [np.full((8, 8, 1), i / 10, np.float32) for i in range(10)]
    true = list(range(10))
    pred = [t if t % 3 else (t + 1) % 10 for t in true]  # 0, 3, 6, 9 wrong
    path = tmp_path / "grid.png"
    fig = draw_prediction_grid(images, true, pred, [f"digit{i}" for i in range(10)], str(path))
    axes = image_axes(fig)
    assert len(axes) == 10
    colours = [to_hex(ax.title.get_color()) for ax in axes]
    assert colours == [WRONG if t % 3 == 0 else RIGHT for t in true]
    assert axes[3].get_title() == "digit3 / digit4" and axes[4].get_title() == "digit4 / digit4"
    assert "6 of 10 right" in fig._suptitle.get_text()
    png = imread(str(path))
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100


def fake_batches(n_batches, batch_size, channels_first=True, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        shape = (batch_size, 3, 12, 12) if channels_first else (batch_size, 12, 12, 3)
        x = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, num_classes, batch_size))
        y_pred = torch.from_numpy(rng.normal(size=(batch_size, num_classes)).astype(np.float32))
        yield {"x": x, "y": y, "y_pred": y_pred}


@pytest.mark.parametrize("n, batches, batch_size, shown", [(16, 3, 10, 16), (16, 1, 5, 5), (4, 2, 8, 4)])
def test_trace_keeps_first_n_of_last_epoch_and_writes_png(tmp_path, n, batches, batch_size, shown):
    trace = PredictionGrid("x", "y", "y_pred", [f"c{i}" for i in range(10)], str(tmp_path), n=n,
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    for epoch in range(2):  # the second epoch replaces the first's images
        trace.on_epoch_begin({})
        last = list(fake_batches(batches, batch_size, seed=epoch))
        for batch in last:
            trace.on_batch_end(batch)
    trace.on_end({})
    assert trace.written == str(tmp_path / "prediction_grid.png") and (tmp_path / "prediction_grid.png").is_file()
    assert trace.shown == shown
    true = np.concatenate([b["y"].numpy() for b in last])[:shown]
    pred = np.concatenate([b["y_pred"].numpy().argmax(-1) for b in last])[:shown]
    assert trace.correct == int((true == pred).sum())


def test_trace_accepts_hwc_images_and_class_indices(tmp_path):
    trace = PredictionGrid("x", "y", "y_pred", None, str(tmp_path), n=6, filename="hwc.png")
    trace.on_epoch_begin({})
    batch = next(fake_batches(1, 6, channels_first=False))
    batch["y_pred"] = batch["y"].clone()  # indices, all right
    trace.on_batch_end(batch)
    trace.on_end({})
    assert trace.shown == 6 and trace.correct == 6 and (tmp_path / "hwc.png").is_file()


def test_trace_converts_only_the_images_it_keeps(tmp_path, monkeypatch):
    """On a GPU an eval batch stays on the device (DeviceNetwork): the trace must copy its first `n` images, not the
    whole batch of normalised images."""
    import apphub_vit.prediction_grid as grid
    converted = []
    monkeypatch.setattr(grid, "to_number", lambda value: converted.append(len(value)) or np.asarray(value))
    trace = PredictionGrid("x", "y", "y_pred", None, str(tmp_path), n=4)
    trace.on_epoch_begin({})
    for batch in fake_batches(2, 64):
        trace.on_batch_end(batch)
    assert trace._count == 4 and converted == [4, 4, 4]  # one batch's first 4 of 64; the second batch not at all


def test_trace_without_eval_writes_nothing(tmp_path, capsys):
    trace = PredictionGrid("x", "y", "y_pred", None, str(tmp_path))
    trace.on_end({})
    assert trace.written is None and not list(tmp_path.iterdir())
    assert "no grid written" in capsys.readouterr().out


def test_trace_rejects_bad_n(tmp_path):
    with pytest.raises(ValueError, match="positive integer"):
        PredictionGrid("x", "y", "y_pred", None, str(tmp_path), n=0)
